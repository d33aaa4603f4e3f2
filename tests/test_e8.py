"""E8 (linear datamodeling score) in the tiny setting: one tiny trained run, one E8 run.

Checks the results' layout, that each LDS equals an explicit Spearman computation from the
saved arrays, that subsets are deterministic and of the requested size, that a subset model's
saved log-probabilities are its checkpoint's, and that a rerun retrains and rescores nothing.
"""

import json
import os

import jax
import numpy as np
import pytest

from trackstar import checkpoint, experiments, stages
from trackstar import model as model_lib
from trackstar.config import ConfigError, load_config_file, validate
from trackstar.experiments import e8

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs")


def tiny_config(run_dir: str):
    cfg = load_config_file(os.path.join(CONFIGS, "e8.py:tiny"))
    cfg.run_dir = run_dir
    # R_eval from the task queries: no held-out store to featurize (one compile less).
    cfg.hessian.eval_source = "task"
    return cfg


@pytest.fixture(scope="module")
def e8_run(tmp_path_factory):
    cfg = tiny_config(str(tmp_path_factory.mktemp("e8") / "tiny"))
    stages.stage_world(cfg)
    stages.stage_train(cfg, progress=False)
    return cfg, experiments.run(cfg, progress=False)


def _arrays(cfg) -> dict:
    with np.load(os.path.join(experiments.output_dir(cfg), e8.ARRAYS_FILE)) as z:
        return dict(z)


def test_results_layout(e8_run):
    cfg, res = e8_run
    out = experiments.output_dir(cfg)
    with open(os.path.join(out, "results.json")) as f:
        saved = json.load(f)
    # Every preset known at run time, after the baselines.
    assert list(saved["methods"]) == ["bm25", "random", *e8.score.PRESETS]
    assert saved["subsets"] == cfg.experiment.lds_subsets == 4
    assert saved["sizes"]["queries"] == cfg.world.n_queries
    for row in [*saved["methods"].values(), saved["ground_truth"]]:
        assert set(row) == {"lds", "lds_se", "n_queries"}
        assert -1.0 <= row["lds"] <= 1.0 and 0 < row["n_queries"] <= cfg.world.n_queries
    for file in ("table.md", "lds.png", e8.ARRAYS_FILE):
        assert os.path.getsize(os.path.join(out, file)) > 0
    assert "| trackstar |" in open(os.path.join(out, "table.md")).read()


def test_lds_equals_explicit_spearman(e8_run):
    cfg, res = e8_run
    stats = pytest.importorskip("scipy.stats")
    a = _arrays(cfg)
    masks, logprobs = a["masks_KxD"], a["logprobs_QxK"]
    for method in ("trackstar", "bm25", "grad_dot"):
        predicted = np.stack([a[f"doc_scores_{method}"] @ m for m in masks.astype(float)], 1)
        rho = np.array(
            [stats.spearmanr(p, y).statistic for p, y in zip(predicted, logprobs, strict=True)]
        )
        ok = np.isfinite(rho)
        row = res["methods"][method]
        assert row["n_queries"] == ok.sum()
        assert row["lds"] == pytest.approx(rho[ok].mean(), abs=1e-12)
        assert row["lds_se"] == pytest.approx(rho[ok].std(ddof=1) / np.sqrt(ok.sum()), abs=1e-12)
    # Paired rows: per-query differences over the queries both methods have.
    diff = a["rho_trackstar"] - a["rho_exp_opt_norm"]
    ok = np.isfinite(diff)
    d = res["paired"]["trackstar − exp_opt_norm"]
    assert d["n"] == ok.sum() and d["what"] == "mixed R"
    assert d["mean"] == pytest.approx(diff[ok].mean(), abs=1e-12)
    assert d["se"] == pytest.approx(diff[ok].std(ddof=1) / np.sqrt(ok.sum()), abs=1e-12)
    assert len(res["paired"]) == len(e8.PAIRED)  # Every preset ran, so every comparison did.


