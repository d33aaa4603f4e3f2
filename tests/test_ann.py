"""Approximate top-k (faiss): the flat kind and IVF probing every cell rank like score_index;
fewer cells return valid rows; saved files reload and refuse another index."""

import importlib.util
import os
import sys

import numpy as np
import pytest
from test_index import HCFG, make_store
from tolerances import assert_same_top_k, scaled_atol

from trackstar import ann, index
from trackstar.hessian import fit_hessian

# Every test but the missing-faiss one needs faiss (the `test` extra installs it).
needs_faiss = pytest.mark.skipif(
    importlib.util.find_spec("faiss") is None, reason="faiss is not installed"
)

D, N, Q, K, CHUNK, NLIST = 16, 600, 6, 10, 128, 8
SKIPPED = (3, 200, 201)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A corrected store with skipped rows, its fit, float32 and bfloat16 trackstar indexes."""
    root = tmp_path_factory.mktemp("ann")
    rng = np.random.default_rng(0)
    scale = np.geomspace(3, 0.2, D)
    vecs = (rng.normal(size=(N, D)) * scale).astype(np.float32)
    vs = make_store(root / "store", vecs, chunk=CHUNK, skipped=SKIPPED)
    fit = fit_hessian(vs, (rng.normal(size=(40, D)) * scale).astype(np.float32), HCFG, D)
    out = {
        "root": root,
        "store": vs,
        "fit": fit,
        "q": (rng.normal(size=(Q, D)) * scale).astype(np.float32),
    }
    for dtype in ("float32", "bfloat16"):
        out[dtype] = index.build_index(
            vs, fit, "trackstar", root / f"idx-{dtype}", dtype, progress=False
        )
    return out


def exact(inputs, idx, k=K):
    return index.score_index(idx, inputs["q"], k, fit=inputs["fit"])


def assert_matches_exact(got, want, err_msg=""):
    # float32 dot products in another summation order: a tolerance scaled to the scores.
    assert_same_top_k(*got, *want, atol=scaled_atol(want[1], 1e-5), err_msg=err_msg)


@needs_faiss
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_flat_ranks_like_score_index(inputs, dtype):
    idx = inputs[dtype]
    flat = ann.build_ann(idx, "flat", progress=False)
    assert flat.num_rows == N - len(SKIPPED) and flat.nlist is None
    got = ann.score_ann(flat, idx, inputs["q"], K, fit=inputs["fit"])
    assert got[0].dtype == np.int64 and got[1].dtype == np.float32
    assert not np.isin(got[0], SKIPPED).any()  # rows keep their example ids
    assert_matches_exact(got, exact(inputs, idx), dtype)
    # More than the index holds: every row, like score_index.
    assert_matches_exact(
        ann.score_ann(flat, idx, inputs["q"], 10 * N, fit=inputs["fit"]),
        exact(inputs, idx, 10 * N),
    )


@needs_faiss
def test_ivf_probing_every_cell_is_exact_and_builds_reproducibly(inputs):
    idx = inputs["float32"]
    ivf = ann.build_ann(idx, "ivf", nlist=NLIST, progress=False)
    assert (ivf.kind, ivf.nlist, ivf.nprobe) == ("ivf", NLIST, ann.default_nprobe(NLIST))
    got = ann.score_ann(ivf, idx, inputs["q"], K, fit=inputs["fit"], nprobe=NLIST)
    assert_matches_exact(got, exact(inputs, idx))
    # Same rows and seed: same k-means cells, so the same approximate answer at nprobe = 1.
    again = ann.build_ann(idx, "ivf", nlist=NLIST, progress=False)
    one = ann.score_ann(ivf, idx, inputs["q"], K, fit=inputs["fit"], nprobe=1)
    assert np.array_equal(
        one[0], ann.score_ann(again, idx, inputs["q"], K, fit=inputs["fit"], nprobe=1)[0]
    )
    with pytest.raises(ann.AnnError, match="nprobe must lie"):
        ivf.search(np.zeros((1, D), np.float32), K, nprobe=NLIST + 1)
    with pytest.raises(ann.AnnError, match="nprobe must lie"):  # refused before the build
        ann.build_ann(idx, "ivf", nlist=4, nprobe=5, progress=False)
    with pytest.raises(ann.AnnError, match="kind must be one of"):
        ann.build_ann(idx, "hnsw", progress=False)


@needs_faiss
def test_ivf_with_few_cells_returns_true_scores_of_real_rows(inputs):
    idx, fit = inputs["float32"], inputs["fit"]
    ivf = ann.build_ann(idx, "ivf", nlist=NLIST, progress=False)
    ids, scores = ann.score_ann(ivf, idx, inputs["q"], K, fit=fit, nprobe=1)
    ref_ids, ref_scores = exact(inputs, idx)
    all_ids, rows = idx.store.read_all()
    q = index.prepare_queries(idx, inputs["q"], fit)
    atol = scaled_atol(ref_scores, 1e-5)
    for r in range(Q):
        found = ids[r] >= 0  # a cell may hold fewer than k rows
        assert found.any()
        assert np.all(np.diff(scores[r][found]) <= atol)  # best first
        # Each returned id is an indexed row and its score is that row's exact score ...
        pos = np.searchsorted(all_ids, ids[r][found])
        assert np.array_equal(all_ids[pos], ids[r][found])
        np.testing.assert_allclose(scores[r][found], rows[pos] @ q[r], atol=atol)
        # ... so it can miss rows, never beat the exact top-k.
        assert scores[r][found][0] <= ref_scores[r][0] + atol
        assert np.all(scores[r][~found] == -np.inf)
    recall = np.mean([len(set(a) & set(b)) / K for a, b in zip(ids, ref_ids, strict=True)])
    assert 0 < recall <= 1


@needs_faiss
def test_save_load_round_trip(inputs, tmp_path):
    idx, fit, q = inputs["float32"], inputs["fit"], inputs["q"]
    ivf = ann.build_ann(idx, "ivf", nlist=NLIST, nprobe=3, progress=False)
    path = str(tmp_path / "ann" / "ivf.faiss")
    ivf.save(path)
    assert sorted(os.listdir(tmp_path / "ann")) == ["ivf.faiss", "ivf.faiss.json"]  # no tmp
    back = ann.AnnIndex.load(path, idx)
    assert (back.kind, back.nlist, back.nprobe, back.num_rows) == ("ivf", NLIST, 3, ivf.num_rows)
    for nprobe in (None, 1, NLIST):
        a = ann.score_ann(ivf, idx, q, K, fit=fit, nprobe=nprobe)
        b = ann.score_ann(back, idx, q, K, fit=fit, nprobe=nprobe)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


@needs_faiss
def test_load_and_score_refuse_another_index(inputs, tmp_path):
    idx = inputs["float32"]
    flat = ann.build_ann(idx, "flat", progress=False)
    path = str(tmp_path / "flat.faiss")
    flat.save(path)
    rng = np.random.default_rng(5)
    other_store = make_store(tmp_path / "o", rng.normal(size=(N, D)).astype(np.float32))
    other = index.build_index(other_store, None, "exp_opt_norm", tmp_path / "oi", progress=False)
    with pytest.raises(ann.AnnMismatchError, match=r"(?s)store_fingerprint.*preset.*build_ann"):
        ann.AnnIndex.load(path, other)
    with pytest.raises(ann.AnnMismatchError, match="build_ann"):
        ann.score_ann(flat, other, inputs["q"], K)
    # The same source store, fit and preset in another dtype: other rows, refused too.
    with pytest.raises(ann.AnnMismatchError, match="dtype"):
        ann.AnnIndex.load(path, inputs["bfloat16"])
    # A faiss file that is not the one its record describes (an interrupted save).
    with open(path, "ab") as f:
        f.write(b"\0")
    with pytest.raises(ann.AnnError, match="interrupted save"):
        ann.AnnIndex.load(path, idx)
    with pytest.raises(ann.AnnError, match="no readable ANN record"):
        ann.AnnIndex.load(str(tmp_path / "none.faiss"), idx)


def test_missing_faiss_names_the_install(inputs, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss now raises ImportError
    with pytest.raises(ann.AnnError, match=r"pip install 'trackstar\[ann\]'.*faiss-cpu"):
        ann.build_ann(inputs["float32"], "flat", progress=False)


@needs_faiss
def test_benchmark_reports_recall_and_speed(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts"))
    from ann_benchmark import run_ann_benchmark

    base = np.random.default_rng(7).normal(size=(300, 48)).astype(np.float32)
    n, nlist = 6000, ann.default_nlist(6000)
    out = run_ann_benchmark(base, n_rows=n, dim=32, n_queries=8, nprobe=nlist, nprobes=(1, 2))
    assert (out["ann_n_rows"], out["ann_dim"], out["ann_nlist"]) == (n, 32, nlist)
    # Probing every cell is exact: the flat top-10 exactly.
    assert out["ann_nprobe"] == nlist and out["ann_recall_at_10"] == 1.0
    assert [r["nprobe"] for r in out["ann_sweep"]] == [1, 2, nlist]
    assert all(0 < r["recall_at_10"] <= 1 and r["query_s"] > 0 for r in out["ann_sweep"])
    assert out["ann_speedup"] == out["ann_flat_query_s"] / out["ann_query_s"]
