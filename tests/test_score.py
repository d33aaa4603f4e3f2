"""Streaming scorer and presets against dense numpy formulas."""

import json

import numpy as np
import pytest
from store_fixtures import ArrayStore, store_meta
from tolerances import assert_close, assert_same_top_k

from trackstar.hessian import HessianError, fit_hessian
from trackstar.score import (
    PRESETS,
    ScoreError,
    get_preset,
    score_preset,
    top_k_scores,
    write_proponents,
)
from trackstar.store import VectorStore

D, N, Q, K = 8, 50, 5, 6


def _full_sort(scores_QxN, ids_N, k):
    """Reference top-k: score descending, then id ascending."""
    out_ids, out_scores = [], []
    for row in scores_QxN:
        order = np.lexsort((ids_N, -row))[:k]
        out_ids.append(ids_N[order])
        out_scores.append(row[order])
    return np.array(out_ids), np.array(out_scores)


def test_streaming_top_k_equals_full_sort_with_ties():
    rng = np.random.default_rng(0)
    # Small integers: exact float32 dot products with many exact ties.
    train = rng.integers(-1, 2, size=(N, D)).astype(np.float32)
    train[10] = train[3]  # duplicate rows tie on every query
    queries = rng.integers(-1, 2, size=(Q, D)).astype(np.float32)
    ids = 7 + 2 * np.arange(N)  # non-contiguous ids
    dense = queries @ train.T
    ref_ids, ref_scores = _full_sort(dense, ids, K)
    assert any(len(set(r)) < K for r in ref_scores)  # the reference does contain ties

    for chunk in (1, 7, 16, 64):
        chunks = [(ids[s : s + chunk], train[s : s + chunk]) for s in range(0, N, chunk)]
        got_ids, got_scores = top_k_scores(chunks, queries, None, None, False, K)
        assert got_ids.dtype == np.int64 and got_scores.dtype == np.float32
        np.testing.assert_array_equal(got_ids, ref_ids, err_msg=f"chunk={chunk}")
        np.testing.assert_array_equal(got_scores, ref_scores)

    # A fixed step size that splits the store's chunks and pads the last piece.
    calls = []
    store = ArrayStore(train, None, chunk=20, ids=ids)
    got_ids, _ = top_k_scores(
        store, queries, None, None, False, K, rows_per_step=16, progress=lambda *a: calls.append(a)
    )
    np.testing.assert_array_equal(got_ids, ref_ids)
    assert calls[-1] == (N, N) and len(calls) == 4

    # One query (scored as two rows inside): the same as its row of the batch.
    for j in (0, Q - 1):
        one_ids, one_scores = top_k_scores([(ids, train)], queries[j : j + 1], None, None, False, K)
        assert one_ids.shape == (1, K)
        np.testing.assert_array_equal(one_ids[0], ref_ids[j])
        np.testing.assert_array_equal(one_scores[0], ref_scores[j])

    # Fewer rows than k: everything, sorted.
    few_ids, few_scores = top_k_scores(train[:3], queries, None, None, False, K)
    assert few_ids.shape == (Q, 3)
    np.testing.assert_array_equal(few_ids, _full_sort(dense[:, :3], np.arange(3), 3)[0])


def test_top_k_rejects_bad_input():
    q = np.ones((2, D), np.float32)
    with pytest.raises(ScoreError, match="ascending"):
        top_k_scores([(np.array([3, 1]), np.ones((2, D)))], q, None, None, False, 2)
    with pytest.raises(ScoreError, match="d = "):
        top_k_scores(np.ones((4, D + 1)), q, None, None, False, 2)
    with pytest.raises(ScoreError, match="refit"):
        top_k_scores(np.ones((4, D)), q, np.eye(D + 1), None, False, 2)
    with pytest.raises(ScoreError, match="top_k"):
        top_k_scores(np.ones((4, D)), q, None, None, False, 0)


STORE_CHUNK = 16  # example positions per store chunk: N = 50 rows in chunks 0..3
_CLEAN_READ = VectorStore.read_chunk  # before any test patches it


