"""Token arrays for training, candidates and queries.

Conventions (docs/design.md): ``tokens_NxT`` int32, right padded with PAD = 0, and
``weights_NxT`` float32 with ``weights[n, t] = 1`` when token ``t`` is predicted from
``tokens[n, :t]`` and counts, so ``weights[:, 0] == 0``. Arrays are numpy; callers move them to
devices.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence

import numpy as np
from tokenizers import Tokenizer

from trackstar.tokenizer import BOS, EOS, PAD, UNK
from trackstar.world import World


class DataError(ValueError):
    """Examples or a stream that cannot be built as asked; the message says how to fix it."""


class MostlyUnknownWarning(UserWarning):
    """Examples whose tokens are mostly UNK (out of the tokenizer's vocabulary)."""


# Default of ``max_unk_frac``: warn about examples that are *mostly* UNK, i.e. more than half.
MAX_UNK_FRAC = 0.5


def _encode_many(tok: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in tok.encode_batch(list(texts), add_special_tokens=False)]


class TrainStream:
    """The training corpus packed into ``seq_len`` windows, ``batch_size`` windows a batch.

    Each document becomes ``[BOS] + ids + [EOS]``; an epoch concatenates all documents in an
    order drawn from ``(seed, epoch)`` and cuts the result into windows (the tail that fills
    no whole batch is dropped, a different tail each epoch). ``batch(step)`` depends only on
    ``(seed, step)``, so a run resumed at step ``s`` replays exactly the batches it would have
    seen.
    """

    def __init__(
        self,
        doc_token_lists: Sequence[Sequence[int]],
        seq_len: int,
        batch_size: int,
        seed: int,
    ):
        if seq_len < 2:
            raise DataError(f"seq_len must be >= 2 (one input and one target), got {seq_len}")
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        self.seq_len = int(seq_len)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self._docs = [np.asarray([BOS, *d, EOS], dtype=np.int32) for d in doc_token_lists]
        self.n_tokens = int(sum(len(d) for d in self._docs))
        self.batches_per_epoch = self.n_tokens // (self.seq_len * self.batch_size)
        if self.batches_per_epoch < 1:
            raise DataError(
                f"the corpus has {self.n_tokens} tokens (with BOS/EOS), fewer than one batch of "
                f"{self.batch_size} x {self.seq_len}; lower train.batch_size or train.seq_len"
            )
        self._cache: tuple[int, np.ndarray] | None = None

    @property
    def tokens_per_batch(self) -> int:
        """Token positions in one batch (``batch_size * seq_len``), counted or not.

        The training loss counts ``batch_size * (seq_len - 1)`` of them (``weights[:, 0] = 0``);
        tail-patch calls that number ``counted_tokens_per_batch``.
        """
        return self.batch_size * self.seq_len

    @property
    def fingerprint(self) -> str:
        """Hash of the documents, shapes and seed: equal fingerprints replay equal batches."""
        h = hashlib.sha256(f"{self.seq_len},{self.batch_size},{self.seed}".encode())
        for d in self._docs:
            h.update(len(d).to_bytes(4, "little"))
            h.update(d.tobytes())
        return h.hexdigest()[:16]

    def position(self, step: int) -> tuple[int, int]:
        """``(epoch, batch index within the epoch)`` of ``step``."""
        if step < 0:
            raise DataError(f"step must be >= 0, got {step}")
        return divmod(int(step), self.batches_per_epoch)

    def _epoch_tokens(self, epoch: int) -> np.ndarray:
        if self._cache is None or self._cache[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self._docs))
            flat = np.concatenate([self._docs[i] for i in order])
            self._cache = (epoch, flat)
        return self._cache[1]

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """``(tokens_BxT int32, weights_BxT float32)`` of training step ``step``.

        Every position after the first is predicted (``weights[:, 0] = 0``, the rest 1).
        """
        epoch, i = self.position(step)
        flat = self._epoch_tokens(epoch)
        n = self.tokens_per_batch
        tokens_BxT = flat[i * n : (i + 1) * n].reshape(self.batch_size, self.seq_len).copy()
        weights_BxT = np.ones((self.batch_size, self.seq_len), dtype=np.float32)
        weights_BxT[:, 0] = 0.0
        return tokens_BxT, weights_BxT


