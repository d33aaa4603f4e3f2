"""Training stream, example encoding and weight masks against explicit constructions."""

import os
import warnings

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from trackstar import data as D
from trackstar import tokenizer as T
from trackstar import world as W
from trackstar.config import load_config_file
from trackstar.tokenizer import BOS, EOS, PAD, encode


@pytest.fixture(scope="module")
def tok():
    vocab = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, "[UNK]": 3}
    for w in "the cat sat on a mat . dog ran far is it".split():
        vocab[w] = len(vocab)
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    return t


def _docs(n=23, seed=0):
    rng = np.random.default_rng(seed)
    return [list(rng.integers(4, 50, size=rng.integers(1, 9))) for _ in range(n)]


def test_stream_matches_explicit_packing():
    docs = _docs()
    s = D.TrainStream(docs, seq_len=8, batch_size=3, seed=5)
    assert s.tokens_per_batch == 24
    assert s.batches_per_epoch == s.n_tokens // 24 >= 2
    for step in (0, 1, s.batches_per_epoch, s.batches_per_epoch + 1):
        epoch, i = divmod(step, s.batches_per_epoch)
        order = np.random.default_rng([5, epoch]).permutation(len(docs))
        flat = [t for j in order for t in [BOS, *docs[j], EOS]]
        want = np.asarray(flat[i * 24 : (i + 1) * 24]).reshape(3, 8)
        tokens, weights = s.batch(step)
        assert tokens.dtype == np.int32 and weights.dtype == np.float32
        np.testing.assert_array_equal(tokens, want)
        np.testing.assert_array_equal(weights[:, 0], 0.0)
        np.testing.assert_array_equal(weights[:, 1:], 1.0)


def test_stream_batch_is_pure_function_of_seed_and_step():
    docs = _docs()
    a = D.TrainStream(docs, 8, 3, seed=1)
    b = D.TrainStream(docs, 8, 3, seed=1)
    steps = [7, 0, 3 * a.batches_per_epoch + 2, 1, 7]
    first = {st: a.batch(st)[0] for st in sorted(set(steps))}
    for st in steps:  # Any call order, any instance: same batch.
        np.testing.assert_array_equal(b.batch(st)[0], first[st])
        np.testing.assert_array_equal(a.batch(st)[0], first[st])
    assert a.fingerprint == b.fingerprint
    c = D.TrainStream(docs, 8, 3, seed=2)
    assert c.fingerprint != a.fingerprint
    assert not np.array_equal(c.batch(0)[0], a.batch(0)[0])
    # Epochs reorder documents.
    n = a.batches_per_epoch
    assert not np.array_equal(a.batch(0)[0], a.batch(n)[0])


def test_stream_errors():
    with pytest.raises(D.DataError, match="fewer than one batch"):
        D.TrainStream([[5, 6]], seq_len=8, batch_size=2, seed=0)
    with pytest.raises(D.DataError, match="seq_len"):
        D.TrainStream(_docs(), seq_len=1, batch_size=2, seed=0)


def test_encode_texts(tok):
    texts = ["the cat sat .", "a dog", "it"]
    tokens, weights = D.encode_texts(tok, texts, max_len=6)
    assert tokens.shape == weights.shape == (3, 6) and tokens.dtype == np.int32
    for row, text in enumerate(texts):
        ids = encode(tok, text)
        want = [BOS, *ids] + [PAD] * (5 - len(ids))
        np.testing.assert_array_equal(tokens[row], want)
        np.testing.assert_array_equal(weights[row], [0] + [1] * len(ids) + [0] * (5 - len(ids)))
    assert EOS not in tokens


def test_encode_texts_too_long(tok):
    texts = ["the cat", "the cat sat on a mat .", "dog"]
    with pytest.raises(D.DataError, match="text 1 is 8 tokens"):
        D.encode_texts(tok, texts, max_len=6)
    tokens, weights, kept = D.encode_texts(tok, texts, max_len=6, skip_too_long=True)
    np.testing.assert_array_equal(kept, [0, 2])
    np.testing.assert_array_equal(tokens, D.encode_texts(tok, ["the cat", "dog"], 6)[0])
    with pytest.raises(D.DataError, match="text 1 has no tokens"):
        D.encode_texts(tok, ["dog", ""], max_len=6)


