"""Hessian stage: Gauss-Newton accumulation, λ rules, inverse roots, fit save/load."""

import json

import numpy as np
import pytest
from store_fixtures import ArrayStore
from tolerances import assert_close

from trackstar.hessian import (
    HessianError,
    HessianFit,
    crossing_component,
    fit_from_moments,
    fit_hessian,
    gauss_newton,
    inverse_sqrt,
    mix_lambda,
    root_coefficients,
    sample_rows,
    use_low_rank,
)
from trackstar.rows import source_meta
from trackstar.store import StoreMeta, StoreMismatchError, VectorStore

D = 12


def _vectors(n, d=D, seed=0, scale=None):
    rng = np.random.default_rng(seed)
    u = rng.normal(size=(n, d))
    if scale is not None:
        u = u * scale
    return u.astype(np.float32)


def _damped_inverse(R, damping):
    """R^{-1} by the explicit eigh formula: eigenvalues clipped at 0, plus damping · mean."""
    lam_i, V = np.linalg.eigh(R)
    lam_i = np.clip(lam_i, 0, None)
    return V @ np.diag(1 / (lam_i + damping * lam_i.mean())) @ V.T


def _chunks(u, sizes, ids=None):
    ids = np.arange(len(u)) if ids is None else ids
    out, start = [], 0
    for s in sizes:
        out.append((ids[start : start + s], u[start : start + s]))
        start += s
    assert start == len(u)
    return out


# R is a Kahan-compensated float32 sum on the devices: float64 to about 1e-7 of its scale.
R_TOL = 1e-6


def test_gauss_newton_streaming_equals_dense_and_samples():
    u = _vectors(37)
    dense = u.astype(np.float64).T @ u.astype(np.float64) / len(u)
    for source in (u, _chunks(u, [5, 1, 20, 11])):
        R, n = gauss_newton(source)
        assert n == 37 and R.dtype == np.float64
        assert_close(R, dense, rtol=R_TOL, peak_rtol=R_TOL)
    R_step, _ = gauss_newton(u, rows_per_step=4)
    assert_close(R_step, dense, rtol=R_TOL, peak_rtol=R_TOL)

    # Sampling by position and by (non-contiguous) example id pick the same rows.
    pos = sample_rows(37, 10, seed=3)
    assert pos is not None and len(pos) == 10 and np.all(np.diff(pos) > 0)
    np.testing.assert_array_equal(pos, sample_rows(37, 10, seed=3))
    assert not np.array_equal(pos, sample_rows(37, 10, seed=4))
    assert sample_rows(37, 0, 0) is None and sample_rows(37, 37, 0) is None
    sub = u[pos].astype(np.float64)
    ids = 100 + 3 * np.arange(37)
    R_pos, n_pos = gauss_newton(_chunks(u, [9, 9, 19]), sample_positions=pos)
    R_ids, n_ids = gauss_newton(_chunks(u, [30, 7], ids=ids), sample_ids=ids[pos])
    assert n_pos == n_ids == 10
    assert_close(R_pos, sub.T @ sub / 10, rtol=R_TOL, peak_rtol=R_TOL)
    assert_close(R_ids, sub.T @ sub / 10, rtol=R_TOL, peak_rtol=R_TOL)

    with pytest.raises(HessianError, match="no rows"):
        gauss_newton(u, sample_ids=np.array([999]))
    bad = u.copy()
    bad[3, 2] = np.nan
    with pytest.raises(HessianError, match="non-finite"):
        gauss_newton(bad)


def test_inverse_sqrt_whitens_and_matches_eigh_formula():
    u = _vectors(40).astype(np.float64)
    R = u.T @ u / len(u)
    T, evals = inverse_sqrt(R, damping=0.0)
    assert_close(T @ R @ T, np.eye(D), rtol=0, peak_rtol=1e-9)
    assert np.all(np.diff(evals) <= 0)  # descending

    # Rank-deficient R (5 rows in 12 dims): negatives clipped, then damped by 0.1·mean.
    v = _vectors(5).astype(np.float64)
    R_low = v.T @ v / 5
    lam_i, V = np.linalg.eigh(R_low)
    lam_i = np.clip(lam_i, 0, None)
    damped = lam_i + 0.1 * lam_i.mean()
    expect_sqrt = V @ np.diag(damped**-0.5) @ V.T
    T_low, e_low = inverse_sqrt(R_low, 0.1)
    assert_close(T_low, expect_sqrt, rtol=1e-8, peak_rtol=1e-8)
    assert_close(T_low @ T_low, _damped_inverse(R_low, 0.1), rtol=1e-8, peak_rtol=1e-8)
    assert_close(e_low, np.sort(lam_i)[::-1], rtol=0, peak_rtol=1e-12)
    assert np.all(e_low >= 0)

    with pytest.raises(HessianError, match="damping"):
        inverse_sqrt(R_low, 0.0)  # singular and undamped
    with pytest.raises(HessianError, match="damping"):
        inverse_sqrt(R, -1.0)


