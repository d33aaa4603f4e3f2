"""Experiments E1-E7 in a tiny setting: one tiny trained run shared by every test.

Checks the results' shapes (E1's exact results.json layout), that the numbers are wired to the
right inputs (tail-patch against an explicit one-step update, MRR against the saved ranking),
the exact sub-grid projection of E3, open-set passages, and that caches are keyed by config.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trackstar import checkpoint, experiments, metrics, model, stages, tailpatch, tokenizer, world
from trackstar.config import ConfigError, load_config_file, validate
from trackstar.experiments import harness
from trackstar.projection import Projector
from trackstar.tree import named_leaves

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs")


def tiny_config(name: str, run_dir: str):
    cfg = load_config_file(os.path.join(CONFIGS, f"{name}.py:tiny"))
    cfg.run_dir = run_dir
    # Fewer tail-patched queries and sweep points keep the whole file inside the CI budget.
    cfg.tailpatch.n_queries = 4
    cfg.tailpatch.lr_multipliers = (1.0, 30.0)
    cfg.tailpatch.ks = (1, 3)
    # R_eval from the task queries: no held-out store to featurize (one compile less each).
    cfg.hessian.eval_source = "task"
    return cfg


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("exp") / "tiny")
    cfg = tiny_config("e1", path)
    stages.stage_world(cfg)
    stages.stage_train(cfg, progress=False)
    return path


@pytest.fixture(scope="module")
def e1(run_dir):
    cfg = tiny_config("e1", run_dir)
    cfg.experiment.methods = ("bm25", "random", "exp_opt_norm", "trackstar")
    return cfg, experiments.run(cfg, progress=False)


def test_e1_results_json_shape_and_files(e1):
    cfg, res = e1
    out = experiments.output_dir(cfg)
    with open(os.path.join(out, "results.json")) as f:
        saved = json.load(f)
    assert list(saved["methods"]) == list(cfg.experiment.methods)
    assert saved["n_queries"] == cfg.world.n_queries
    for row in saved["methods"].values():
        for key in ("mrr", "recall@10", "tailpatch@1", "tailpatch@3"):
            assert isinstance(row[key], float), key
        assert 0.0 <= row["mrr"] <= 1.0
        assert [r["lr_multiplier"] for r in row["sweep"]] == [1.0, 30.0]
    assert "tailpatch@1" in saved["ground_truth"] and "mrr" not in saved["ground_truth"]
    for file in ("table.md", "methods.png", "sweep.png"):
        assert os.path.getsize(os.path.join(out, file)) > 0
    table = open(os.path.join(out, "table.md")).read()
    assert "| trackstar |" in table and "30× lr" in table


def test_e1_mrr_matches_saved_ranking(e1):
    cfg, res = e1
    w = world.load_world(stages.path(cfg, "world"))
    with np.load(stages.path(cfg, "results", "proponents_candidates_trackstar.npz")) as z:
        ids = z["ids"]
    gt = [set(q.candidate_ids) for q in w.task_queries]
    assert res["methods"]["trackstar"]["mrr"] == pytest.approx(metrics.mrr(ids, gt, 100))
    # BM25 sees the target word itself; on the tiny world it must beat random by far.
    assert res["methods"]["bm25"]["mrr"] > res["methods"]["random"]["mrr"] + 0.2


def test_tailpatch_top1_equals_explicit_step(e1):
    """Query 0's tail-patch@1 (pp) = 100 (p(θ') - p(θ)), θ' = θ - lr/tokens · g ⊙ precond."""
    cfg, res = e1
    setup = experiments.make_setup(cfg)
    ids = experiments.rank(setup, "trackstar", progress=False)
    t = setup.trained
    m = ids[0, 0]
    ct, cw = setup.cand_tokens_NxS[m : m + 1], setup.cand_weights_NxS[m : m + 1]
    qt, qw = setup.query_tokens_QxT[:1], setup.query_weights_QxT[:1]

    def loss(p):
        return -model.target_logprob(t.apply_fn, p, ct, cw)[0]

    g = jax.grad(loss)(t.params)
    assert setup.lr == pytest.approx(cfg.train.final_lr)
    assert setup.counted_tokens_per_batch == cfg.train.batch_size * (cfg.train.seq_len - 1)
    step = setup.lr / setup.counted_tokens_per_batch
    patched = jax.tree.map(lambda p, gi, c: p - step * gi * c, t.params, g, setup.precond)
    before = jnp.exp(model.target_logprob(t.apply_fn, t.params, qt, qw)[0])
    after = jnp.exp(model.target_logprob(t.apply_fn, patched, qt, qw)[0])
    deltas = experiments.tailpatch_deltas(setup, ids)
    _, pq = experiments.evaluate(setup, ids, with_retrieval=False)
    assert deltas.shape == (2, 4, 3)
    want = 100.0 * float(after - before)
    assert pq["tailpatch@1"][0] == pytest.approx(want, rel=2e-2, abs=1e-7)