def test_doc_scores_sum_passage_scores(e8_run):
    cfg, _ = e8_run
    a = _arrays(cfg)
    trained = stages.load_trained(cfg)
    passages = stages.corpus_passages(trained.world, trained.tok, cfg.model.max_len)
    dense = e8.passage_scores(cfg, trained, "grad_dot", [p.text for p in passages], "")
    by_doc = np.zeros_like(a["doc_scores_grad_dot"])
    for i, p in enumerate(passages):
        by_doc[:, p.doc_id] += dense[:, i]
    np.testing.assert_allclose(a["doc_scores_grad_dot"], by_doc, rtol=1e-12)
    # Dense grad_dot is the plain dot product of the (uncorrected) stored vectors.
    train = stages.open_store(stages.store_path(cfg, "corpus", False)).read_all()
    query = stages.open_store(stages.store_path(cfg, "task", False)).read_all()
    t = train[1] if isinstance(train, tuple) else train
    q = query[1] if isinstance(query, tuple) else query
    # float32 scoring vs a float64 product: tolerance relative to the largest score.
    exact = q.astype(np.float64) @ t.T.astype(np.float64)
    np.testing.assert_allclose(dense, exact, rtol=1e-4, atol=1e-5 * np.abs(exact).max())


def test_spearman_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for _ in range(20):
        a, b = rng.integers(0, 4, 9).astype(float), rng.normal(size=9)
        assert e8.spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic)
    assert np.isnan(e8.spearman(np.ones(5), np.arange(5.0)))


def test_subsets_deterministic_and_sized():
    m1 = e8.subset_masks(101, 6, 0.5, seed=3)
    np.testing.assert_array_equal(m1, e8.subset_masks(101, 6, 0.5, seed=3))
    assert (m1.sum(1) == 50).all()  # round(0.5 * 101) = 50 (banker's rounding of 50.5)
    # Subset k does not depend on K; another seed draws other subsets.
    np.testing.assert_array_equal(m1[:3], e8.subset_masks(101, 3, 0.5, seed=3))
    assert not np.array_equal(m1, e8.subset_masks(101, 6, 0.5, seed=4))
    assert len({m.tobytes() for m in m1}) == 6
    assert (e8.subset_masks(40, 2, 0.25, seed=0).sum(1) == 10).all()


def test_saved_masks_are_the_configured_subsets(e8_run):
    cfg, res = e8_run
    a = _arrays(cfg)
    n_docs = res["sizes"]["documents"]
    np.testing.assert_array_equal(a["masks_KxD"], e8.subset_masks(n_docs, 4, 0.5, 0))
    assert res["subset_size"] == round(0.5 * n_docs)


def test_subset_model_logprob_is_its_checkpoint(e8_run):
    cfg, _ = e8_run
    a = _arrays(cfg)
    trained = stages.load_trained(cfg)
    trainer = e8.SubsetTrainer(cfg, trained)
    k = 1
    ckpt_dir = os.path.join(trainer.run_dir(k, a["masks_KxD"][k]), "checkpoints")
    assert checkpoint.latest_step(ckpt_dir) == cfg.train.steps
    abstract = jax.eval_shape(lambda p: p, trainer.init_params)
    params, _, meta = checkpoint.restore(
        ckpt_dir, abstract, jax.eval_shape(trainer.optimizer.init, abstract)
    )
    assert meta["data_fingerprint"] == trainer.stream(a["masks_KxD"][k]).fingerprint
    direct = model_lib.target_logprob(
        trainer.apply_fn, params, trainer.query_tokens, trainer.query_weights
    )
    np.testing.assert_allclose(a["logprobs_QxK"][:, k], np.asarray(direct), rtol=1e-5)
    # The subset stream holds only the subset's documents.
    assert (
        trainer.stream(a["masks_KxD"][k]).n_tokens
        < trainer.stream(np.ones_like(a["masks_KxD"][k])).n_tokens
    )
    # Retraining differs from the full model (the data changed).
    full = model_lib.target_logprob(
        trained.apply_fn, trained.params, trainer.query_tokens, trainer.query_weights
    )
    assert not np.allclose(np.asarray(full), np.asarray(direct))


def test_rerun_retrains_and_rescores_nothing(e8_run):
    cfg, res = e8_run
    before = dict(stages.CACHE_MISSES)
    again = experiments.run(cfg, progress=False)
    after = dict(stages.CACHE_MISSES)
    for kind in ("lds_train", "lds_logprob", "lds_scores", "train", "hessian"):
        assert after.get(kind, 0) == before.get(kind, 0), kind
    assert again["methods"] == res["methods"]


def test_config_rules():
    cfg = tiny_config("/tmp/unused")
    validate(cfg)
    for field, bad in (("lds_subsets", 1), ("lds_fraction", 1.0), ("lds_fraction", 0.0)):
        c = tiny_config("/tmp/unused")
        c.experiment[field] = bad
        with pytest.raises(ConfigError, match=f"experiment.{field}"):
            validate(c)
