"""Pipeline stages on a tiny trained run: the correction is pinned to the checkpoint, a bad
featurize setting leaves no store behind, and every store entering R passes one check."""

import copy
import os

import numpy as np
import pytest

from trackstar import correction, stages, store
from trackstar.config import load_config_file
from trackstar.featurize import featurize_into_store
from trackstar.gradients import make_feature_fn
from trackstar.tree import named_leaves

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs")


def tiny_config(run_dir: str):
    cfg = load_config_file(os.path.join(CONFIGS, "tiny.py"))
    cfg.run_dir = run_dir
    cfg.featurize.chunk_size = 8  # 16 task queries: two chunks, so a run can stop halfway.
    return cfg


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cfg = tiny_config(str(tmp_path_factory.mktemp("stages") / "tiny"))
    stages.stage_world(cfg)
    stages.stage_train(cfg, progress=False)
    return cfg, stages.load_trained(cfg)


def test_correction_settings_come_from_the_checkpoint_and_pin_the_store(run):
    cfg, trained = run
    cfg = copy.deepcopy(cfg)
    # A featurize run killed after its first chunk.
    job = stages.prepare_featurize(cfg, "task", True, trained, tag="pin")
    fn = make_feature_fn(trained.apply_fn, job.output_fn, job.projector, job.preconditioner)
    featurize_into_store(fn, trained.params, job.examples, job.store, 8, chunks=[0], progress=False)
    want = {
        "optimizer": "adamw",
        "kind": "adam",
        "b2": 0.98,
        "eps": 1e-8,
        "count": cfg.train.steps,
        "v_floor": cfg.featurize.v_floor,
    }
    assert job.store.meta.correction_settings == want
    assert job.store.meta.correction == "adam"

    # Resuming under a train section that contradicts the checkpoint is refused: the
    # correction would otherwise change halfway through the store.
    other = copy.deepcopy(cfg)
    other.train.b2 = 0.9
    with pytest.raises(stages.StageError, match=r"train.b2: checkpoint 0.98, config 0.9"):
        stages.stage_featurize(other, "task", trained=trained, progress=False, tag="pin")
    other = copy.deepcopy(cfg)
    other.train.eps = 1e-6
    with pytest.raises(stages.StageError, match=r"train.eps"):
        stages.stage_featurize(other, "task", trained=trained, progress=False, tag="pin")
    # Another correction epsilon or V floor is another correction: the store refuses it.
    for field, value in (("eps", 1e-3), ("v_floor", 0.0), ("drop_unmoved", True)):
        other = copy.deepcopy(cfg)
        other.featurize[field] = value
        with pytest.raises(store.StoreMismatchError, match=f"correction_settings.{field}"):
            stages.stage_featurize(other, "task", trained=trained, progress=False, tag="pin")

    path = stages.stage_featurize(cfg, "task", trained=trained, progress=False, tag="pin")
    done = store.VectorStore.open(path)
    assert done.is_complete and done.meta.correction_settings == want
    # The rows are the checkpoint's correction built from the recorded settings.
    settings = correction.CorrectionSettings(**want)
    pre = correction.preconditioner_for(settings, trained.opt_state, trained.params)
    fn = make_feature_fn(trained.apply_fn, "loss", job.projector, pre)
    ex = job.examples
    np.testing.assert_allclose(
        done.read_all()[1],
        np.asarray(fn(trained.params, ex.tokens_NxT, ex.weights_NxT)),
        rtol=1e-5,
        atol=1e-5 * float(np.max(np.abs(done.read_all()[1]))),
    )