def _spy(calls: list, name: str, fn):
    def wrapped(*args, **kwargs):
        calls.append(name)
        return fn(*args, **kwargs)

    return wrapped


def test_e6_and_e7_reuse_e1_caches(e1, run_dir, monkeypatch):
    """E6 and E7 with E1's settings read every ranking and tail-patch delta from E1's caches.

    Recomputing would give equal numbers, so a miss is caught where it happens: the cache
    helper counts it in ``CACHE_MISSES`` and the spied ranking and tail-patch functions log it.
    """
    calls: list[str] = []
    for module, name in (
        (stages, "stage_score"),
        (tailpatch, "tailpatch_sweep"),
        (harness, "bm25_rank"),
        (harness, "random_rank"),
    ):
        monkeypatch.setattr(module, name, _spy(calls, name, getattr(module, name)))
    misses = dict(stages.CACHE_MISSES)
    cfg6 = tiny_config("e6", run_dir)
    cfg6.tailpatch.ks = (1, 3)
    cfg6.experiment.methods = ("random", "trackstar")
    # Under another output_name E6 writes beside its default folder, never into it.
    cfg6.experiment.output_name = "e6-two-methods"
    r6 = experiments.run(cfg6, progress=False)
    assert r6["methods"]["trackstar"]["tailpatch@3"] == pytest.approx(
        e1[1]["methods"]["trackstar"]["tailpatch@3"]
    )
    out6 = experiments.output_dir(cfg6)
    assert out6 == stages.path(cfg6, "experiments", "e6-two-methods")
    assert os.path.exists(os.path.join(out6, "results.json"))
    assert not os.path.exists(stages.path(cfg6, "experiments", "e6"))
    for bad in ("../e6", "a/b", ".."):
        cfg6.experiment.output_name = bad
        with pytest.raises(ConfigError, match="experiment.output_name"):
            validate(cfg6)
    cfg7 = tiny_config("e7", run_dir)
    cfg7.experiment.methods = ("bm25", "trackstar")
    r7 = experiments.run(cfg7, progress=False)
    sizes = r7["split_sizes"]
    assert sum(sizes["correct"].values()) == sum(sizes["bucket"].values()) == cfg7.world.n_queries
    by_bucket = r7["splits"]["bm25"]["mrr"]["by"]["bucket"]
    n_weighted = sum(v["mean"] * v["n"] for v in by_bucket.values())
    assert n_weighted / cfg7.world.n_queries == pytest.approx(r7["methods"]["bm25"]["mrr"])
    out = experiments.output_dir(cfg7)
    assert os.path.exists(os.path.join(out, "mrr_by_bucket.png"))
    assert calls == []
    assert dict(stages.CACHE_MISSES) == misses


