"""V estimated from squared batch gradients (trackstar.v_estimate): it equals an explicit loop,
is deterministic under its seed and reused from disk, its stores refuse true-nu stores, and the
estimated-V pipeline runs end to end through the stages; correction_source = "none" refuses
corrected presets."""

import copy
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import assert_close
from toy_models import make_toy_gru

from trackstar import config as config_lib
from trackstar import correction, stages, store
from trackstar import v_estimate as ve
from trackstar.losses import mean_token_loss
from trackstar.tree import named_leaves

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs")
VOCAB = 29


def test_estimate_equals_an_explicit_loop_of_squared_batch_gradients():
    apply_fn, params = make_toy_gru(vocab=VOCAB, hidden=6)
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, VOCAB, (40, 9)).astype(np.int32)
    weights = np.ones(tokens.shape, np.float32)
    weights[:, 0] = 0.0
    weights[::3, 6:] = 0.0  # Padding-like rows: fewer counted tokens.
    sample = ve.EstimateSample(examples=30, seed=3, batch=4)
    pos = ve.sample_positions(len(tokens), sample)
    assert len(pos) == 28 and len(set(pos.tolist())) == 28  # 7 whole batches, no repeats

    est = ve.estimate_v(apply_fn, params, tokens[pos], weights[pos], 4, progress=False)

    def loss(p, t, w):
        return mean_token_loss(apply_fn(p, t), t, w)[0]

    want = jax.tree.map(jnp.zeros_like, params)
    for i in range(7):
        b = pos[4 * i : 4 * i + 4]
        g = jax.grad(loss)(params, jnp.asarray(tokens[b]), jnp.asarray(weights[b]))
        want = jax.tree.map(lambda a, x: a + x**2, want, g)
    want = jax.tree.map(lambda a: a / 7, want)
    assert est.count == 7
    for (path, got), (_, ref) in zip(named_leaves(est.v), named_leaves(want), strict=True):
        assert_close(np.asarray(got), np.asarray(ref), rtol=1e-5, err_msg=path)

    # The correction reads it in the Adam form, floor and eps included, no bias correction.
    settings = correction.estimate_settings(
        est, {"key": "k", **sample.to_dict()}, v_floor=1e-2, featurize_eps=1e-6
    )
    assert (settings.kind, settings.optimizer, settings.b2, settings.eps) == (
        "estimate",
        None,
        None,
        1e-6,
    )
    assert settings.to_dict()["estimate"]["batch"] == 4
    pre = dict(named_leaves(correction.preconditioner_for(settings, est, params)))
    vs = dict(named_leaves(want))
    mean = sum(float(np.sum(v)) for v in vs.values()) / sum(v.size for v in vs.values())
    for path, v in vs.items():
        ref = 1.0 / (np.sqrt(np.maximum(np.asarray(v), 1e-2 * mean)) + 1e-6)
        assert_close(np.asarray(pre[path]), ref, rtol=1e-5, err_msg=path)
    # Default eps: Adam's 1e-8 (the estimate reads no optimizer's).
    assert correction.estimate_settings(est, {}).eps == correction.ESTIMATE_EPS == 1e-8
    # Settings of another estimate (another count) are refused.
    with pytest.raises(correction.CorrectionError, match="step 7"):
        correction.preconditioner_for(settings, correction.VEstimate(est.v, 6), params)


def test_sample_positions_follow_the_seed_and_refuse_less_than_a_batch():
    s = ve.EstimateSample(examples=10, seed=1, batch=3)
    a, b = ve.sample_positions(100, s), ve.sample_positions(100, s)
    assert np.array_equal(a, b) and len(a) == 9
    assert not np.array_equal(a, ve.sample_positions(100, ve.EstimateSample(10, 2, 3)))
    assert len(ve.sample_positions(100, ve.EstimateSample(0, 1, 3))) == 99  # 0 = all
    with pytest.raises(ve.VEstimateError, match="at least one batch of 8"):
        ve.sample_positions(5, ve.EstimateSample(0, 0, 8))
    with pytest.raises(ve.VEstimateError, match="batch"):
        ve.EstimateSample(4, 0, 0)


def test_config_rules_and_sources():
    cfg = config_lib.load_config_file(os.path.join(CONFIGS, "demo.py"))
    assert cfg.featurize.correction_source == "optimizer"
    assert config_lib.CORRECTION_SOURCES == stages.CORRECTION_SOURCES
    for field, bad in (
        ("correction_source", "adam"),
        ("v_estimate_examples", -1),
        ("v_estimate_batch", 0),
        ("v_estimate_seed", -2),
    ):
        other = copy.deepcopy(cfg)
        other.featurize[field] = bad
        with pytest.raises(config_lib.ConfigError, match=f"featurize.{field}"):
            config_lib.validate(other)


# ----- stages on a tiny trained run --------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cfg = config_lib.load_config_file(os.path.join(CONFIGS, "tiny.py"))
    cfg.run_dir = str(tmp_path_factory.mktemp("vest") / "tiny")
    cfg.featurize.v_estimate_examples = 64
    cfg.featurize.v_estimate_batch = 8
    stages.stage_world(cfg)
    stages.stage_train(cfg, progress=False)
    est = copy.deepcopy(cfg)
    est.featurize.correction_source = "estimate"
    return cfg, est, stages.load_trained(cfg)