def _check_lengths(
    lengths: Sequence[int], max_len: int, skip_too_long: bool, what: str
) -> list[int]:
    kept = []
    for i, n in enumerate(lengths):
        if n > max_len:
            if skip_too_long:
                continue
            raise DataError(
                f"{what} {i} is {n} tokens with BOS, longer than max_len = {max_len}; raise "
                "max_len (model.max_len) or pass skip_too_long=True"
            )
        kept.append(i)
    return kept


def check_unknown(
    ids: Sequence[Sequence[int]],
    positions: Sequence[int],
    what: str,
    max_unk_frac: float = MAX_UNK_FRAC,
    unk_error: bool = False,
) -> list[int]:
    """Positions of the examples whose share of UNK tokens exceeds ``max_unk_frac``.

    A word the tokenizer does not know becomes UNK, whose input embedding the training corpus
    never updates; an example made mostly of UNK then has a gradient that describes the UNK
    embedding rather than its text (and, without the correction's V floor, a vector norm
    orders of magnitude above the others). Such examples are reported by position: a
    ``MostlyUnknownWarning``, or with ``unk_error`` a ``DataError``.

    Args:
      ids: the token ids (no specials) of each example, indexed by position.
      positions: the positions to check (e.g. the examples that were kept).
      what: "text" or "query", for the message.
      max_unk_frac: the largest share of UNK tokens an example may have without a report
        (0.5: report examples that are mostly UNK; 1.0 never reports).
      unk_error: raise instead of warning.
    """
    if not 0.0 <= max_unk_frac <= 1.0:
        raise DataError(f"max_unk_frac = {max_unk_frac}; it must be in [0, 1] (1 disables)")
    bad = [
        int(i)
        for i in positions
        if ids[i] and sum(t == UNK for t in ids[i]) > max_unk_frac * len(ids[i])
    ]
    if bad:
        shown = ", ".join(map(str, bad[:20])) + (
            f", ... ({len(bad)} in all)" if len(bad) > 20 else ""
        )
        message = (
            f"{len(bad)} {what}(s) of {len(positions)} are more than {max_unk_frac:.0%} UNK "
            f"tokens (words outside the tokenizer's vocabulary), at positions [{shown}]; their "
            "gradients describe the UNK embedding, not the text. Fix those texts or the "
            "tokenizer, or raise featurize.max_unk_frac"
        )
        if unk_error:
            raise DataError(message)
        warnings.warn(message, MostlyUnknownWarning, stacklevel=3)
    return bad


def encode_texts(
    tok: Tokenizer,
    texts: Sequence[str],
    max_len: int,
    skip_too_long: bool = False,
    *,
    max_unk_frac: float = MAX_UNK_FRAC,
    unk_error: bool = False,
) -> tuple[np.ndarray, ...]:
    """Encodes texts as ``[BOS] + ids``, right padded, weights 1 on the text's tokens.

    Returns ``(tokens_NxT, weights_NxT)`` with ``T = max_len``. A text longer than
    ``max_len`` (with BOS) or with no tokens is an error naming its index; with
    ``skip_too_long=True`` such texts are left out and ``(tokens, weights, kept_indices)`` is
    returned. Texts that are more than ``max_unk_frac`` UNK tokens are reported by position
    (``check_unknown``: a warning, or with ``unk_error`` an error).
    """
    ids = _encode_many(tok, texts)
    empty = [i for i, x in enumerate(ids) if not x]
    if empty and not skip_too_long:
        raise DataError(f"text {empty[0]} has no tokens; remove it or pass skip_too_long=True")
    lengths = [1 + len(x) if x else max_len + 1 for x in ids]
    kept = _check_lengths(lengths, max_len, skip_too_long, "text")
    check_unknown(ids, kept, "text", max_unk_frac, unk_error)
    tokens_NxT = np.full((len(kept), max_len), PAD, dtype=np.int32)
    weights_NxT = np.zeros((len(kept), max_len), dtype=np.float32)
    for row, i in enumerate(kept):
        n = len(ids[i])
        tokens_NxT[row, 0] = BOS
        tokens_NxT[row, 1 : 1 + n] = ids[i]
        weights_NxT[row, 1 : 1 + n] = 1.0
    if skip_too_long:
        return tokens_NxT, weights_NxT, np.asarray(kept, dtype=np.int64)
    return tokens_NxT, weights_NxT