def test_subgrid_is_the_projection_with_truncated_factors():
    rng = np.random.default_rng(0)
    params = {"a": {"kernel": jnp.zeros((6, 5))}, "b": {"bias": jnp.zeros((7,))}}
    proj = Projector(params, "global", 8, 8, seed=3)
    grads = {
        "a": {"kernel": jnp.asarray(rng.normal(size=(2, 6, 5)), jnp.float32)},
        "b": {"bias": jnp.asarray(rng.normal(size=(2, 7)), jnp.float32)},
    }
    full = np.asarray(proj.project(grads))
    k = 4
    want = np.zeros((2, k, k), np.float32)
    factors = proj.leaf_factors()
    for path, g in named_leaves(grads):
        a, b = (np.asarray(x)[:, :k] * np.sqrt(8 / k) for x in factors[path])
        g3 = np.asarray(g).reshape(2, a.shape[0], b.shape[0])
        want += np.einsum("ik,bio,oj->bkj", a, g3, b)
    got = experiments.subgrid(full, 8, 8, k)
    np.testing.assert_allclose(got, want.reshape(2, k * k), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(experiments.subgrid(full, 8, 8, 8), full)
    with pytest.raises(experiments.ExperimentError, match="sub-grid"):
        experiments.subgrid(full, 8, 8, 9)


def test_e3_dims_and_full_d_equals_e1(e1, run_dir):
    cfg = tiny_config("e3", run_dir)
    cfg.experiment.methods = ("exp_opt_norm", "trackstar")
    cfg.experiment.e3_full_dims_k = (16,)  # beyond the tiny 8 x 8 grid: featurized at 16 x 16
    res = experiments.run(cfg, progress=False)
    assert res["d_values"] == [4, 16, 64, 256]
    full = res["methods"]["trackstar"]["64"]
    assert full["mrr"] == pytest.approx(e1[1]["methods"]["trackstar"]["mrr"])
    assert "tailpatch@3" in full and "tailpatch@3" not in res["methods"]["exp_opt_norm"]["64"]
    assert os.path.exists(os.path.join(experiments.output_dir(cfg), "mrr_vs_d.png"))
    # Paired rows: a mean of per-query differences over the same queries is the difference of
    # the means; tail-patch pairs only where both methods were tail-patched (trackstar only).
    pairs = {(p["d"], p["metric"]): p for p in res["paired"]}
    assert set(pairs) == {(d, "mrr") for d in res["d_values"]}
    rows = res["methods"]
    for d in res["d_values"]:
        want = rows["exp_opt_norm"][str(d)]["mrr"] - rows["trackstar"][str(d)]["mrr"]
        assert pairs[(d, "mrr")]["mean"] == pytest.approx(want, abs=1e-12)
        assert pairs[(d, "mrr")]["n"] == cfg.world.n_queries
    # d = 256 comes from its own k16-tagged stores (the 8 x 8 ones untouched) and R fit.
    big = res["methods"]["trackstar"]["256"]
    assert big["source"] == "featurized" and "tailpatch@3" in big

    def store_dim(tag: str = "") -> int:
        with open(os.path.join(stages.store_path(cfg, "candidates", True, tag), "meta.json")) as f:
            return json.load(f)["dim"]

    assert store_dim("k16") == 256 and store_dim() == 64
    fit = res["featurized_d"]["256"][stages.correction_kind(cfg, True)]
    assert fit["train_rows_used"] > 0 and fit["eval_rows_used"] == cfg.world.n_queries
    # hessian.low_rank = "auto": low-rank exactly when the rows are fewer than d.
    assert fit["low_rank"] == (fit["train_rows_used"] + fit["eval_rows_used"] < 256)
    cfg.experiment.e3_full_dims_k = (8,)
    with pytest.raises(experiments.ExperimentError, match="e3_full_dims_k"):
        experiments.run(cfg, progress=False)


def test_e5_output_fns_use_their_own_stores(e1, run_dir):
    cfg = tiny_config("e5", run_dir)
    cfg.experiment.methods = ("trackstar",)
    cfg.experiment.output_fns = ("loss", "margin")
    res = experiments.run(cfg, progress=False)
    assert list(res["output_fns"]) == ["loss", "margin"]
    assert res["output_fns"]["loss"]["trackstar"]["mrr"] == pytest.approx(
        e1[1]["methods"]["trackstar"]["mrr"]
    )
    assert res["lambda_mix"]["margin"] != res["lambda_mix"]["loss"]
    for fn in ("margin",):
        tag = "-".join(t for t in (cfg.experiment.store_tag, fn) if t)  # e5's tagged stores
        meta = json.load(open(os.path.join(stages.store_path(cfg, "task", True, tag), "meta.json")))
        assert fn in json.dumps(meta)


def test_e2_open_set_passages(run_dir):
    cfg = tiny_config("e2", run_dir)
    cfg.experiment.methods = ("bm25", "grad_cosine")
    res = experiments.run(cfg, progress=False)
    assert res["candidates"] == "corpus"
    w = world.load_world(stages.path(cfg, "world"))
    assert res["n_candidates"] >= len(w.documents)
    assert res["methods"]["bm25"]["mrr"] > 0.2


def test_corpus_passages_split_long_documents(run_dir):
    cfg = tiny_config("e1", run_dir)
    w = world.load_world(stages.path(cfg, "world"))
    tok = tokenizer.load_tokenizer(stages.path(cfg, "tokenizer.json"))
    max_len = 24  # shorter than many tiny documents, so some must split
    passages = stages.corpus_passages(w, tok, max_len)
    assert len(passages) > len(w.documents)
    by_doc: dict[int, list] = {}
    for p in passages:
        assert 1 + len(tokenizer.encode(tok, p.text)) <= max_len or "." not in p.text[:-1]
        by_doc.setdefault(p.doc_id, []).append(p)
    for doc in w.documents:
        parts = by_doc[doc.doc_id]
        assert " ".join(p.text for p in parts) == " ".join(doc.sentences)
        assert set().union(*[set(p.fact_ids) for p in parts]) == set(doc.fact_ids)


def test_e4_trains_and_compares_a_smaller_model(run_dir):
    cfg = tiny_config("e4", run_dir)
    cfg.experiment.methods = ("bm25", "exp_opt_norm")
    res = experiments.run(cfg, progress=False)
    base, small = res["variants"]["base"], res["variants"]["small"]
    assert small["run_dir"] == run_dir + "_small"
    assert small["n_params"] < base["n_params"]
    assert base["methods"]["bm25"]["mrr"] == pytest.approx(small["methods"]["bm25"]["mrr"])


def test_e4_checkpoints_reads_one_run_at_each_step(tmp_path):
    """configs/e4_checkpoints.py:tiny: the run trains once; each step's run dir holds a copy of
    that run's checkpoint (params bit-equal), and a step trained on its own (checkpoint_step,
    the schedule still over train.steps) lands on the same params."""
    cfg = tiny_config("e4_checkpoints", str(tmp_path / "ckpts"))
    # Store-free methods: the steps' stores are E1's, tested there.
    cfg.experiment.methods = ("bm25", "random")
    cfg.experiment.paired = (("bm25", "random"),)
    stages.stage_world(cfg)
    stages.stage_train(cfg, progress=False)  # What `trackstar experiment` does first.
    base_ckpt = stages.path(cfg, "checkpoints")
    assert checkpoint.all_steps(base_ckpt) == [20, 40, 60]  # keep_checkpoints keeps them all.
    misses = stages.CACHE_MISSES["train"]
    res = experiments.run(cfg, progress=False)
    assert stages.CACHE_MISSES["train"] == misses  # No step was retrained.
    variants = res["variants"]
    assert list(variants) == ["step20", "step40", "step60"]
    assert [v["step"] for v in variants.values()] == [20, 40, 60]
    assert variants["step60"]["run_dir"] == cfg.run_dir
    assert variants["step20"]["copied_step"] == 20
    leaves = lambda tree: [np.asarray(x) for x in jax.tree.leaves(tree)]  # noqa: E731
    for name, step in (("step20", 20), ("step40", 40)):
        vcfg = experiments.with_overrides(cfg, {"train": {"checkpoint_step": step}})
        vcfg.run_dir = variants[name]["run_dir"]
        trained = stages.load_trained(vcfg)
        assert trained.step == step
        ref = stages.load_trained(cfg)
        ref_params, _, _ = checkpoint.restore(
            base_ckpt,
            jax.eval_shape(lambda p: p, ref.params),
            jax.eval_shape(ref.optimizer.init, ref.params),
            step,
        )
        for a, b in zip(leaves(trained.params), leaves(ref_params), strict=True):
            np.testing.assert_array_equal(a, b)
    # E3's sub-grid rows at d = 16 for every step, equal to what E3 itself gives there.
    for v in variants.values():
        assert set(v["methods"]) == {"bm25", "random", "trackstar d=16"}
        # experiment.paired: per-query differences, whose mean is the difference of the means.
        pairs = {p["metric"]: p for p in v["paired"]}
        assert set(pairs) == {"mrr", "tailpatch@3"}
        want = v["methods"]["bm25"]["mrr"] - v["methods"]["random"]["mrr"]
        assert pairs["mrr"]["mean"] == pytest.approx(want, abs=1e-12)
        with open(os.path.join(v["run_dir"], "experiments", "e3", "results.json")) as f:
            e3_row = json.load(f)["methods"]["trackstar"]["16"]
        assert v["methods"]["trackstar d=16"]["mrr"] == e3_row["mrr"]
        assert "tailpatch@3" in v["methods"]["trackstar d=16"]
    out = experiments.output_dir(cfg)
    for png in ("mrr_by_step.png", "tailpatch_at_3_by_step.png"):
        assert os.path.getsize(os.path.join(out, png)) > 1000
    # A step trained on its own follows the same schedule, so it reaches the same params.
    alone = experiments.with_overrides(cfg, {"train": {"checkpoint_step": 40}})
    alone.run_dir = str(tmp_path / "alone")
    stages.stage_world(alone)
    stages.stage_train(alone, progress=False)
    assert checkpoint.latest_step(stages.path(alone, "checkpoints")) == 40
    own = stages.load_trained(alone)
    copied = stages.load_trained(
        experiments.with_overrides(
            cfg, {"run_dir": variants["step40"]["run_dir"], "train": {"checkpoint_step": 40}}
        )
    )
    for a, b in zip(leaves(own.params), leaves(copied.params), strict=True):
        scale = float(np.abs(b).max())  # Each tensor's own size sets the tolerance.
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=scale * 1e-6)
    # The field leaves cache keys alone at 0 and is checked against train.steps.
    assert "checkpoint_step" not in stages.config_section(cfg, "train")
    assert stages.config_section(alone, "train")["checkpoint_step"] == 40
    bad = experiments.with_overrides(cfg, {"train": {"checkpoint_step": 61}})
    with pytest.raises(ConfigError, match="checkpoint_step = 61 is past train.steps"):
        validate(bad)