def corrupt_store(path, monkeypatch, vectors_NxD, bad):
    """A finished VectorStore of ``vectors_NxD`` whose reads return ``bad[id]`` in row ``id``.

    write_chunk refuses NaN/inf rows, so the bad values are put in at read time, as a store
    corrupted on disk or written outside featurize returns them (independent of any on-disk
    checksum the store may verify first).
    """
    n, d = vectors_NxD.shape
    meta = store_meta(d, n, STORE_CHUNK)
    store = VectorStore.create(str(path), meta)
    for c in range(store.num_chunks):
        lo, hi = meta.chunk_range(c)
        store.write_chunk(c, np.arange(lo, hi), vectors_NxD[lo:hi])
    store.finalize()

    def read_chunk(self, chunk):
        ids_N, vecs_NxD = _CLEAN_READ(self, chunk)
        vecs_NxD = vecs_NxD.copy()
        for i, value in bad.items():
            vecs_NxD[ids_N == i] = value
        return ids_N, vecs_NxD

    monkeypatch.setattr(VectorStore, "read_chunk", read_chunk)
    return VectorStore.open(str(path))


def test_non_finite_train_rows_are_refused_naming_their_ids(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    train = rng.normal(size=(N, D)).astype(np.float32)
    queries = rng.normal(size=(Q, D)).astype(np.float32)
    store = corrupt_store(tmp_path / "s", monkeypatch, train, {37: np.nan})
    ids, _ = store.read_all()
    assert np.isnan(store.read_all()[1][37]).all() and len(ids) == N  # the injection works

    # One NaN row: every score of it is NaN, which top_k would rank first for every query.
    named = r"example ids \[37\] \(store chunks \[2\]\) against every query.*refeaturize"
    for rows_per_step in (None, 7):  # store chunks as they are, or split and padded
        with pytest.raises(ScoreError, match=named):
            top_k_scores(store, queries, None, None, True, K, rows_per_step=rows_per_step)
    with pytest.raises(ScoreError, match=named):
        score_preset(store, queries, "exp_opt_norm", None, K)

    # More rows than the message names: the lowest ids and the exact count.
    many = {i: np.inf for i in range(3, 45, 2)}
    store = corrupt_store(tmp_path / "many", monkeypatch, train, many)
    lowest = list(range(3, 35, 2))
    with pytest.raises(ScoreError, match=rf"example ids \{lowest}.*\(21 rows in all\)"):
        top_k_scores(store, queries, None, None, False, K)

    # A finite row that overflows float32 for one query only: that query is named.
    huge = train[5].copy()
    huge[0] = 1e30
    queries_small = queries.copy()
    queries_small[:, 0] = 0.0
    queries_small[3, 0] = 1e10
    store = corrupt_store(tmp_path / "huge", monkeypatch, train, {5: huge})
    with pytest.raises(ScoreError, match=r"example ids \[5\].*the queries at indices \[3\]"):
        top_k_scores(store, queries_small, None, None, False, K)
    # Alone, that query is every query (its internal second copy is never counted).
    with pytest.raises(ScoreError, match=r"example ids \[5\].*against every query"):
        top_k_scores(store, queries_small[3:4], None, None, False, K)
    # The same store is fine for queries that do not overflow with it.
    got_ids, got_scores = top_k_scores(store, queries_small[:3], None, None, False, K)
    assert np.isfinite(got_scores).all()


def test_non_finite_queries_and_transforms_are_refused():
    rng = np.random.default_rng(3)
    train = rng.normal(size=(N, D)).astype(np.float32)
    queries = rng.normal(size=(Q, D)).astype(np.float32)
    bad_q = queries.copy()
    bad_q[2, 1] = np.nan
    bad_q[4, 0] = -np.inf
    with pytest.raises(ScoreError, match=r"indices \[2, 4\].*refeaturize the queries"):
        top_k_scores(train, bad_q, None, None, True, K)
    bad_t = np.eye(D, dtype=np.float32)
    bad_t[1, 1] = np.nan
    with pytest.raises(ScoreError, match="query_transform.*refit"):
        top_k_scores(train, queries, None, bad_t, True, K)
    with pytest.raises(ScoreError, match="train_transform.*refit"):
        top_k_scores(train, queries, bad_t, np.eye(D), True, K)
    # Finite inputs whose transformed query overflows float32.
    with pytest.raises(ScoreError, match=r"queries at indices \[0, 1, 2, 3, 4\] overflow"):
        top_k_scores(train, queries * 1e30, None, np.eye(D) * 1e30, False, K)


def _inv_root(R, power, damping=0.1):
    lam, V = np.linalg.eigh(R)
    lam = np.clip(lam, 0, None)
    return V @ np.diag((lam + damping * lam.mean()) ** power) @ V.T


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_presets_match_dense_formulas():
    rng = np.random.default_rng(1)
    scale = np.geomspace(3, 0.2, D)
    raw = (rng.normal(size=(N, D)) * scale).astype(np.float32)  # uncorrected train store
    cor = (rng.normal(size=(N, D)) * scale[::-1]).astype(np.float32)  # corrected train store
    q_raw = rng.normal(size=(Q, D)).astype(np.float32)
    q_cor = (rng.normal(size=(Q, D)) * scale).astype(np.float32)
    held = (rng.normal(size=(12, D)) * scale).astype(np.float32)  # R_eval source
    cfg = dict(lambda_mix="auto_trace", crossing_per_65536=1000, damping=0.1, train_sample=0)
    raw_store = ArrayStore(raw, {"dim": D, "correction": "none"}, chunk=16)
    cor_store = ArrayStore(cor, {"dim": D, "correction": "adam"}, chunk=16)
    fit_raw = fit_hessian(raw_store, None, cfg, D)
    fit_cor = fit_hessian(cor_store, held, cfg, D)

    R_raw = raw.astype(np.float64).T @ raw / N
    R_tr = cor.astype(np.float64).T @ cor / N
    R_ev = held.astype(np.float64).T @ held / len(held)
    lam = np.trace(R_tr) / (np.trace(R_ev) + np.trace(R_tr))
    R_mix = lam * R_ev + (1 - lam) * R_tr
    qr, qc = q_raw.astype(np.float64), q_cor.astype(np.float64)
    expected = {
        "grad_dot": qr @ raw.T,
        "grad_cosine": _unit(qr) @ _unit(raw).T,
        "trak": qr @ _inv_root(R_raw, -1.0) @ raw.T,
        "exp_opt": qc @ cor.T,
        "exp_opt_norm": _unit(qc) @ _unit(cor).T,
        "exp_opt_norm_rtrain": _unit(qc @ _inv_root(R_tr, -0.5))
        @ _unit(cor @ _inv_root(R_tr, -0.5)).T,
        "trackstar": _unit(qc @ _inv_root(R_mix, -0.5)) @ _unit(cor @ _inv_root(R_mix, -0.5)).T,
        "step_influence": qr @ cor.T,  # raw query against corrected candidates
    }
    assert set(expected) == set(PRESETS)
    for name, dense in expected.items():
        spec = get_preset(name)
        store, fit = (cor_store, fit_cor) if spec.corrected else (raw_store, fit_raw)
        q = q_cor if spec.query_side_corrected else q_raw
        ids, scores = score_preset(store, q, name, fit, K)
        ref_ids, ref_scores = _full_sort(dense, np.arange(N), K)
        tol = 1e-4 * np.abs(dense).max()
        np.testing.assert_allclose(scores, ref_scores, atol=tol, err_msg=name)
        np.testing.assert_allclose(np.take_along_axis(dense, ids, 1), scores, atol=tol)
        assert (ids == ref_ids).mean() > 0.9, name  # only float32 near-ties may swap

    # The wrong store for the preset, a missing fit or a mismatched fit are refused.
    with pytest.raises(ScoreError, match="optimizer correction"):
        score_preset(raw_store, q_raw, "trackstar", fit_cor, K)
    with pytest.raises(ScoreError, match="fit_hessian"):
        score_preset(cor_store, q_cor, "exp_opt_norm_rtrain", None, K)
    with pytest.raises(ScoreError, match="refit"):
        score_preset(cor_store, q_cor, "trackstar", fit_raw, K)  # no mixed transform
    with pytest.raises(ScoreError, match="refit"):
        score_preset(np.ones((4, D + 2)), np.ones((2, D + 2)), "trackstar", fit_cor, K)
    with pytest.raises(ScoreError, match="unknown preset"):
        get_preset("trackstar2")
    assert not isinstance(ScoreError("x"), HessianError) and isinstance(ScoreError("x"), ValueError)


def test_write_proponents(tmp_path):
    ids = np.array([[2, 0], [1, 2]])
    scores = np.array([[0.5, 0.25], [1.0, -1.0]], np.float32)
    queries = [
        {"query_id": "q0", "prompt": "Ada was born in", "target": "Paris"},
        {"query_id": "q1", "prompt": "Bo speaks", "target": "Greek"},
    ]
    texts = {0: "zero", 1: "one", 2: "two"}
    jl, nz = str(tmp_path / "out" / "p.jsonl"), str(tmp_path / "out" / "p.npz")
    write_proponents(jl, nz, queries, ids, scores, texts)
    rows = [json.loads(line) for line in open(jl)]
    assert rows[1] == {
        "query_id": "q1",
        "prompt": "Bo speaks",
        "target": "Greek",
        "proponent_ids": [1, 2],
        "scores": [1.0, -1.0],
        "texts": ["one", "two"],
    }
    with np.load(nz) as z:
        np.testing.assert_array_equal(z["ids"], ids)
        np.testing.assert_array_equal(z["scores"], scores)
        assert list(z["query_ids"]) == ["q0", "q1"]
    write_proponents(
        jl, nz, [{**q, "query_id": i} for i, q in enumerate(queries)], ids, scores, None
    )
    with np.load(nz) as z:
        assert z["query_ids"].dtype == np.int64 and list(z["query_ids"]) == [0, 1]
    assert json.loads(open(jl).readline())["texts"] is None
    with pytest.raises(ScoreError, match="no text"):
        write_proponents(jl, nz, queries, ids, scores, {0: "zero"})
    with pytest.raises(ScoreError, match="line up"):
        write_proponents(jl, nz, queries[:1], ids, scores, texts)


def test_streaming_loops_bound_the_steps_queued_on_the_device(monkeypatch):
    """Scoring and the Gauss-Newton sum block on every second step's output, so asynchronous
    dispatch cannot queue every block of a large store (memory would grow with N)."""
    import jax

    from trackstar.hessian import gauss_newton

    waits = []
    real = jax.block_until_ready
    monkeypatch.setattr(jax, "block_until_ready", lambda x: waits.append(1) or real(x))
    rng = np.random.default_rng(0)
    u_NxD = rng.standard_normal((48, 8)).astype(np.float32)
    top_k_scores(u_NxD, u_NxD[:3], None, None, True, 5, rows_per_step=8)
    assert len(waits) == 3  # 6 steps of 8 rows
    waits.clear()
    R, _ = gauss_newton(u_NxD, rows_per_step=4)
    assert len(waits) == 6  # 12 steps of 4 rows
    assert_close(R, u_NxD.T.astype(np.float64) @ u_NxD / 48, rtol=1e-5, peak_rtol=1e-6)


def test_top_k_comparison_allows_swaps_only_inside_ties():
    want_ids, want = np.array([[3, 1, 2, 0]]), np.array([[0.9, 0.5, 0.5 + 1e-6, 0.1]])
    assert_same_top_k(np.array([[3, 2, 1, 0]]), want, want_ids, want)  # a near-tie swapped
    with pytest.raises(AssertionError, match="outside a tie"):
        assert_same_top_k(np.array([[1, 3, 2, 0]]), want, want_ids, want)
    with pytest.raises(AssertionError, match="different ids"):  # not at the cut-off
        assert_same_top_k(np.array([[3, 7, 2, 0]]), want, [[3, 5, 2, 0]], [[0.9, 0.5, 0.5, 0.1]])
    assert_same_top_k(np.array([[3, 1, 2, 7]]), want, want_ids, [[0.9, 0.5, 0.5, 0.1]])  # cut-off