def test_mix_lambda_rules():
    # Different spectral shapes so the two curves genuinely cross.
    u_eval = _vectors(30, seed=1, scale=np.geomspace(10, 0.01, D))
    u_train = _vectors(50, seed=2, scale=np.geomspace(2, 0.5, D))
    R_eval = u_eval.T.astype(np.float64) @ u_eval / 30
    R_train = u_train.T.astype(np.float64) @ u_train / 50
    e_eval = np.sort(np.linalg.eigvalsh(R_eval))[::-1]
    e_train = np.sort(np.linalg.eigvalsh(R_train))[::-1]

    crossing = 5 * 65536 / D  # c = 5
    c = crossing_component(D, crossing)
    assert c == 5
    lam = mix_lambda(R_eval, R_train, "auto", D, crossing)
    assert 0 < lam < 1
    np.testing.assert_allclose(lam * e_eval[c], (1 - lam) * e_train[c], rtol=1e-10)
    gap = lam * e_eval - (1 - lam) * e_train
    assert gap[0] > 0 and gap[-1] < 0  # the curves do cross
    # Precomputed spectra give the same λ.
    lam2 = mix_lambda(None, None, "auto", D, crossing, eig_eval=e_eval, eig_train=e_train)
    assert lam2 == pytest.approx(lam, rel=1e-12)

    lam_t = mix_lambda(R_eval, R_train, "auto_trace", D)
    np.testing.assert_allclose(lam_t * np.trace(R_eval), (1 - lam_t) * np.trace(R_train))

    assert mix_lambda(R_eval, R_train, 0.9, D) == 0.9
    assert mix_lambda(R_eval, R_train, "0.25", D) == 0.25
    assert mix_lambda(R_eval, R_train, 1, D) == 1.0
    for bad in ("1.5", -0.1, "nan", "sometimes", True):
        with pytest.raises(HessianError, match="lambda_mix"):
            mix_lambda(R_eval, R_train, bad, D)
    with pytest.raises(HessianError, match="shape"):
        mix_lambda(R_eval, R_train, "auto", D + 1)


def _cfg(**kw):
    cfg = dict(lambda_mix="auto", crossing_per_65536=2 * 65536 / D, damping=0.1, train_sample=0)
    cfg["sample_seed"] = 0
    cfg.update(kw)
    return cfg