def encode_queries(
    tok: Tokenizer,
    prompts: Sequence[str],
    targets: Sequence[str],
    max_len: int,
    skip_too_long: bool = False,
    *,
    max_unk_frac: float = MAX_UNK_FRAC,
    unk_error: bool = False,
) -> tuple[np.ndarray, ...]:
    """Encodes queries as ``[BOS] + prompt + target``, weights 1 only on the target tokens.

    Returns ``(tokens_NxT, weights_NxT)``; errors, ``skip_too_long`` and the UNK report
    (over prompt and target tokens together) as in ``encode_texts`` (an empty target is a
    bad query).
    """
    if len(prompts) != len(targets):
        raise DataError(f"{len(prompts)} prompts but {len(targets)} targets; pass equal lists")
    p_ids = _encode_many(tok, prompts)
    t_ids = _encode_many(tok, targets)
    empty = [i for i, x in enumerate(t_ids) if not x]
    if empty and not skip_too_long:
        raise DataError(f"query {empty[0]} has an empty target; remove it or skip_too_long=True")
    lengths = [1 + len(p) + len(t) if t else max_len + 1 for p, t in zip(p_ids, t_ids, strict=True)]
    kept = _check_lengths(lengths, max_len, skip_too_long, "query")
    both = [p + t for p, t in zip(p_ids, t_ids, strict=True)]
    check_unknown(both, kept, "query", max_unk_frac, unk_error)
    tokens_NxT = np.full((len(kept), max_len), PAD, dtype=np.int32)
    weights_NxT = np.zeros((len(kept), max_len), dtype=np.float32)
    for row, i in enumerate(kept):
        p, t = p_ids[i], t_ids[i]
        tokens_NxT[row, 0] = BOS
        tokens_NxT[row, 1 : 1 + len(p)] = p
        tokens_NxT[row, 1 + len(p) : 1 + len(p) + len(t)] = t
        weights_NxT[row, 1 + len(p) : 1 + len(p) + len(t)] = 1.0
    if skip_too_long:
        return tokens_NxT, weights_NxT, np.asarray(kept, dtype=np.int64)
    return tokens_NxT, weights_NxT


# --- World -> texts ---------------------------------------------------------------------------


def corpus_texts(world: World) -> list[str]:
    """Training documents' texts, in ``doc_id`` order (the open-set candidates)."""
    return [d.text for d in world.documents]


def candidate_texts(world: World) -> list[str]:
    """Closed-set candidate sentences, in ``cand_id`` order."""
    return [c.text for c in world.candidates]


def query_texts(world: World, split: str = "task") -> tuple[list[str], list[str]]:
    """``(prompts, targets)`` of the queries of ``split`` ("task", "heldout" or "all")."""
    if split not in ("task", "heldout", "all"):
        raise DataError(f"split must be 'task', 'heldout' or 'all', got {split!r}")
    qs = [q for q in world.queries if split == "all" or q.split == split]
    return [q.prompt for q in qs], [q.target for q in qs]


def corpus_token_lists(tok: Tokenizer, world: World) -> list[list[int]]:
    """Token ids (no specials) of every training document, for ``TrainStream``."""
    return _encode_many(tok, corpus_texts(world))


def train_stream(tok: Tokenizer, world: World, seq_len: int, batch_size: int, seed: int):
    """The ``TrainStream`` of a world's corpus."""
    return TrainStream(corpus_token_lists(tok, world), seq_len, batch_size, seed)
