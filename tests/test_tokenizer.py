"""Word-level tokenizer: special ids, round trips, prompt + target concatenation."""

import os

import ml_collections
import pytest

from trackstar import tokenizer as T
from trackstar import world as W
from trackstar.config import load_config_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup():
    cfg = load_config_file(os.path.join(ROOT, "configs", "tiny.py"))
    world = W.make_world(cfg.world)
    tok = T.train_tokenizer(W.world_texts(world), cfg.tokenizer)
    return cfg, world, tok


def test_special_ids_and_no_unknown_words(setup):
    _, world, tok = setup
    assert [tok.token_to_id(s) for s in T.SPECIAL_TOKENS] == [T.PAD, T.BOS, T.EOS, T.UNK]
    for text in W.world_texts(world):
        ids = T.encode(tok, text)
        assert ids and T.UNK not in ids and min(ids) > T.UNK
    assert T.encode(tok, "Qwxyz zzzq") == [T.UNK, T.UNK]


def test_word_level_split(setup):
    _, world, tok = setup
    doc = world.documents[0].text
    words = doc.replace(",", " , ").split()  # Whitespace + punctuation split.
    assert len(T.encode(tok, doc)) == len(words)
    assert T.decode(tok, T.encode(tok, doc)).split() == words


def test_round_trip(setup):
    _, world, tok = setup
    for text in W.world_texts(world)[:200]:
        ids = T.encode(tok, text)
        assert T.encode(tok, T.decode(tok, ids)) == ids


def test_prompt_target_concat(setup):
    _, world, tok = setup
    for q in world.queries:
        joined = T.encode(tok, q.prompt + " " + q.target)
        assert T.encode(tok, q.prompt) + T.encode(tok, q.target) == joined


def test_save_load(tmp_path, setup):
    _, world, tok = setup
    path = str(tmp_path / "sub" / "tokenizer.json")
    T.save_tokenizer(tok, path)
    tok2 = T.load_tokenizer(path)
    assert tok2.get_vocab() == tok.get_vocab()
    text = world.candidates[0].text
    assert T.encode(tok2, text) == T.encode(tok, text)
    assert T.vocab_size(tok2) == T.vocab_size(tok)
    with pytest.raises(T.TokenizerError, match="does not exist"):
        T.load_tokenizer(str(tmp_path / "missing.json"))


def test_vocab_too_small_raises(setup):
    _, world, _ = setup
    small = ml_collections.ConfigDict({"kind": "word", "vocab_size": 10})
    with pytest.raises(T.TokenizerError, match="tokenizer.vocab_size"):
        T.train_tokenizer(W.world_texts(world), small)


def test_vocab_checked_before_the_world_is_written(tmp_path):
    from trackstar import stages

    cfg = load_config_file(os.path.join(ROOT, "configs", "tiny.py"))
    cfg.run_dir = str(tmp_path / "run")
    cfg.tokenizer.vocab_size = 10
    with pytest.raises(T.TokenizerError, match="tokenizer.vocab_size"):
        stages.stage_world(cfg)
    assert not os.path.exists(cfg.run_dir)  # No world, tokenizer or config.json half-made.


def test_vocab_size_zero_takes_every_word():
    # A LAMA / ParaRel world easily has more words than the demo's 2,048 bound.
    texts = [" ".join(f"w{i}x{j}" for j in range(100)) + " ." for i in range(31)]
    n_words = 31 * 100 + 1
    with pytest.raises(T.TokenizerError, match=f"at least {n_words + 4}, or to 0"):
        T.train_tokenizer(texts, ml_collections.ConfigDict({"kind": "word", "vocab_size": 2048}))
    tok = T.train_tokenizer(texts, ml_collections.ConfigDict({"kind": "word", "vocab_size": 0}))
    assert T.ALL_WORDS == 0 and T.vocab_size(tok) == n_words + len(T.SPECIAL_TOKENS)
    assert T.UNK not in T.encode(tok, texts[-1])
    assert [tok.token_to_id(s) for s in T.SPECIAL_TOKENS] == [T.PAD, T.BOS, T.EOS, T.UNK]


def test_vocab_size_config_rule():
    from trackstar.config import ConfigError, validate

    cfg = load_config_file(os.path.join(ROOT, "configs", "tiny.py"))
    for ok in (0, 5, 4096):
        cfg.tokenizer.vocab_size = ok
        validate(cfg)
    for bad in (-1, 3):
        cfg.tokenizer.vocab_size = bad
        with pytest.raises(ConfigError, match="tokenizer.vocab_size must be 0"):
            validate(cfg)