def test_fit_hessian_dense_reference_save_load_and_mismatch(tmp_path):
    u_train = _vectors(40, seed=5)
    u_eval = _vectors(9, seed=6, scale=np.linspace(3, 0.1, D))
    meta = {"dim": D, "model_fingerprint": "abc", "projection": {"seed": 0}, "correction": "adam"}
    store = ArrayStore(u_train, meta)
    fit = fit_hessian(store, u_eval, _cfg(train_sample=25), D, provenance={"train_path": "x"})

    pos = sample_rows(40, 25, 0)
    Rt = u_train[pos].astype(np.float64).T @ u_train[pos] / 25
    Re = u_eval.astype(np.float64).T @ u_eval / 9
    lam = mix_lambda(Re, Rt, "auto", D, 2 * 65536 / D)
    # R_train is a float32 device sum (R_TOL of float64); λ and the spectra follow it.
    assert fit.lambda_mix == pytest.approx(lam, rel=R_TOL)
    mixed, evals = inverse_sqrt(lam * Re + (1 - lam) * Rt, 0.1)
    np.testing.assert_allclose(fit.transform("mixed_inv_sqrt"), mixed, rtol=2e-5, atol=1e-5)
    np.testing.assert_allclose(fit.transform("train_inv"), _damped_inverse(Rt, 0.1), rtol=2e-5)
    assert_close(fit.eigenvalues, evals, rtol=R_TOL, peak_rtol=R_TOL)
    # 9 eval rows < d: the spectrum comes from the 9×9 Gram matrix, padded with zeros.
    e_dense = np.clip(np.sort(np.linalg.eigvalsh(Re))[::-1], 0, None)
    np.testing.assert_allclose(fit.eig_eval, e_dense, rtol=1e-9, atol=1e-12)
    assert np.all(fit.eig_eval[9:] == 0)
    assert fit.provenance["train_rows_used"] == 25 and fit.provenance["train_path"] == "x"
    assert fit.provenance["train_meta"]["model_fingerprint"] == "abc"

    path = str(tmp_path / "hessian" / "fit.npz")
    fit.save(path)
    back = HessianFit.load(path)
    assert (back.dim, back.lambda_mix, back.damping, back.rule) == (D, fit.lambda_mix, 0.1, "auto")
    for name in ("mixed_inv_sqrt", "train_inv_sqrt", "train_inv"):
        np.testing.assert_array_equal(back.transform(name), fit.transform(name))
    np.testing.assert_array_equal(back.eig_eval, fit.eig_eval)
    np.testing.assert_array_equal(back.eig_train, fit.eig_train)
    assert back.provenance == json.loads(json.dumps(fit.provenance))
    readable = json.loads((tmp_path / "hessian" / "fit.json").read_text())
    assert readable["lambda_mix"] == pytest.approx(lam)

    # A d that does not match is refused with a message to refit.
    with pytest.raises(HessianError, match="refit"):
        back.check_dim(D + 4)
    with pytest.raises(HessianError, match="refit"):
        back.check_compatible({**meta, "dim": 2 * D})
    with pytest.raises(HessianError, match="model_fingerprint"):
        back.check_compatible({**meta, "model_fingerprint": "zzz"})
    back.check_compatible(meta)
    with pytest.raises(HessianError, match="d = "):
        fit_hessian(u_train, None, _cfg(), D + 1)
    with pytest.raises(HessianError, match="eval"):
        fit_hessian(u_train, None, _cfg(), D, transforms=["mixed_inv_sqrt"])
    train_only = fit_hessian(u_train, None, _cfg(), D)
    assert train_only.lambda_mix is None and sorted(train_only.transforms) == [
        "train_inv",
        "train_inv_sqrt",
    ]
    with pytest.raises(HessianError, match="mixed_inv_sqrt"):
        train_only.transform("mixed_inv_sqrt")


def _real_store(path, u, seed=0, correction_settings=None):
    meta = StoreMeta(
        kind="train",
        dim=u.shape[1],
        dtype="float32",
        num_examples=len(u),
        chunk_size=len(u),
        model_fingerprint="m",
        optimizer_fingerprint="o",
        projection={"mode": "global", "seed": seed, "dim": u.shape[1]},
        output_fn="train",
        correction="adam",
        correction_settings=correction_settings or {"eps": 1e-8, "v_floor": 1e-4},
    )
    vs = VectorStore.create(str(path), meta)
    vs.write_chunk(0, np.arange(len(u)), u)
    vs.finalize()
    return VectorStore.open(str(path))


def test_fit_refuses_an_eval_store_featurized_another_way(tmp_path):
    u_train, u_eval = _vectors(30, seed=1), _vectors(9, seed=2)
    train = _real_store(tmp_path / "train", u_train)
    fit_hessian(train, _real_store(tmp_path / "same", u_eval), _cfg(), D)  # compatible
    other_seed = _real_store(tmp_path / "seed1", u_eval, seed=1)
    with pytest.raises(StoreMismatchError, match=r"projection.seed: train=0, R_eval=1"):
        fit_hessian(train, other_seed, _cfg(), D)
    other_eps = _real_store(tmp_path / "eps", u_eval, correction_settings={"eps": 1e-3})
    with pytest.raises(StoreMismatchError, match=r"correction_settings.eps"):
        fit_hessian(train, other_eps, _cfg(), D)
    # A caller that reduces R itself hands the metadata to fit_from_moments, which checks it.
    R = u_train.astype(np.float64).T @ u_train / len(u_train)
    prov = {"train_meta": source_meta(train), "eval_meta": source_meta(other_seed)}
    with pytest.raises(StoreMismatchError, match=r"projection.seed"):
        fit_from_moments(R, R, _cfg(), D, provenance=prov)