def test_config_errors_and_cache_keys(e1, run_dir):
    cfg = tiny_config("e1", run_dir)
    cfg.experiment.name = "e9"
    with pytest.raises(experiments.ExperimentError, match="e1, e2"):
        experiments.run(cfg)
    cfg = tiny_config("e1", run_dir)
    cfg.tailpatch.lr_multipliers = (0.5, 2.0)
    setup = experiments.make_setup(cfg)
    ids = experiments.rank(setup, "random")
    with pytest.raises(experiments.ExperimentError, match="lacks 1.0"):
        experiments.evaluate(setup, ids)
    # Another damping is another R: the cached trackstar ranking must not be reused.
    before = set(os.listdir(stages.path(cfg, "results", "cache")))
    misses = stages.CACHE_MISSES["rank"]
    cfg.hessian.damping = 0.5
    experiments.rank(experiments.make_setup(cfg), "trackstar", progress=False)
    after = set(os.listdir(stages.path(cfg, "results", "cache")))
    assert any(f.startswith("rank_candidates_trackstar") for f in after - before)
    assert stages.CACHE_MISSES["rank"] == misses + 1  # the counter E6/E7's test relies on
    # ... and the Hessian stage refit R (its fit records the hessian section's key) ...
    assert stages.CACHE_MISSES["hessian"] >= 1
    hmisses = stages.CACHE_MISSES["hessian"]
    # ... while asking again for the same fit reuses it.
    stages.stage_hessian(cfg)
    assert stages.CACHE_MISSES["hessian"] == hmisses