def test_estimate_is_deterministic_and_reused_from_disk(run):
    _, cfg, trained = run
    misses = stages.CACHE_MISSES["v_estimate"]
    est, record = stages.v_estimate(cfg, trained, progress=False)
    assert stages.CACHE_MISSES["v_estimate"] == misses + 1
    file = stages.path(cfg, "v_estimate", f"{record['key']}.npz")
    assert os.path.exists(file)
    assert (record["per"], record["batch"], record["used"], est.count) == ("batch", 8, 64, 8)

    stages._V_ESTIMATES.clear()  # A new process: read from disk, not computed again.
    again, record2 = stages.v_estimate(cfg, trained, progress=False)
    assert stages.CACHE_MISSES["v_estimate"] == misses + 1 and record2 == record
    for (p, a), (_, b) in zip(named_leaves(est.v), named_leaves(again.v), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=p)

    # Recomputed from scratch under the same seed: the same numbers.
    os.remove(file)
    stages._V_ESTIMATES.clear()
    fresh, _ = stages.v_estimate(cfg, trained, progress=False)
    assert stages.CACHE_MISSES["v_estimate"] == misses + 2
    for (p, a), (_, b) in zip(named_leaves(est.v), named_leaves(fresh.v), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=p)

    # Another seed or batch is another estimate (another key and file).
    for field, value in (("v_estimate_seed", 1), ("v_estimate_batch", 4)):
        other = copy.deepcopy(cfg)
        other.featurize[field] = value
        _, rec = stages.v_estimate(other, trained, progress=False)
        assert rec["key"] != record["key"]
    assert stages.CACHE_MISSES["v_estimate"] == misses + 4


def test_an_estimated_v_store_is_refused_against_a_true_nu_store(run):
    adam_cfg, est_cfg, trained = run
    true_path = stages.stage_featurize(adam_cfg, "task", trained=trained, progress=False)
    est_path = stages.stage_featurize(est_cfg, "task", trained=trained, progress=False)
    assert true_path.endswith("task-adam") and est_path.endswith("task-estimate")
    true_meta = store.VectorStore.open(true_path).meta
    est_meta = store.VectorStore.open(est_path).meta
    _, record = stages.v_estimate(est_cfg, trained, progress=False)
    assert est_meta.correction == "estimate"
    assert est_meta.correction_settings["estimate"] == record
    assert est_meta.optimizer_fingerprint == f"v_estimate:{record['key']}"
    with pytest.raises(store.StoreMismatchError) as e:
        store.check_compatible(true_meta, est_meta)
    msg = str(e.value)
    assert "correction: train='adam', query='estimate'" in msg
    assert "optimizer_fingerprint" in msg and "correction_settings.estimate" in msg


def test_estimated_v_pipeline_runs_end_to_end(run):
    _, cfg, trained = run
    cfg = copy.deepcopy(cfg)
    cfg.hessian.eval_source = "heldout"
    for which in ("candidates", "task", "heldout"):
        stages.stage_featurize(cfg, which, trained=trained, progress=False)
    fit = stages.stage_hessian(cfg, "candidates", True)
    assert fit.endswith("candidates-estimate.npz")
    for preset in ("trackstar", "exp_opt_norm"):
        out = stages.stage_score(cfg, preset, "candidates", progress=False)
        assert out["ids"].shape == (cfg.world.n_queries, cfg.score.top_k)
        assert np.all(np.isfinite(out["scores"]))
    # The stored rows are the estimate's correction rebuilt from the store's own settings.
    vs = store.VectorStore.open(stages.store_path(cfg, "task", True))
    settings = correction.CorrectionSettings(**vs.meta.correction_settings)
    assert settings == stages.correction_settings(cfg, trained)
    pre = stages.make_preconditioner(cfg, trained, settings)
    est, _ = stages.v_estimate(cfg, trained, progress=False)
    vs_named = dict(named_leaves(est.v))
    mean = sum(float(np.sum(v)) for v in vs_named.values()) / sum(
        np.size(v) for v in vs_named.values()
    )
    for path, f in named_leaves(pre):
        v = np.maximum(np.asarray(vs_named[path]), cfg.featurize.v_floor * mean)
        assert_close(np.asarray(f), 1.0 / (np.sqrt(v) + 1e-8), rtol=1e-5, err_msg=path)


def test_correction_source_none_refuses_corrected_presets(run):
    cfg, _, trained = run
    none = copy.deepcopy(cfg)
    none.featurize.correction_source = "none"
    assert stages.correction_kind(none, False) == "none"
    with pytest.raises(stages.StageError, match="correction_source = 'none'"):
        stages.stage_featurize(none, "task", trained=trained, progress=False, tag="nosrc")
    with pytest.raises(stages.StageError, match="uncorrected preset"):
        stages.stage_score(none, "trackstar", "candidates", progress=False)
    assert not os.path.exists(stages.path(cfg, "stores", "task-adam-nosrc"))
    path = stages.stage_featurize(none, "task", False, trained, progress=False, tag="nosrc")
    assert store.VectorStore.open(path).meta.correction == "none"