# ----------------------------------------------------------------------------- low rank

DL, NT, NE = 64, 20, 10  # n_t + n_e = 30 < d: R has rank <= 30, the low-rank form applies
CROSS_L = 5 * 65536 / DL  # "auto": c = 5, below both ranks, so the curves cross inside them
# Low-rank fits of float32 rows: Gram and basis products in float32 BLAS (blocks summed in
# float64), about sqrt(d) float32 roundings per entry.
F32_PRODUCT_TOL = 20 * np.sqrt(DL) * np.finfo(np.float32).eps


def _low_rank_rows(seed=0):
    u_train = _vectors(NT, DL, seed=seed, scale=np.geomspace(3, 0.1, DL))
    u_eval = _vectors(NE, DL, seed=seed + 1, scale=np.geomspace(0.2, 4, DL))
    return u_train, u_eval


def _dense_reference(u_train, u_eval, rule, damping=0.1):
    """λ, the three transforms and the spectra by the d×d float64 eigh formulas."""
    Rt = u_train.astype(np.float64).T @ u_train / len(u_train)
    Re = u_eval.astype(np.float64).T @ u_eval / len(u_eval)
    lam = mix_lambda(Re, Rt, rule, DL, CROSS_L)
    mixed, evals = inverse_sqrt(lam * Re + (1 - lam) * Rt, damping)
    t_sqrt, e_train = inverse_sqrt(Rt, damping)
    T = {
        "mixed_inv_sqrt": mixed,
        "train_inv_sqrt": t_sqrt,
        "train_inv": _damped_inverse(Rt, damping),
    }
    return lam, T, evals, e_train


def test_root_coefficients_are_the_differences_of_powers():
    s = np.array([0.0, 1e-12, 0.3, 2.0, 1e6])
    for power in (-0.5, -1.0):
        coef, scale = root_coefficients(s, 0.7, power)
        assert scale == pytest.approx(0.7**power, rel=1e-15)
        assert_close(coef, (s + 0.7) ** power - 0.7**power, rtol=1e-12, peak_rtol=1e-15)
        assert coef[0] == 0 and coef[1] < 0  # no cancellation to 0 for s << δ
    with pytest.raises(HessianError, match="power"):
        root_coefficients(s, 0.7, 0.5)