def test_e1_writes_release_files_and_the_viewer_shows_them(e1, tmp_path):
    """E1's proponents/<method>.jsonl.gz: release records whose per-query metrics average to
    results.json, scores that belong to the ranking, opponents for presets; the viewer of the
    run in Chromium shows every query and results.json's metrics."""
    from browser import open_page

    from trackstar import release, viewer

    cfg, res = e1
    out = experiments.output_dir(cfg)
    files = sorted(os.listdir(os.path.join(out, "proponents")))
    # random has no scores: it stays a results.json row only.
    assert files == sorted(f"{m}.jsonl.gz" for m in cfg.experiment.methods if m != "random")
    setup = harness.make_setup(cfg)
    for method in ("bm25", "trackstar"):
        recs = list(release.read_results(os.path.join(out, "proponents", f"{method}.jsonl.gz")))
        assert [r.example_id for r in recs] == [
            q.query_id for q in setup.trained.world.task_queries
        ]
        ids = harness.rank(setup, method, progress=False)
        for q, rec in enumerate(recs):
            assert rec.proponent_ids == [int(i) for i in ids[q] if i >= 0]
            assert rec.proponent_scores == sorted(rec.proponent_scores, reverse=True)
            truth = setup.ground_truth[q]
            assert rec.proponent_correct == [int(i) in truth for i in rec.proponent_ids]
            assert rec.model_correct == bool(setup.correct_Q[q])
        for key in ("mrr", "recall@10", "tailpatch@1"):
            values = [r.extra["metrics"][key] for r in recs if r.extra["metrics"][key] is not None]
            assert np.mean(values) == pytest.approx(res["methods"][method][key], rel=1e-12)
    # Presets carry opponents (most negative first) and the configured breakdowns.
    recs = list(release.read_results(os.path.join(out, "proponents", "trackstar.jsonl.gz")))
    assert all(r.opponent_scores == sorted(r.opponent_scores) for r in recs)
    assert all(r.opponent_scores[0] <= r.proponent_scores[-1] for r in recs)
    split = [r for r in recs if "breakdown" in r.extra]
    assert len(split) == cfg.viewer.breakdown_queries
    for r in split:
        b = r.extra["breakdown"]
        assert b["proponent_id"] == r.proponent_ids[0]
        assert b["score"] == pytest.approx(r.proponent_scores[0], rel=1e-3, abs=1e-5)
        assert sum(p["score"] for p in b["layers"]) == pytest.approx(b["score"], rel=1e-4, abs=1e-6)
        assert sum(p["score"] for p in b["tokens"]) == pytest.approx(b["score"], rel=1e-4, abs=1e-6)
    # The ground truth's per-query tail-patch, beside: its mean is results.json's.
    with open(os.path.join(out, "ground_truth_metrics.json")) as f:
        gt_rows = json.load(f)
    assert [r["example_id"] for r in gt_rows] == [r.example_id for r in recs]
    values = [r["tailpatch@1"] for r in gt_rows if r["tailpatch@1"] is not None]
    assert len(values) == cfg.tailpatch.n_queries
    assert np.mean(values) == pytest.approx(res["ground_truth"]["tailpatch@1"], rel=1e-12)
    # A results file in the release schema round-trips through the reader and writer.
    copy = str(tmp_path / "copy.jsonl.gz")
    release.write_results(copy, recs)
    assert list(release.read_results(copy)) == recs

    page_file = viewer.write_viewer(cfg.run_dir, experiment="e1")
    with open_page(page_file) as page:
        assert page.errors == []
        assert page.locator(".query").count() == cfg.world.n_queries
        for method in ("bm25", "exp_opt_norm", "trackstar"):
            for key in ("mrr", "recall@10", "tailpatch@3"):
                cell = page.locator(f'#metrics tr[data-method="{method}"] td[data-metric="{key}"]')
                want = res["methods"][method][key]
                assert float(cell.get_attribute("data-value")) == pytest.approx(want, rel=1e-12)
        assert page.locator("details.breakdown").count() == cfg.viewer.breakdown_queries