def test_drop_unmoved_is_recorded_and_a_resume_without_it_is_refused(run):
    cfg, trained = run
    cfg = copy.deepcopy(cfg)
    cfg.featurize.drop_unmoved = True
    job = stages.prepare_featurize(cfg, "task", True, trained, tag="drop")
    fn = make_feature_fn(trained.apply_fn, job.output_fn, job.projector, job.preconditioner)
    featurize_into_store(fn, trained.params, job.examples, job.store, 8, chunks=[0], progress=False)
    recorded = job.store.meta.correction_settings
    assert recorded["drop_unmoved"] is True
    assert correction.CorrectionSettings(**recorded) == job.settings
    # The store made with the option refuses a resume without it (the other direction is the
    # loop in the test above).
    other = copy.deepcopy(cfg)
    other.featurize.drop_unmoved = False
    with pytest.raises(
        store.StoreMismatchError, match=r"correction_settings.drop_unmoved: existing=True"
    ):
        stages.stage_featurize(other, "task", trained=trained, progress=False, tag="drop")
    # The factor is 0 exactly where the checkpoint's nu is 0, the floored factor elsewhere
    # (the tiny world has vocabulary words no training text contains).
    nu = dict(named_leaves(correction.find_moment_states(trained.opt_state)[0][1].nu))
    floored = dict(named_leaves(stages.make_preconditioner(other, trained)))
    dropped = dict(named_leaves(job.preconditioner))
    assert any(np.any(np.asarray(v) == 0) for v in nu.values())
    for path, v in nu.items():
        unmoved = np.asarray(v) == 0
        np.testing.assert_array_equal(np.asarray(dropped[path])[unmoved], 0.0, err_msg=path)
        np.testing.assert_array_equal(
            np.asarray(dropped[path])[~unmoved], np.asarray(floored[path])[~unmoved]
        )


def test_correction_kind_follows_the_checkpoint_and_refuses_unknown_optimizers(run, tmp_path):
    cfg, _ = run
    assert stages.correction_kind(cfg, True) == "adam"
    assert stages.correction_kind(cfg, False) == "none"
    # Without checkpoints (stores scored elsewhere) the config's optimizer is used, and an
    # optimizer without a known correction is an error, not silently "adafactor".
    bare = tiny_config(str(tmp_path / "bare"))
    bare.train.optimizer = "sgd"
    with pytest.raises(stages.StageError, match="'sgd'"):
        stages.correction_kind(bare, True)


def test_bad_query_output_fn_leaves_no_store_and_the_rerun_works(run):
    cfg, trained = run
    bad = copy.deepcopy(cfg)
    bad.featurize.query_output_fn = "logprob"
    target = stages.store_path(cfg, "heldout", True, "ofn")
    with pytest.raises(ValueError, match="featurize.query_output_fn"):
        stages.stage_featurize(bad, "heldout", trained=trained, progress=False, tag="ofn")
    assert not os.path.exists(target)
    good = copy.deepcopy(cfg)
    good.featurize.query_output_fn = "margin"
    path = stages.stage_featurize(good, "heldout", trained=trained, progress=False, tag="ofn")
    assert path == target and store.VectorStore.open(path).meta.output_fn == "margin"


def test_stage_hessian_refuses_an_eval_store_with_another_projection_seed(run):
    cfg, trained = run
    cfg = copy.deepcopy(cfg)
    cfg.hessian.eval_source = "heldout"
    stages.stage_featurize(cfg, "task", trained=trained, progress=False, tag="seed")
    other = copy.deepcopy(cfg)
    other.featurize.projection_seed = 1
    stages.stage_featurize(other, "heldout", trained=trained, progress=False, tag="seed")
    with pytest.raises(store.StoreMismatchError, match=r"projection.seed: train=0, R_eval=1"):
        stages.stage_hessian(cfg, "task", True, train_tag="seed", query_tag="seed")
    assert not os.path.exists(stages.hessian_path(cfg, "task", True, "seed", "seed"))


def test_finished_training_is_reused_and_restores_are_shared(run):
    """A run with its final checkpoint is not trained again (the train counter stays put) and
    returns the saved accuracy report; one process restores a checkpoint once."""
    cfg, trained = run
    misses = stages.CACHE_MISSES["train"]
    saved = stages.stage_train(cfg, progress=False)
    assert stages.CACHE_MISSES["train"] == misses
    assert os.path.exists(stages.path(cfg, "results", "accuracy.json"))
    assert saved == stages.stage_train(copy.deepcopy(cfg), progress=False)
    assert stages.load_trained(copy.deepcopy(cfg)) is trained


def test_cached_array_computes_once_per_key(run, tmp_path):
    cfg = copy.deepcopy(run[0])
    cfg.run_dir = str(tmp_path)
    calls = []

    def make():
        calls.append(1)
        return np.arange(3)

    key = stages.config_key(stages.config_section(cfg, "score"))
    a = stages.cached_array(cfg, "demo", "x", key, make)
    b = stages.cached_array(cfg, "demo", "x", key, make)
    assert calls == [1] and np.array_equal(a, b) and stages.CACHE_MISSES["demo"] == 1
    cfg.score.top_k += 1  # another config section value: another key, computed again
    stages.cached_array(
        cfg, "demo", "x", stages.config_key(stages.config_section(cfg, "score")), make
    )
    assert calls == [1, 1]