@pytest.mark.parametrize("rule", ["auto", "auto_trace", 0.3])
@pytest.mark.parametrize("row_dtype", [np.float32, np.float64])
def test_low_rank_fit_equals_the_dense_eigh_path(rule, row_dtype):
    u_train, u_eval = (u.astype(row_dtype) for u in _low_rank_rows())
    fit = fit_hessian(u_train, u_eval, _cfg(lambda_mix=rule, crossing_per_65536=CROSS_L), DL)
    assert fit.is_low_rank and fit.provenance["representation"] == "low_rank"
    assert sorted(fit.transforms) == ["mixed_inv_sqrt", "train_inv", "train_inv_sqrt"]
    fit.apply("mixed_inv_sqrt", np.zeros((1, DL)))
    assert not fit.transforms._cache  # applying builds no d×d matrix
    lam, T, evals, e_train = _dense_reference(u_train, u_eval, rule)
    # λ from the Gram spectra equals λ from the d×d float64 eigendecompositions: to float64
    # round-off for float64 rows; float32 rows multiply in float32 BLAS (blocks summed in
    # float64), about sqrt(d) float32 roundings per Gram entry.
    tol = 1e-9 if row_dtype == np.float64 else F32_PRODUCT_TOL
    assert fit.lambda_mix == pytest.approx(lam, rel=tol)
    if rule == "auto":
        assert 0 < fit.lambda_mix < 1
    assert_close(fit.eigenvalues, evals, rtol=0, peak_rtol=tol)
    assert_close(fit.eig_train, e_train, rtol=0, peak_rtol=tol)
    assert np.all(fit.eigenvalues[NT + NE :] == 0) and np.all(fit.eig_train[NT:] == 0)
    assert np.all(fit.eig_eval[NE:] == 0)

    # (R + δI)^p on random rows: float64 rows in float64, float32 rows in float32.
    x = np.random.default_rng(7).normal(size=(9, DL))
    for name, ref in T.items():
        want = x @ ref
        got = fit.apply(name, x)
        assert got.dtype == np.float64
        assert_close(got, want, rtol=1e-5, peak_rtol=1e-6, err_msg=name)
        got32 = fit.apply(name, x.astype(np.float32))
        assert got32.dtype == np.float32
        assert_close(got32, want, rtol=1e-3, peak_rtol=1e-5, err_msg=name)
        # The d×d matrix the (d×d) scorer reads, built from the factors.
        assert_close(fit.transform(name), ref, rtol=1e-4, peak_rtol=1e-6, err_msg=name)
        scale, Q, coef = fit.low_rank_factors(name)
        assert Q.shape[0] == DL and Q.shape[1] <= NT + NE and Q.dtype == np.float32
        orth_tol = max(tol, 1e-6)  # Q is stored in float32
        assert_close(Q.T.astype(np.float64) @ Q, np.eye(Q.shape[1]), rtol=0, peak_rtol=orth_tol)

    # The d×d fit of the same rows (float32 device sums: R_TOL) agrees.
    dense = fit_hessian(
        u_train, u_eval, _cfg(lambda_mix=rule, crossing_per_65536=CROSS_L, low_rank="never"), DL
    )
    assert not dense.is_low_rank and dense.provenance["representation"] == "dense"
    assert dense.low_rank_factors("mixed_inv_sqrt") is None
    assert dense.lambda_mix == pytest.approx(fit.lambda_mix, rel=1e-5)
    for name in T:
        assert_close(fit.apply(name, x), dense.apply(name, x), rtol=1e-3, peak_rtol=2e-5)


def test_low_rank_is_chosen_when_the_rows_are_fewer_than_d():
    assert use_low_rank("auto", 64, 30) and not use_low_rank("auto", 64, 64)
    assert not use_low_rank("auto", 64, None)  # unknown row count: the d×d path
    assert use_low_rank("always", 64, 100) and not use_low_rank("never", 64, 30)
    with pytest.raises(HessianError, match="low_rank"):
        use_low_rank("sometimes", 64, 30)

    u_train, u_eval = _low_rank_rows()
    assert fit_hessian(u_train, u_eval, _cfg(low_rank="auto"), DL).is_low_rank
    assert not fit_hessian(u_train, u_eval, _cfg(low_rank="never"), DL).is_low_rank
    # n_t + n_e >= d: the d×d path, under "auto".
    few = DL // 4
    assert not fit_hessian(u_train[:, :few], u_eval[:, :few], _cfg(), few).is_low_rank
    # The cfg without the field is "auto"; a chunk iterable has no row count up front.
    cfg = _cfg()
    assert fit_hessian(u_train, u_eval, cfg, DL).is_low_rank
    chunks = _chunks(u_train, [8, 12])
    assert not fit_hessian(chunks, u_eval, cfg, DL).is_low_rank
    # "always" with r >= d still equals the dense formula (r x r Gram of rank d).
    big_t, big_e = u_train[:, :few], u_eval[:, :few]
    fit = fit_hessian(big_t, big_e, _cfg(lambda_mix="auto_trace", low_rank="always"), few)
    assert fit.is_low_rank
    Rt = big_t.astype(np.float64).T @ big_t / NT
    Re = big_e.astype(np.float64).T @ big_e / NE
    lam = mix_lambda(Re, Rt, "auto_trace", few)
    ref, _ = inverse_sqrt(lam * Re + (1 - lam) * Rt, 0.1)
    x = np.random.default_rng(1).normal(size=(5, few))
    assert_close(fit.apply("mixed_inv_sqrt", x), x @ ref, rtol=1e-5, peak_rtol=1e-6)

    with pytest.raises(HessianError, match="damping"):
        fit_hessian(u_train, u_eval, _cfg(damping=0.0), DL)  # rank 30 < 64 and undamped


