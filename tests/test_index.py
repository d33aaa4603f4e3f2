"""Scoring index: built once from a store, fit and preset; scored like ``score_preset``;
refused against other inputs; cached by the index stage."""

import os

import numpy as np
import pytest
from store_fixtures import store_meta
from tolerances import assert_close

from trackstar import cli, hessian, index, score, stages, store
from trackstar.attributor import Attributor
from trackstar.config import load_config_file
from trackstar.hessian import fit_hessian
from trackstar.score import score_preset

D, N, Q, K, CHUNK = 16, 90, 6, 8, 32
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs")
HCFG = dict(lambda_mix="auto_trace", crossing_per_65536=1000, damping=0.1, train_sample=0)


def make_store(path, vectors_NxD, correction="adam", skipped=(), chunk=CHUNK, **fields):
    """A finished store of ``vectors_NxD`` at positions ``0..N-1`` minus ``skipped``."""
    n = len(vectors_NxD)
    meta = store_meta(vectors_NxD.shape[1], n, chunk, correction=correction, **fields)
    vs = store.VectorStore.create(str(path), meta)
    skipped = set(skipped)
    for c in range(meta.num_chunks):
        lo, hi = meta.chunk_range(c)
        ids = np.array([i for i in range(lo, hi) if i not in skipped], np.int64)
        gone = [{"id": i, "reason": "too long"} for i in range(lo, hi) if i in skipped]
        vs.write_chunk(c, ids, vectors_NxD[ids], gone)
    vs.finalize()
    return store.VectorStore.open(str(path))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Corrected and raw stores (with skipped rows), queries and fits for each."""
    root = tmp_path_factory.mktemp("index")
    rng = np.random.default_rng(0)
    scale = np.geomspace(3, 0.2, D)
    cor = (rng.normal(size=(N, D)) * scale).astype(np.float32)
    raw = (rng.normal(size=(N, D)) * scale[::-1]).astype(np.float32)
    held = (rng.normal(size=(20, D)) * scale).astype(np.float32)
    q = (rng.normal(size=(Q, D)) * scale).astype(np.float32)
    cor_store = make_store(root / "cor", cor, skipped=(3, 40, 41))
    raw_store = make_store(root / "raw", raw, correction="none")
    return {
        "root": root,
        "cor": cor_store,
        "raw": raw_store,
        "q": q,
        "fit": fit_hessian(cor_store, held, HCFG, D),
        "fit_raw": fit_hessian(raw_store, None, HCFG, D),
        "held": held,
    }


@pytest.mark.parametrize(
    "preset, which, fit",
    [("trackstar", "cor", "fit"), ("exp_opt_norm", "cor", None), ("trak", "raw", "fit_raw")],
)
def test_index_scores_like_score_preset(inputs, preset, which, fit):
    vs, f = inputs[which], inputs[fit] if fit else None
    out = inputs["root"] / f"idx-{preset}"
    idx = index.build_index(vs, f, preset, out, progress=False, rows_per_step=24)
    assert idx.num_rows == vs.num_rows == N - (3 if which == "cor" else 0)
    assert np.array_equal(idx.store.read_ids(), vs.read_ids())
    assert idx.meta.skipped == vs.meta.skipped  # skipped examples carry over, reasons too
    ids, scores = index.score_index(idx, inputs["q"], K, fit=f, source=vs)
    ref_ids, ref_scores = score_preset(vs, inputs["q"], preset, f, K)
    assert np.array_equal(ids, ref_ids), preset
    assert_close(scores, ref_scores, rtol=1e-5, peak_rtol=1e-5, err_msg=preset)
    if idx.info.normalize:  # rows are stored finished: unit length
        _, rows = idx.store.read_all()
        assert_close(np.linalg.norm(rows, axis=1), np.ones(len(rows)))
    # Rebuilding into the same path is a no-op that reopens the finished index.
    again = index.build_index(vs, f, preset, out, progress=False)
    assert again.info == idx.info


def test_bfloat16_index_keeps_the_top_k(tmp_path):
    rng = np.random.default_rng(1)
    n, d, k = 1024, 64, 20
    vecs = (rng.normal(size=(n, d)) * np.geomspace(2, 0.1, d)).astype(np.float32)
    vs = make_store(tmp_path / "s", vecs, chunk=256)
    fit = fit_hessian(vs, vecs[:100], HCFG, d)
    q = rng.normal(size=(8, d)).astype(np.float32)
    f32 = index.build_index(vs, fit, "trackstar", tmp_path / "f32", progress=False)
    bf16 = index.build_index(vs, fit, "trackstar", tmp_path / "bf16", "bfloat16", progress=False)
    assert bf16.meta.dtype == "bfloat16"
    assert (
        os.path.getsize(os.path.join(bf16.path, "chunks", "00000000", "vectors", "c", "0", "0"))
        == 256 * d * 2
    )
    ids32, s32 = index.score_index(f32, q, k, fit=fit)
    ids16, s16 = index.score_index(bf16, q, k, fit=fit)
    overlap = np.mean([len(set(a) & set(b)) / k for a, b in zip(ids32, ids16, strict=True)])
    assert overlap >= 0.9, overlap
    assert_close(s16, s32, rtol=1e-2, peak_rtol=1e-2)


def test_index_refuses_another_store_fit_or_preset(inputs, tmp_path):
    vs, fit = inputs["cor"], inputs["fit"]
    idx = index.build_index(vs, fit, "trackstar", tmp_path / "idx", progress=False)
    rng = np.random.default_rng(2)
    other = make_store(tmp_path / "other", rng.normal(size=(N, D)).astype(np.float32))
    other_fit = fit_hessian(vs, inputs["held"][:10], HCFG, D)  # another R_eval: another R
    with pytest.raises(index.IndexMismatchError, match=r"(?s)store: .*Rebuild"):
        index.ScoringIndex.open(idx.path, source=other)
    with pytest.raises(index.IndexMismatchError, match="Hessian fit"):
        index.ScoringIndex.open(idx.path, fit=other_fit)
    with pytest.raises(index.IndexMismatchError, match="preset: the index is for 'trackstar'"):
        index.ScoringIndex.open(idx.path, preset="exp_opt_norm_rtrain")
    with pytest.raises(index.IndexMismatchError, match="Hessian fit"):
        index.score_index(idx, inputs["q"], K, fit=other_fit)
    with pytest.raises(index.ScoringIndexError, match="pass the fit"):
        index.score_index(idx, inputs["q"], K)
    index.ScoringIndex.open(idx.path, source=vs, fit=fit, preset="trackstar")  # its own: fine
    # The reference scorer refuses an index store (it would transform the rows twice).
    with pytest.raises(score.ScoreError, match="scoring index"):
        score.score_preset(idx.store, inputs["q"], "trackstar", fit, K)
    # A store is not an index; an index path of other inputs is not overwritten.
    with pytest.raises(index.ScoringIndexError, match="not a scoring index"):
        index.ScoringIndex.open(vs.path)
    with pytest.raises(index.IndexMismatchError, match="delete it"):
        index.build_index(vs, other_fit, "trackstar", idx.path, progress=False)
    # A preset whose correction the store lacks, and a missing fit, are refused up front.
    with pytest.raises(index.ScoringIndexError, match="optimizer correction"):
        index.build_index(inputs["raw"], fit, "trackstar", tmp_path / "x", progress=False)
    with pytest.raises(index.ScoringIndexError, match="needs a Hessian fit"):
        index.build_index(vs, None, "trackstar", tmp_path / "y", progress=False)


def test_stage_index_is_cached_and_rebuilt_after_a_refit(tmp_path, capsys):
    cfg = load_config_file(os.path.join(CONFIGS, "tiny.py"))
    cfg.run_dir = str(tmp_path / "run")
    rng = np.random.default_rng(3)
    label = stages.correction_kind(cfg, True)
    vecs = rng.normal(size=(N, D)).astype(np.float32)
    held = rng.normal(size=(20, D)).astype(np.float32)
    vs = make_store(stages.store_path(cfg, "candidates", True), vecs, correction=label)
    fit_path = stages.hessian_path(cfg, "candidates", True)
    fit_hessian(vs, held, HCFG, D).save(fit_path)

    before = stages.CACHE_MISSES["index"]
    out = stages.stage_index(cfg, "trackstar", progress=False)
    assert out == stages.index_path(cfg, "candidates", "trackstar")
    assert stages.CACHE_MISSES["index"] == before + 1
    assert stages.stage_index(cfg, "trackstar", progress=False) == out  # a cache hit
    assert stages.CACHE_MISSES["index"] == before + 1
    fit = stages.preset_fit(cfg, "trackstar", "candidates", vs)
    ids, scores = index.score_index(out, held[:4], 5, fit=fit, source=vs)
    ref_ids, ref_scores = score_preset(vs, held[:4], "trackstar", fit, 5)
    assert np.array_equal(ids, ref_ids)
    assert_close(scores, ref_scores)

    fit_hessian(vs, held[:8], HCFG, D).save(fit_path)  # a refit: the index is stale
    stages.stage_index(cfg, "trackstar", progress=False)
    assert stages.CACHE_MISSES["index"] == before + 2
    refit = stages.preset_fit(cfg, "trackstar", "candidates", vs)
    index.ScoringIndex.open(out, source=vs, fit=refit)

    # The command: the same stage, here a cache hit for float32 and a build for bfloat16.
    argv = ["--config", os.path.join(CONFIGS, "tiny.py"), f"--config.run_dir={cfg.run_dir}"]
    assert cli.main(["index", *argv, "--preset", "trackstar"]) == 0
    assert stages.CACHE_MISSES["index"] == before + 2
    assert cli.main(["index", *argv, "--preset", "trackstar", "--dtype", "bfloat16"]) == 0
    assert out in capsys.readouterr().out.splitlines()[0]
    assert os.path.isdir(stages.index_path(cfg, "candidates", "trackstar", "bfloat16"))


@pytest.mark.skipif(
    not hasattr(hessian, "LOW_RANK_MODES"), reason="this HessianFit has no low-rank form"
)
def test_low_rank_fit_is_applied_without_a_dense_matrix(inputs, tmp_path, monkeypatch):
    vs, q = inputs["cor"], inputs["q"]
    fit = fit_hessian(vs, inputs["held"][:4], {**HCFG, "low_rank": "always"}, D)
    assert fit.is_low_rank
    ref_ids, ref_scores = score_preset(vs, q, "trackstar", fit, K)  # materializes d x d itself
    # Building, fingerprinting and scoring go through HessianFit.apply, never the d x d matrix.
    monkeypatch.setattr(type(fit), "transform", lambda *_: pytest.fail("d x d transform used"))
    idx = index.build_index(vs, fit, "trackstar", tmp_path / "lr", progress=False)
    ids, scores = index.score_index(idx, q, K, fit=fit, source=vs)
    assert np.array_equal(ids, ref_ids)
    assert_close(scores, ref_scores, rtol=1e-4, peak_rtol=1e-4)


def test_attributor_with_an_index_ranks_like_without(inputs, tmp_path):
    """The scoring branch of ``Attributor.proponents_batch`` (query featurizing stubbed out)."""
    vs, fit, q = inputs["cor"], inputs["fit"], inputs["q"]
    idx = index.build_index(vs, fit, "trackstar", tmp_path / "idx", progress=False)
    att = Attributor.__new__(Attributor)
    att.__dict__.update(
        train_store=vs, hessian_fit=fit, preset="trackstar", texts=None, labels=None, mesh=None
    )
    att.rows_per_step, att.query_vectors = None, lambda prompts, targets: q[: len(prompts)]
    prompts, targets = ["p"] * Q, ["t"] * Q
    att.index = None
    plain = att.proponents_batch(prompts, targets, K)
    att.index = idx
    fast = att.proponents_batch(prompts, targets, K)
    for a, b in zip(plain, fast, strict=True):
        assert np.array_equal(a.ids, b.ids)
        assert_close(b.scores, a.scores)


def test_fit_is_hashed_and_checked_once_per_fit(inputs, tmp_path, monkeypatch):
    """Query batches after the first pay no d² fingerprint or finiteness pass; a new fit object
    (another R) is hashed afresh and a non-finite one refused."""
    vs, held = inputs["cor"], inputs["held"]
    fit = fit_hessian(vs, held, HCFG, D)
    idx = index.build_index(vs, fit, "trackstar", tmp_path / "idx", progress=False)
    calls = []
    real = index._hash_transforms
    monkeypatch.setattr(index, "_hash_transforms", lambda f, n: calls.append(1) or real(f, n))
    first = index.score_index(idx, inputs["q"], K, fit=fit)
    for _ in range(3):
        again = index.score_index(idx, inputs["q"], K, fit=fit)
        np.testing.assert_array_equal(again[0], first[0])
    assert calls == []  # hashed by build_index, before the counter
    refit = fit_hessian(vs, held, HCFG, D)  # equal content, another object: hashed once
    np.testing.assert_array_equal(index.score_index(idx, inputs["q"], K, fit=refit)[0], first[0])
    assert len(calls) == 1
    broken = fit_hessian(vs, held, HCFG, D)
    broken.transforms["mixed_inv_sqrt"][0, 0] = np.nan
    with pytest.raises(index.IndexMismatchError, match="Hessian fit"):
        index.score_index(idx, inputs["q"], K, fit=broken)