def test_encode_queries(tok):
    prompts, targets = ["the cat sat on", "it is"], ["a mat", "far"]
    tokens, weights = D.encode_queries(tok, prompts, targets, max_len=8)
    for row, (p, t) in enumerate(zip(prompts, targets, strict=True)):
        full = [BOS, *encode(tok, p + " " + t)]
        np.testing.assert_array_equal(tokens[row, : len(full)], full)
        assert (tokens[row, len(full) :] == PAD).all()
        np.testing.assert_array_equal(tokens[row][weights[row] == 1], encode(tok, t))
        first = 1 + len(encode(tok, p))
        assert weights[row, :first].sum() == 0 and weights[row, first:].sum() == len(encode(tok, t))
    with pytest.raises(D.DataError, match="query 0 is 7 tokens"):
        D.encode_queries(tok, prompts, targets, max_len=6)
    with pytest.raises(D.DataError, match="prompts but"):
        D.encode_queries(tok, prompts, targets[:1], max_len=8)


def test_world_helpers():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config_file(os.path.join(root, "configs", "tiny.py"))
    world = W.make_world(cfg.world)
    tok = T.train_tokenizer(W.world_texts(world), cfg.tokenizer)
    prompts, targets = D.query_texts(world, "heldout")
    assert len(prompts) == cfg.world.n_heldout_queries
    assert len(D.query_texts(world, "all")[0]) == len(world.queries)
    tokens, weights = D.encode_queries(tok, prompts, targets, cfg.model.max_len)
    assert weights.sum() == sum(len(T.encode(tok, t)) for t in targets)
    stream = D.train_stream(tok, world, cfg.train.seq_len, cfg.train.batch_size, seed=0)
    assert stream.n_tokens == sum(len(T.encode(tok, t)) + 2 for t in D.corpus_texts(world))
    cand_tokens, _ = D.encode_texts(tok, D.candidate_texts(world), cfg.model.max_len)
    assert cand_tokens.shape == (len(world.candidates), cfg.model.max_len)


def test_mostly_unknown_examples_are_named(tok):
    # "zebra", "quux", "blorp" are not in the vocabulary: they encode as UNK.
    texts = ["the cat sat .", "zebra quux blorp", "the zebra", "zebra quux the cat sat"]
    with pytest.warns(D.MostlyUnknownWarning, match=r"1 text\(s\) of 4 .* positions \[1\]"):
        tokens, _ = D.encode_texts(tok, texts, max_len=8)
    assert (tokens[1, 1:4] == T.UNK).all()
    # Exactly half ("the zebra") is not "mostly"; a lower threshold reports it too.
    with pytest.warns(D.MostlyUnknownWarning, match=r"positions \[1, 2\]"):
        D.encode_texts(tok, texts, max_len=8, max_unk_frac=0.4)
    with pytest.raises(D.DataError, match=r"positions \[1\].*featurize.max_unk_frac"):
        D.encode_texts(tok, texts, max_len=8, unk_error=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        D.encode_texts(tok, texts, max_len=8, max_unk_frac=1.0)  # 1.0 never reports
        D.encode_texts(tok, texts[:1], max_len=8)
    # Skipped examples keep their positions in the report and are not themselves checked.
    too_long = "zebra quux blorp zebra quux blorp zebra quux"  # 9 tokens with BOS
    with pytest.warns(D.MostlyUnknownWarning, match=r"of 4 .* positions \[2\]"):
        D.encode_texts(tok, [too_long, *texts], 8, skip_too_long=True)


def test_mostly_unknown_queries_count_prompt_and_target(tok):
    prompts, targets = ["the cat sat on", "zebra quux"], ["a mat", "blorp"]
    with pytest.warns(D.MostlyUnknownWarning, match=r"1 query\(s\) of 2 .* positions \[1\]"):
        D.encode_queries(tok, prompts, targets, max_len=8)
    with pytest.raises(D.DataError, match=r"positions \[1\]"):
        D.encode_queries(tok, prompts, targets, max_len=8, unk_error=True)
