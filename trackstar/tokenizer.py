"""Word-level tokenizer (HF ``tokenizers``) trained offline on a world's texts.

Words are split on whitespace and punctuation, so a prompt and its target encoded separately
and concatenated give the same ids as ``prompt + " " + target`` encoded at once. Special ids:
PAD=0, BOS=1, EOS=2, UNK=3.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

from tokenizers import Tokenizer, models, pre_tokenizers, trainers

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIAL_TOKENS = ("[PAD]", "[BOS]", "[EOS]", "[UNK]")
# ``tokenizer.vocab_size`` meaning "every word of the texts, plus the special tokens".
ALL_WORDS = 0


class TokenizerError(ValueError):
    """A tokenizer that cannot be built or loaded; the message says how to fix it."""


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])


def _words(texts: Iterable[str]) -> set[str]:
    pre = _pre_tokenizer()
    words: set[str] = set()
    for t in texts:
        words.update(w for w, _ in pre.pre_tokenize_str(t))
    return words


def train_tokenizer(texts: Sequence[str], cfg: Any) -> Tokenizer:
    """Trains a word-level tokenizer on ``texts`` (config: the ``tokenizer`` section).

    Every word of ``texts`` gets an id: a ``cfg.vocab_size`` too small to hold them all is an
    error (silently mapping entity names to [UNK] would make facts unlearnable).
    ``cfg.vocab_size = 0`` sizes the vocabulary from the texts: all their words plus the
    special tokens.
    """
    kind = cfg.get("kind", "word") if hasattr(cfg, "get") else cfg.kind
    if kind != "word":
        raise TokenizerError(f"tokenizer.kind must be 'word', got {kind!r}")
    if not texts:
        raise TokenizerError("no texts to train the tokenizer on (empty world?)")
    n_words = len(_words(texts))
    need = n_words + len(SPECIAL_TOKENS)
    size = need if cfg.vocab_size == ALL_WORDS else int(cfg.vocab_size)
    if need > size:
        raise TokenizerError(
            f"tokenizer.vocab_size = {cfg.vocab_size} cannot hold the world's {n_words} words "
            f"plus {len(SPECIAL_TOKENS)} special tokens; set it to at least {need}, or to 0 "
            "(sized from the world)"
        )
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = _pre_tokenizer()
    trainer = trainers.WordLevelTrainer(
        vocab_size=size, min_frequency=1, special_tokens=list(SPECIAL_TOKENS)
    )
    tok.train_from_iterator(texts, trainer=trainer)
    for i, s in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(s) != i:  # The whole data path relies on these ids.
            raise TokenizerError(f"special token {s} got id {tok.token_to_id(s)}, expected {i}")
    return tok


def save_tokenizer(tok: Tokenizer, path: str) -> None:
    """Writes ``tok`` as one JSON file (temporary name, then renamed)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    tok.save(tmp)
    os.replace(tmp, path)


def load_tokenizer(path: str) -> Tokenizer:
    """Reads a tokenizer written by ``save_tokenizer``."""
    if not os.path.isfile(path):
        raise TokenizerError(f"tokenizer file {path!r} does not exist; train the tokenizer first")
    tok = Tokenizer.from_file(path)
    for i, s in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(s) != i:
            raise TokenizerError(f"{path}: special token {s} has id {tok.token_to_id(s)}, not {i}")
    return tok


def encode(tok: Tokenizer, text: str) -> list[int]:
    """Token ids of ``text``, without special tokens."""
    return tok.encode(text, add_special_tokens=False).ids


def decode(tok: Tokenizer, ids: Sequence[int]) -> str:
    """Words of ``ids`` joined by single spaces (special tokens dropped).

    Punctuation comes back space-separated ("In fact , ..."); encoding the result gives
    ``ids`` again.
    """
    return tok.decode([int(i) for i in ids], skip_special_tokens=True)


def vocab_size(tok: Tokenizer) -> int:
    """Number of ids (the model's output size)."""
    return tok.get_vocab_size(with_added_tokens=True)
