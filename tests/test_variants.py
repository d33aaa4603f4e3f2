"""Scoring variants (trackstar.experiments.variants): pair scores, rerank and mix."""

import numpy as np
import pytest
from tolerances import assert_close, assert_same_top_k

from trackstar import config, stages
from trackstar.experiments import evaluation, harness, variants

PRESETS = ("trackstar", "exp_opt", "step_influence")


@pytest.fixture(scope="module")
def run(tiny_run):
    """The shared tiny run, scored with TrackStar, exp_opt and step_influence."""
    return tiny_run


@pytest.mark.parametrize("preset", PRESETS)
def test_pair_scores_match_stored_top_k(run, preset):
    cfg, _, results = run
    ids, stored = results[preset]["ids"], results[preset]["scores"]
    got = variants.pair_scores(cfg, preset, ids)
    assert_close(got, stored, rtol=1e-4, peak_rtol=1e-5, err_msg=preset)
    assert variants.check_pair_scores(cfg, preset) < 1e-4


def test_pair_scores_pad_with_nan(run):
    cfg, _, results = run
    ids = results["trackstar"]["ids"].copy()
    ids[:, -1] = -1
    got = variants.pair_scores(cfg, "trackstar", ids)
    assert np.isnan(got[:, -1]).all() and np.isfinite(got[:, :-1]).all()


def test_rerank_keeps_ids_and_orders_by_second_score(run):
    cfg, _, results = run
    base = results["trackstar"]["ids"]
    second = variants.pair_scores(cfg, "step_influence", base)
    out = variants.rerank(base, second)
    for q in range(base.shape[0]):
        assert sorted(out[q].tolist()) == sorted(base[q].tolist())
        s = second[q][np.argsort(base[q])][np.searchsorted(np.sort(base[q]), out[q])]
        assert np.all(np.diff(s) <= 0), q
    assert not np.array_equal(out, base)  # The two presets order differently.


def test_mix_end_points_are_each_presets_order(run):
    cfg, _, results = run
    k = int(cfg.score.top_k)
    a, b = results["trackstar"], results["step_influence"]
    union = variants.union_ids(a["ids"], b["ids"])
    s_a = variants.pair_scores(cfg, "trackstar", union)
    s_b = variants.pair_scores(cfg, "step_influence", union)
    for how in variants.STANDARDIZE:
        for alpha, ref, s in ((1.0, a, s_a), (0.0, b, s_b)):
            ids = variants.mix(union, s_a, s_b, alpha, k, how)
            np.testing.assert_array_equal(ids, variants.order_by(union, s, k))
            # Each preset's own top k is the best of the union by its score: its stored
            # ranking, up to the order inside float32 near-ties.
            scores = np.array(
                [s[q][np.searchsorted(union[q][union[q] >= 0], ids[q])] for q in range(len(ids))]
            )
            assert_same_top_k(
                ids, scores, ref["ids"], ref["scores"], atol=1e-4 * np.nanmax(np.abs(s))
            )
    mid = variants.mix(union, s_a, s_b, 0.5, k)
    assert not np.array_equal(mid, variants.order_by(union, s_a, k))


def test_ties_go_to_the_lower_id():
    ids = np.array([[7, 3, 5, -1], [2, 9, 4, 1]])
    s = np.array([[1.0, 1.0, 2.0, np.nan], [0.5, 0.5, np.nan, 0.5]])
    np.testing.assert_array_equal(
        variants.order_by(ids, s, 5), [[5, 3, 7, -1, -1], [1, 2, 9, -1, -1]]
    )
    # Equal mixed scores (each candidate first on one preset) also fall back to the id.
    union = np.array([[4, 8]])
    out = variants.mix(union, np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]]), 0.5, 2)
    np.testing.assert_array_equal(out, [[4, 8]])


def test_standardize():
    s = np.array([[1.0, 2.0, 3.0, 9.0], [5.0, 5.0, 5.0, 0.0]])
    valid = np.array([[True, True, True, False], [True, True, True, False]])
    z = variants.standardize(s, valid, "z")
    assert_close(z[0, :3], [-1.224744871, 0.0, 1.224744871])
    assert np.isnan(z[:, 3]).all() and np.all(z[1, :3] == 0.0)
    r = variants.standardize(s, valid, "rank")
    assert_close(r[0, :3], [0.0, 0.5, 1.0])
    assert_close(r[1, :3], [0.5, 0.5, 0.5])
    with pytest.raises(variants.VariantError, match="standardize"):
        variants.standardize(s, valid, "minmax")
    with pytest.raises(variants.VariantError, match="alpha"):
        variants.mix(np.array([[1]]), s[:1, :1], s[:1, :1], 1.5, 1)


def test_read_rows_names_missing_ids(run):
    cfg, _, _ = run
    vs = stages.open_store(stages.store_path(cfg, "candidates", True))
    ids = vs.read_ids()
    rows = variants.read_rows(vs, ids[[0, 3]])
    _, all_rows = vs.read_all()
    assert_close(rows, all_rows[[0, 3]])
    with pytest.raises(variants.VariantError, match="no vector"):
        variants.read_rows(vs, np.array([int(ids.max()) + 1]))


def test_build_variants_evaluate(run):
    cfg, trained, results = run
    setup = harness.make_setup(cfg, "candidates", trained)
    built = variants.build_variants(setup, alphas=(0.5,), rerank_by=("step_influence",))
    assert set(built) == {
        "rerank(trackstar by step_influence)",
        variants.mix_name(0.5, "z"),
    }
    k = int(cfg.score.top_k)
    for ids in built.values():
        assert ids.shape == (setup.n_queries, k)
    row, per_query = evaluation.evaluate(setup, built[variants.mix_name(0.5, "z")])
    assert {"mrr", "tailpatch@1", "sweep"} <= set(row)
    d = variants.paired_difference(per_query, per_query, "mrr")
    assert d["mean"] == 0.0


def test_variants_is_not_an_experiment():
    assert "variants" in config.EXPERIMENT_SUPPORT_MODULES
    assert "variants" not in config.experiment_names()