def test_low_rank_fit_save_load_keeps_factors_and_provenance(tmp_path):
    u_train, u_eval = _low_rank_rows(seed=3)
    pool = np.concatenate([u_train, _vectors(15, DL, seed=9)])  # 35 rows, 20 sampled
    meta = {"dim": DL, "model_fingerprint": "abc", "projection": {"seed": 0}, "correction": "adam"}
    store = ArrayStore(pool, meta)
    cfg = _cfg(lambda_mix="auto_trace", train_sample=NT)
    fit = fit_hessian(store, u_eval, cfg, DL, provenance={"train_path": "x"})
    assert fit.is_low_rank and fit.provenance["train_rows_used"] == NT
    pos = sample_rows(len(pool), NT, 0)
    lam, T, evals, _ = _dense_reference(pool[pos], u_eval, "auto_trace")
    assert fit.lambda_mix == pytest.approx(lam, rel=F32_PRODUCT_TOL)
    x = np.random.default_rng(2).normal(size=(4, DL))
    assert_close(fit.apply("mixed_inv_sqrt", x), x @ T["mixed_inv_sqrt"], rtol=1e-5, peak_rtol=1e-6)

    path = str(tmp_path / "fit.npz")
    fit.save(path)
    with np.load(path) as z:
        assert not [k for k in z.files if k.startswith("transform_")]  # no d×d array saved
        assert z["basis_mixed"].shape == (DL, NT + NE) and z["basis_train"].shape == (DL, NT)
    meta_saved = HessianFit.read_meta(path)
    assert meta_saved["transforms"] == sorted(T)
    assert set(meta_saved["low_rank"]) == set(T)
    back = HessianFit.load(path)
    assert back.is_low_rank and back.lambda_mix == fit.lambda_mix
    assert back.low_rank["train_inv"].basis is back.low_rank["train_inv_sqrt"].basis
    for name in T:
        np.testing.assert_array_equal(back.apply(name, x), fit.apply(name, x))
        assert back.low_rank[name].scale == fit.low_rank[name].scale
    np.testing.assert_array_equal(back.eigenvalues, fit.eigenvalues)
    assert back.provenance == json.loads(json.dumps(fit.provenance))
    assert back.provenance["train_meta"]["model_fingerprint"] == "abc"
    back.check_compatible(meta)
    with pytest.raises(HessianError, match="model_fingerprint"):
        back.check_compatible({**meta, "model_fingerprint": "zzz"})
    train_only = fit_hessian(u_train, None, _cfg(), DL)
    assert train_only.is_low_rank and train_only.lambda_mix is None
    with pytest.raises(HessianError, match="mixed_inv_sqrt"):
        train_only.apply("mixed_inv_sqrt", x)


def test_top_k_through_the_low_rank_fit_gives_the_dense_ids():
    from trackstar.score import score_preset, top_k_scores

    u_train, u_eval = _low_rank_rows(seed=5)
    queries = _vectors(6, DL, seed=11, scale=np.geomspace(0.2, 4, DL))
    cfg = _cfg(lambda_mix="auto_trace")
    low = fit_hessian(u_train, u_eval, cfg, DL)
    dense = fit_hessian(u_train, u_eval, {**cfg, "low_rank": "never"}, DL)
    assert low.is_low_rank and not dense.is_low_rank

    def no_dense_matrix(name):
        raise AssertionError(f"score_preset built the d×d matrix {name!r} of a low-rank fit")

    low.transform = no_dense_matrix  # scoring uses the factors: O(d·r) per row
    for preset in ("trackstar", "trak", "exp_opt_norm_rtrain"):
        ids_d, sc_d = score_preset(u_train, queries, preset, dense, k=8)
        ids_l, sc_l = score_preset(u_train, queries, preset, low, k=8)
        np.testing.assert_array_equal(ids_l, ids_d, err_msg=preset)
        assert_close(sc_l, sc_d, rtol=0, peak_rtol=1e-4, err_msg=preset)
    # Rows transformed by the low-rank factors (O(d·r) each), scored with identity transforms.
    t_m = low.apply("mixed_inv_sqrt", u_train)
    t_q = low.apply("mixed_inv_sqrt", queries)
    ids_a, _ = top_k_scores(t_m, t_q, None, None, True, 8)
    np.testing.assert_array_equal(ids_a, score_preset(u_train, queries, "trackstar", dense, k=8)[0])
