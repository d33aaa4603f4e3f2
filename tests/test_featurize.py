"""Featurize loop: batches -> store chunks, bad examples, resume, non-finite refusal."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from store_fixtures import store_meta

from trackstar.featurize import (
    BadExampleError,
    Examples,
    compute_vectors,
    featurize_into_store,
    skipped_examples,
)
from trackstar.store import NonFiniteVectorError, VectorStore

D, N, T, CHUNK, BATCH = 6, 23, 5, 8, 4


@jax.jit
def _feature_fn(params, tokens_BxT, weights_BxT):
    """A deterministic stand-in for the gradient kernel: weighted token histograms."""
    onehot = jax.nn.one_hot(tokens_BxT, D)
    return params * jnp.sum(weights_BxT[..., None] * onehot, axis=1)


def _examples(n=N, seed=0) -> Examples:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, D, size=(n, T)).astype(np.int32)
    weights = np.ones((n, T), np.float32)
    weights[:, 0] = 0.0
    return Examples(tokens, weights)


def _dense(ex: Examples) -> np.ndarray:
    onehot = np.eye(D, dtype=np.float32)[ex.tokens_NxT]
    return 2.0 * np.sum(ex.weights_NxT[..., None] * onehot, axis=1)


def _store(path, n=N) -> VectorStore:
    meta = store_meta(
        D, n, CHUNK, projection={"mode": "global", "dim": D}, output_fn="train", correction="none"
    )
    return VectorStore.create(str(path), meta)


def test_compute_vectors_pads_last_batch_and_matches_formula():
    ex = _examples()
    got = compute_vectors(_feature_fn, 2.0, ex, BATCH)
    np.testing.assert_allclose(got, _dense(ex), rtol=0, atol=0)


def test_store_rows_equal_formula_and_resume_equals_uninterrupted(tmp_path):
    ex = _examples()
    full = _store(tmp_path / "full")
    featurize_into_store(_feature_fn, 2.0, ex, full, BATCH, progress=False)
    full.finalize()
    ids, vecs = VectorStore.open(str(tmp_path / "full")).read_all()
    np.testing.assert_array_equal(ids, np.arange(N))
    np.testing.assert_allclose(vecs, _dense(ex))

    # A run killed after its first chunk: the restart fills exactly the missing chunks.
    part = _store(tmp_path / "part")
    featurize_into_store(_feature_fn, 2.0, ex, part, BATCH, chunks=[0], progress=False)
    resumed = _store(tmp_path / "part")
    assert resumed.missing_chunks() == [1, 2]
    written = featurize_into_store(_feature_fn, 2.0, ex, resumed, BATCH, progress=False)
    assert written == N - CHUNK
    resumed.finalize()
    ids2, vecs2 = VectorStore.open(str(tmp_path / "part")).read_all()
    np.testing.assert_array_equal(ids2, ids)
    np.testing.assert_array_equal(vecs2, vecs)


def test_empty_example_refused_before_any_work_or_skipped_and_listed(tmp_path):
    ex = _examples()
    ex.weights_NxT[9] = 0.0
    vs = _store(tmp_path / "s")
    with pytest.raises(BadExampleError, match="id 9"):
        featurize_into_store(_feature_fn, 2.0, ex, vs, BATCH, progress=False)
    assert vs.committed_chunks() == []

    reasons = {3: "empty or longer than model.max_len"}
    ex = Examples(ex.tokens_NxT, ex.weights_NxT, reasons)
    assert skipped_examples(ex, skip=True) == {9: "no counted tokens", **reasons}
    featurize_into_store(_feature_fn, 2.0, ex, vs, BATCH, skip_bad_examples=True, progress=False)
    vs.finalize()
    done = VectorStore.open(str(tmp_path / "s"))
    assert sorted(s["id"] for s in done.meta.skipped) == [3, 9]
    assert 9 not in set(done.read_ids().tolist())


def test_non_finite_vector_names_example_and_commits_nothing(tmp_path):
    ex = _examples()

    def bad_fn(params, tokens, weights):
        return _feature_fn(params, tokens, weights).at[1].set(jnp.nan)

    vs = _store(tmp_path / "s")
    with pytest.raises(NonFiniteVectorError, match="1"):
        featurize_into_store(bad_fn, 2.0, ex, vs, BATCH, progress=False)
    assert vs.committed_chunks() == []
