"""The paper's experiments E1–E7 (docs/method.md) over a run directory, built on ``stages``.

Each runner takes a full config (the demo sections plus an ``experiment`` section), reuses what
the run directory already holds (checkpoint, stores, Hessian fits) and writes
``<run_dir>/experiments/<experiment.name>/`` with ``results.json``, ``table.md`` and PNG plots.

Work is shared between experiments through caches in ``<run_dir>/results/cache``: rankings
(per method, candidate pool and store variant) and tail-patch deltas (per proponent list). A
cache file's name carries a hash of everything that decides its content (config sections,
proponent ids, checkpoint step), so a changed config never reads a stale value.

| id | what | candidates |
|---|---|---|
| e1 | every scoring preset + bm25 + random: MRR, Recall@10, tail-patch | closed set |
| e2 | bm25, grad_dot, grad_cosine, trackstar | open set (corpus passages) |
| e3 | MRR / tail-patch vs projection dim d = k·k | closed set |
| e4 | the same across model sizes (one run dir per size) | closed set |
| e5 | query output function: loss, margin, logit | closed set |
| e6 | tail-patch@1, 3, 5, 10 | closed set |
| e7 | split by greedy correctness and by fact frequency bucket | closed set |

Tail-patch (docs/method.md, Tail-patch; ``tailpatch`` section): final learning rate,
``batch_share`` scale = 1 / counted tokens of one training batch, the checkpoint's
preconditioner, proponents = each method's top ``max(tailpatch.ks)``, plus a ``ground_truth``
row (the query's own fact statements as proponents) and a sweep over
``tailpatch.lr_multipliers`` in every table.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from trackstar import checkpoint, hessian, metrics, report, score, stages, tailpatch
from trackstar import model as model_lib
from trackstar.baselines import bm25_rank, query_text, random_rank

PRESET_METHODS = tuple(score.PRESETS)
BASELINES = ("bm25", "random")
# Table order: the baselines, then the preset ladder (docs/method.md, Scoring).
ALL_METHODS = (*BASELINES, *PRESET_METHODS)
GROUND_TRUTH = "ground_truth"


class ExperimentError(ValueError):
    """An experiment config that cannot run; the message says which field to change."""


# ----- small helpers --------------------------------------------------------------------------


def _hash(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _section(cfg: ml_collections.ConfigDict, name: str) -> dict:
    return cfg[name].to_dict() if name in cfg else {}


def _jsonable(obj: Any) -> Any:
    """NaN/inf become null and numpy scalars plain numbers, so results.json is strict JSON."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        f = float(obj)
        return f if math.isfinite(f) else None
    return obj


def experiment_section(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``cfg.experiment``, or an error saying which config to use."""
    if "experiment" not in cfg:
        raise ExperimentError(
            "the config has no `experiment` section; use one of configs/e1.py ... configs/e7.py"
        )
    return cfg.experiment


def output_dir(cfg: ml_collections.ConfigDict) -> str:
    """``<run_dir>/experiments/<experiment.name>``."""
    return stages.path(cfg, "experiments", experiment_section(cfg).name)


def with_overrides(cfg: ml_collections.ConfigDict, overrides: Mapping) -> ml_collections.ConfigDict:
    """A copy of ``cfg`` with nested ``overrides`` applied; unknown fields are an error."""
    out = copy.deepcopy(cfg)

    def apply(node: ml_collections.ConfigDict, upd: Mapping, where: str) -> None:
        for key, value in upd.items():
            if key not in node:
                raise ExperimentError(f"override {where}{key} names no config field")
            if isinstance(value, Mapping):
                apply(node[key], value, f"{where}{key}.")
            else:
                with node.unlocked():
                    node[key] = value

    apply(out, overrides.to_dict() if hasattr(overrides, "to_dict") else overrides, "")
    return out


def _write_results(cfg, results: dict, markdown: str, name: str | None = None) -> str:
    out = output_dir(cfg) if name is None else stages.path(cfg, "experiments", name)
    os.makedirs(out, exist_ok=True)
    tmp = os.path.join(out, "results.json.tmp")
    with open(tmp, "w") as f:
        json.dump(_jsonable(results), f, indent=2)
    os.replace(tmp, os.path.join(out, "results.json"))
    report.save_text(markdown, os.path.join(out, "table.md"))
    return out


# ----- shared setup ---------------------------------------------------------------------------


@dataclasses.dataclass
class Setup:
    """Everything ranking and tail-patch need for one run dir and one candidate pool."""

    cfg: ml_collections.ConfigDict
    trained: stages.Trained
    candidates: str
    texts: list[str]
    ground_truth: list[set]
    cand_tokens_NxS: np.ndarray
    cand_weights_NxS: np.ndarray
    query_tokens_QxT: np.ndarray
    query_weights_QxT: np.ndarray
    correct_Q: np.ndarray
    buckets_Q: np.ndarray
    precond: Any
    lr: float
    tokens_per_batch: float

    @property
    def n_queries(self) -> int:
        return len(self.ground_truth)

    @property
    def n_tailpatch(self) -> int:
        n = int(self.cfg.tailpatch.n_queries)
        return self.n_queries if n <= 0 else min(n, self.n_queries)

    @property
    def tailpatch_index(self) -> np.ndarray:
        """The tail-patched queries: ``n_tailpatch`` spread evenly over the task queries.

        The world lists task queries bucket by bucket, so the first n would patch only the
        rare facts; an even stride keeps every frequency bucket in the sample.
        """
        n = self.n_tailpatch
        return np.unique(np.round(np.linspace(0, self.n_queries - 1, n)).astype(np.int64))


# Restored checkpoints by (run dir, model/train config): experiments run in one process share
# one ``Trained`` and so one apply function, whose jitted kernels then compile only once.
_TRAINED: dict[str, stages.Trained] = {}


def load_trained(cfg: ml_collections.ConfigDict) -> stages.Trained:
    """``stages.load_trained``, memoized per run dir, model and train config and final step."""
    key = _hash(
        os.path.abspath(cfg.run_dir),
        _section(cfg, "model"),
        _section(cfg, "train"),
        checkpoint_step(cfg),
    )
    if key not in _TRAINED:
        _TRAINED[key] = stages.load_trained(cfg)
    return _TRAINED[key]


def checkpoint_step(cfg: ml_collections.ConfigDict) -> int | None:
    """The latest checkpoint step of a run dir (None when there is none)."""
    return checkpoint.latest_step(stages.path(cfg, "checkpoints"))


def ensure_trained(cfg: ml_collections.ConfigDict, progress: bool = True) -> dict:
    """Trains the run unless it has a final checkpoint; returns the greedy-accuracy report.

    A finished run is used as it is (its saved ``results/accuracy.json`` when present), so an
    added config field that does not change training does not force a retrain.
    """
    step = checkpoint_step(cfg)
    if step is None or step < int(cfg.train.steps):
        return stages.stage_train(cfg, progress=progress)
    file = stages.path(cfg, "results", "accuracy.json")
    if os.path.exists(file):
        with open(file) as f:
            return json.load(f)
    t = load_trained(cfg)
    return stages.accuracy_report(cfg, t.apply_fn, t.params, t.tok, t.world)


def make_setup(
    cfg: ml_collections.ConfigDict,
    candidates: str = "candidates",
    trained: stages.Trained | None = None,
) -> Setup:
    """Loads the final checkpoint and encodes the candidate pool and the task queries."""
    trained = trained or load_trained(cfg)
    texts, gt = stages.candidate_pool(cfg, trained.world, trained.tok, candidates)
    cand, _, _ = stages.examples_for(cfg, trained, candidates)
    queries = stages.query_examples(cfg, trained.tok, trained.world.task_queries)
    correct = np.asarray(
        model_lib.greedy_correct(
            trained.apply_fn, trained.params, queries.tokens_NxT, queries.weights_NxT
        )
    )
    tp = cfg.tailpatch
    lr = float(tp.lr) if tp.lr >= 0 else float(cfg.train.final_lr)
    # The training loss is a mean over counted tokens (every position after the first of each
    # window), so one example's share of a batch gradient is g_m / that count.
    tokens_per_batch = float(cfg.train.batch_size * (cfg.train.seq_len - 1))
    return Setup(
        cfg=cfg,
        trained=trained,
        candidates=candidates,
        texts=texts,
        ground_truth=gt,
        cand_tokens_NxS=np.asarray(cand.tokens_NxT),
        cand_weights_NxS=np.asarray(cand.weights_NxT),
        query_tokens_QxT=np.asarray(queries.tokens_NxT),
        query_weights_QxT=np.asarray(queries.weights_NxT),
        correct_Q=correct.astype(bool),
        buckets_Q=np.array([q.bucket for q in trained.world.task_queries]),
        # The checkpoint's correction settings (stages.correction_settings), as in featurize.
        precond=stages.make_preconditioner(cfg, trained),
        lr=lr,
        tokens_per_batch=tokens_per_batch,
    )


def _cache_file(cfg, kind: str, name: str, key: str) -> str:
    return stages.path(cfg, "results", "cache", f"{kind}_{name}_{key}.npz")


def _cached(file: str, make: Callable[[], np.ndarray]) -> np.ndarray:
    if os.path.exists(file):
        with np.load(file) as z:
            return z["value"]
    value = np.asarray(make())
    os.makedirs(os.path.dirname(file), exist_ok=True)
    tmp = f"{file}.tmp{os.getpid()}.npz"
    np.savez(tmp, value=value)
    os.replace(tmp, file)
    return value


# ----- rankings -------------------------------------------------------------------------------


def ensure_stores(
    cfg, trained, candidates: str, corrected: bool, train_tag: str = "", query_tag: str = ""
) -> None:
    """Featurizes (or finds complete) the candidate, task and R_eval stores of one variant."""
    stages.stage_featurize(cfg, candidates, corrected, trained, tag=train_tag)
    stages.stage_featurize(cfg, "task", corrected, trained, tag=query_tag)
    stages.stage_featurize(cfg, cfg.hessian.eval_source, corrected, trained, tag=query_tag)


def ensure_hessian(
    cfg, candidates: str, corrected: bool, train_tag: str = "", query_tag: str = ""
) -> str:
    """Fits R for a store variant unless a fit made with the same ``hessian`` section exists."""
    file = stages.hessian_path(cfg, candidates, corrected, train_tag, query_tag)
    key = _hash(_section(cfg, "hessian"), _section(cfg, "featurize"))
    marker = file + ".key"
    if os.path.exists(file) and os.path.exists(marker):
        with open(marker) as f:
            if f.read().strip() == key:
                return file
    stages.stage_hessian(cfg, candidates, corrected, train_tag, query_tag)
    with open(marker, "w") as f:
        f.write(key + "\n")
    return file


def rank(
    setup: Setup,
    method: str,
    train_tag: str = "",
    query_tag: str = "",
    cfg: ml_collections.ConfigDict | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Top ``score.top_k`` candidate ids per task query (``ids_QxK``) for one method.

    Presets go through the stages (featurize -> R -> streaming score); ``bm25`` ranks by
    prompt + target text; ``random`` by a seeded permutation. ``cfg`` overrides the setup's
    config for store variants (e.g. another query output function).
    """
    cfg = cfg or setup.cfg
    k = int(cfg.score.top_k)
    key = _hash(
        method,
        setup.candidates,
        train_tag,
        query_tag,
        os.path.abspath(cfg.run_dir),
        setup.trained.step,
        [_section(cfg, s) for s in ("world", "model", "featurize", "hessian", "score", "eval")],
    )
    tags = "".join(f"-{t}" for t in (train_tag, query_tag) if t)
    file = _cache_file(cfg, "rank", f"{setup.candidates}_{method}{tags}", key)

    def make() -> np.ndarray:
        queries = setup.trained.world.task_queries
        if method == "bm25":
            texts = [query_text(q.prompt, q.target) for q in queries]
            return bm25_rank(texts, setup.texts, k, stopwords=cfg.eval.bm25_stopwords)
        if method == "random":
            return random_rank(len(queries), len(setup.texts), k, int(cfg.eval.random_seed))
        if method not in score.PRESETS:
            raise ExperimentError(
                f"unknown method {method!r}; choose from {', '.join(ALL_METHODS)}"
            )
        spec = score.get_preset(method)
        ensure_stores(cfg, setup.trained, setup.candidates, spec.corrected, train_tag, query_tag)
        if spec.hessian != "none":
            ensure_hessian(cfg, setup.candidates, spec.corrected, train_tag, query_tag)
        res = stages.stage_score(
            cfg, method, setup.candidates, progress, train_tag=train_tag, query_tag=query_tag
        )
        return res["ids"]

    ids = _cached(file, make)
    if ids.shape[1] < k:  # fewer candidates than k: pad so every method has K columns
        ids = np.concatenate([ids, np.full((ids.shape[0], k - ids.shape[1]), -1)], axis=1)
    return ids.astype(np.int64)


def ground_truth_ids(ground_truth: Sequence[set], k: int) -> np.ndarray:
    """The ground-truth candidates of each query as a ranking (by id), padded with -1."""
    out = np.full((len(ground_truth), k), -1, dtype=np.int64)
    for q, gt in enumerate(ground_truth):
        ids = sorted(gt)[:k]
        out[q, : len(ids)] = ids
    return out


# ----- tail-patch -----------------------------------------------------------------------------


def tailpatch_deltas(setup: Setup, ids_QxK: np.ndarray) -> np.ndarray:
    """``deltas_MxQxK`` (probability, not pp) for the ``tailpatch_index`` queries' top
    ``max(tailpatch.ks)`` proponents, at every learning-rate multiplier (cached)."""
    cfg = setup.cfg
    tp = cfg.tailpatch
    index, k = setup.tailpatch_index, max(tp.ks)
    ids = np.asarray(ids_QxK, np.int64)[index, :k]
    if ids.shape[1] < k:
        ids = np.concatenate([ids, np.full((ids.shape[0], k - ids.shape[1]), -1)], axis=1)
    key = _hash(
        setup.candidates,
        os.path.abspath(cfg.run_dir),
        setup.trained.step,
        _section(cfg, "tailpatch"),
        _section(cfg, "train"),
        _section(cfg, "model"),
        # The step's preconditioner depends on featurize.eps and featurize.v_floor too.
        stages.correction_settings(cfg, setup.trained).to_dict(),
        hashlib.sha256(ids.tobytes()).hexdigest(),
    )
    file = _cache_file(cfg, "tailpatch", setup.candidates, key)

    def make() -> np.ndarray:
        t = setup.trained
        return tailpatch.tailpatch_sweep(
            t.apply_fn,
            t.params,
            setup.query_tokens_QxT[index],
            setup.query_weights_QxT[index],
            setup.cand_tokens_NxS,
            setup.cand_weights_NxS,
            ids,
            lr=setup.lr,
            lr_multipliers=tuple(tp.lr_multipliers),
            precond=setup.precond,
            scale=tp.scale,
            tokens_per_batch=setup.tokens_per_batch,
            carry_momentum=bool(tp.carry_momentum),
            optimizer=t.optimizer,
            opt_state=t.opt_state,
            pair_batch=int(tp.pair_batch),
        )

    return _cached(file, make)


def _default_mult_index(cfg) -> int:
    mults = [float(m) for m in cfg.tailpatch.lr_multipliers]
    if 1.0 not in mults:
        raise ExperimentError(
            f"tailpatch.lr_multipliers = {tuple(mults)} lacks 1.0, the default step; "
            "add it to the sweep"
        )
    return mults.index(1.0)


def per_query_tailpatch(deltas_QxK: np.ndarray, k: int) -> np.ndarray:
    """Per-query mean delta over the top ``k`` in percentage points (NaN: no proponent)."""
    top = np.asarray(deltas_QxK, np.float64)[:, :k]
    valid = ~np.isnan(top)
    mean = np.nansum(top, axis=1) / np.maximum(valid.sum(axis=1), 1)
    return np.where(valid.any(axis=1), 100.0 * mean, np.nan)


def evaluate(
    setup: Setup, ids_QxK: np.ndarray, with_tailpatch: bool = True, with_retrieval: bool = True
) -> tuple[dict, dict]:
    """Metrics of one ranking: ``(row, per_query)``.

    ``row``: mean and ``_se`` of MRR, Recall@k, Precision@k; tail-patch@k (pp, default step)
    with ``_se``; ``sweep`` (one row per lr multiplier). ``per_query``: the per-query arrays
    (retrieval metrics over all queries, ``tailpatch@k`` over ``setup.tailpatch_index``).
    """
    cfg = setup.cfg
    row: dict[str, Any] = {}
    per_query: dict[str, np.ndarray] = {}
    if with_retrieval:
        per_query = metrics.fact_tracing_metrics(
            ids_QxK, setup.ground_truth, int(cfg.eval.mrr_k), int(cfg.eval.at_k)
        )
        for name, values in per_query.items():
            stats = metrics.mean_se(values)
            row[name], row[f"{name}_se"] = stats["mean"], stats["se"]
    if with_tailpatch:
        deltas = tailpatch_deltas(setup, ids_QxK)
        ks = tuple(int(k) for k in cfg.tailpatch.ks)
        at_default = tailpatch.tailpatch_at_k(deltas[_default_mult_index(cfg)], ks)
        row["n_tailpatch_queries"] = at_default.pop("n_queries")
        row.update(at_default)
        row["sweep"] = tailpatch.sweep_table(deltas, cfg.tailpatch.lr_multipliers, setup.lr, ks)
        for k in ks:
            per_query[f"tailpatch@{k}"] = per_query_tailpatch(deltas[_default_mult_index(cfg)], k)
    return row, per_query


def _tailpatch_info(setup: Setup) -> dict:
    tp = setup.cfg.tailpatch
    return {
        "lr": setup.lr,
        "scale": tp.scale,
        "tokens_per_batch": setup.tokens_per_batch,
        "lr_multipliers": list(tp.lr_multipliers),
        "ks": list(tp.ks),
        "carry_momentum": bool(tp.carry_momentum),
        "n_queries": setup.n_tailpatch,
        "query_selection": "evenly spaced over the task queries (all frequency buckets)",
        "unit": "percentage points of p(target | prompt)",
    }


# ----- retrieval experiments (E1, E2, E6, E7) -------------------------------------------------


def _methods(cfg, default: Sequence[str]) -> list[str]:
    methods = list(experiment_section(cfg).get("methods", ()) or default)
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown:
        raise ExperimentError(f"experiment.methods has unknown {unknown}; use {ALL_METHODS}")
    return methods


def retrieval_results(
    cfg: ml_collections.ConfigDict,
    candidates: str,
    methods: Sequence[str],
    trained: stages.Trained | None = None,
    tailpatch_methods: Sequence[str] | None = None,
    progress: bool = True,
) -> tuple[dict, dict, Setup]:
    """Ranks, scores and tail-patches ``methods`` on one candidate pool.

    Returns ``(results, per_query, setup)``: ``results["methods"][name]`` rows (see
    ``evaluate``), ``results["ground_truth"]`` (tail-patch of the fact statements themselves)
    and run facts; ``per_query[name]`` the per-query arrays.
    """
    t0 = time.perf_counter()
    setup = make_setup(cfg, candidates, trained)
    tp_methods = set(methods if tailpatch_methods is None else tailpatch_methods)
    rows, per_query = {}, {}
    tag = str(experiment_section(cfg).get("store_tag", "") or "")
    for method in methods:
        ids = rank(setup, method, train_tag=tag, query_tag=tag, progress=progress)
        rows[method], per_query[method] = evaluate(setup, ids, method in tp_methods)
    k_tp = max(int(k) for k in cfg.tailpatch.ks)
    gt_row, gt_pq = evaluate(
        setup, ground_truth_ids(setup.ground_truth, k_tp), with_retrieval=False
    )
    per_query[GROUND_TRUTH] = gt_pq
    results = {
        "methods": rows,
        "ground_truth": gt_row,
        "n_queries": setup.n_queries,
        "n_candidates": len(setup.texts),
        "candidates": candidates,
        "tailpatch": _tailpatch_info(setup),
        "accuracy": float(np.mean(setup.correct_Q)),
        "lambda_mix": _lambda(cfg, candidates, tag, tag),
        "store_tag": tag,
        "wall_s": time.perf_counter() - t0,
    }
    return results, per_query, setup


def _lambda(cfg, candidates: str, train_tag: str = "", query_tag: str = "") -> float | None:
    file = stages.hessian_path(cfg, candidates, True, train_tag, query_tag)
    if not os.path.exists(file):
        return None
    lam = hessian.HessianFit.load(file).lambda_mix
    return None if lam is None else float(lam)


def main_table(rows: Mapping[str, Mapping], gt_row: Mapping | None, cfg) -> str:
    """Method | MRR | Recall@k | tail-patch@1 | tail-patch@max k (pp, ± standard error)."""
    at_k, k_max = int(cfg.eval.at_k), max(int(k) for k in cfg.tailpatch.ks)
    headers = ["method", "MRR", f"Recall@{at_k}", "tail-patch@1 (pp)", f"tail-patch@{k_max} (pp)"]
    body = []
    for name, r in list(rows.items()) + ([(GROUND_TRUTH, gt_row)] if gt_row else []):
        body.append(
            [
                name,
                report.pm(r.get("mrr"), None, 3, sign=False),
                report.pm(r.get(f"recall@{at_k}"), None, 3, sign=False),
                report.pm(r.get("tailpatch@1"), r.get("tailpatch@1_se")),
                report.pm(r.get(f"tailpatch@{k_max}"), r.get(f"tailpatch@{k_max}_se")),
            ]
        )
    return report.markdown_table(headers, body)


def _sweeps(rows: Mapping[str, Mapping], gt_row: Mapping | None = None) -> dict:
    out = {n: r["sweep"] for n, r in rows.items() if "sweep" in r}
    if gt_row and "sweep" in gt_row:
        out[GROUND_TRUTH] = gt_row["sweep"]
    return out


def _sweep_section(rows, gt_row, cfg) -> str:
    k_max = max(int(k) for k in cfg.tailpatch.ks)
    return (
        f"Tail-patch@{k_max} (pp) over learning-rate multipliers (1× = final training lr):\n\n"
        + report.sweep_markdown(_sweeps(rows, gt_row), f"tailpatch@{k_max}")
    )


def _header(setup: Setup, results: dict, title: str) -> str:
    tp = results["tailpatch"]
    return (
        f"## {title}\n\n{results['n_queries']} queries (MRR, recall), {tp['n_queries']} "
        f"tail-patched; {results['n_candidates']} candidates ({setup.candidates}); greedy "
        f"accuracy {results['accuracy']:.3f}; λ = {results.get('lambda_mix')}; tail-patch lr "
        f"{tp['lr']:.1e}, scale {tp['scale']} (1/{tp['tokens_per_batch']:.0f}).\n"
    )


def _plot_methods(rows, gt_row, cfg, title: str, file: str) -> str:
    k_max = max(int(k) for k in cfg.tailpatch.ks)
    names = list(rows)
    tp_rows = dict(rows, **({GROUND_TRUTH: gt_row} if gt_row else {}))
    tp_names = list(tp_rows)
    mrr = report.bar_panels(
        names + ([GROUND_TRUTH] if gt_row else []),
        [
            ("MRR", [rows[n].get("mrr") for n in names] + ([None] if gt_row else []), None),
            (
                f"tail-patch@{k_max} (pp)",
                [tp_rows[n].get(f"tailpatch@{k_max}") for n in tp_names],
                [tp_rows[n].get(f"tailpatch@{k_max}_se") for n in tp_names],
            ),
        ],
        title,
        file,
    )
    return mrr


def _plot_sweep(rows, gt_row, cfg, title: str, file: str) -> str | None:
    sweeps = _sweeps(rows, gt_row)
    if not sweeps:
        return None
    k_max = max(int(k) for k in cfg.tailpatch.ks)
    mults = [float(m) for m in cfg.tailpatch.lr_multipliers]
    series = {
        n: ([r[f"tailpatch@{k_max}"] for r in s], [r[f"tailpatch@{k_max}_se"] for r in s])
        for n, s in sweeps.items()
    }
    return report.line_chart(
        mults, series, "lr multiplier", f"tail-patch@{k_max} (pp)", title, file, logx=True
    )


def run_e1(cfg: ml_collections.ConfigDict, progress: bool = True) -> dict:
    """E1 (paper Table 1): every preset + bm25 + random on the closed set."""
    return _run_retrieval(cfg, "candidates", ALL_METHODS, "E1: closed-set fact tracing", progress)


def run_e2(cfg: ml_collections.ConfigDict, progress: bool = True) -> dict:
    """E2 (paper Table 2): the open set, candidates = the training corpus passages."""
    return _run_retrieval(
        cfg,
        "corpus",
        ("bm25", "random", "grad_dot", "grad_cosine", "trackstar"),
        "E2: open-set fact tracing (training corpus passages)",
        progress,
    )


def _run_retrieval(cfg, candidates, default_methods, title, progress) -> dict:
    methods = _methods(cfg, default_methods)
    results, _, setup = retrieval_results(cfg, candidates, methods, progress=progress)
    results["experiment"] = experiment_section(cfg).name
    rows, gt_row = results["methods"], results["ground_truth"]
    md = "\n".join(
        [
            _header(setup, results, title),
            main_table(rows, gt_row, cfg),
            "",
            _sweep_section(rows, gt_row, cfg),
        ]
    )
    out = _write_results(cfg, results, md)
    _plot_methods(rows, gt_row, cfg, title, os.path.join(out, "methods.png"))
    _plot_sweep(rows, gt_row, cfg, title + ": lr sweep", os.path.join(out, "sweep.png"))
    results["markdown"] = md
    return results


def run_e6(cfg: ml_collections.ConfigDict, progress: bool = True) -> dict:
    """E6 (paper Table A.6): tail-patch@1, 3, 5, 10 per method (with the lr sweep of each)."""
    methods = _methods(cfg, ALL_METHODS)
    results, _, setup = retrieval_results(cfg, "candidates", methods, progress=progress)
    results["experiment"] = experiment_section(cfg).name
    ks = [int(k) for k in cfg.tailpatch.ks]
    rows = dict(results["methods"], **{GROUND_TRUTH: results["ground_truth"]})
    table = report.markdown_table(
        ["method", *[f"tail-patch@{k} (pp)" for k in ks]],
        [
            [n, *[report.pm(r.get(f"tailpatch@{k}"), r.get(f"tailpatch@{k}_se")) for k in ks]]
            for n, r in rows.items()
        ],
    )
    sweeps = [
        f"Tail-patch@{k} (pp) over lr multipliers:\n\n"
        + report.sweep_markdown(_sweeps(rows), f"tailpatch@{k}")
        for k in ks
    ]
    md = "\n\n".join([_header(setup, results, "E6: tail-patch@k"), table, *sweeps])
    out = _write_results(cfg, results, md)
    series = {
        n: ([r[f"tailpatch@{k}"] for k in ks], [r[f"tailpatch@{k}_se"] for k in ks])
        for n, r in rows.items()
    }
    report.line_chart(
        ks,
        series,
        "k (top-k proponents)",
        "tail-patch@k (pp)",
        "E6: tail-patch@k",
        os.path.join(out, "tailpatch_at_k.png"),
    )
    results["markdown"] = md
    return results


def run_e7(cfg: ml_collections.ConfigDict, progress: bool = True) -> dict:
    """E7 (paper Table A.7): metrics split by greedy correctness and by frequency bucket."""
    methods = _methods(cfg, ("bm25", "grad_cosine", "exp_opt_norm", "trackstar"))
    results, per_query, setup = retrieval_results(cfg, "candidates", methods, progress=progress)
    results["experiment"] = experiment_section(cfg).name
    at_k, k_max = int(cfg.eval.at_k), max(int(k) for k in cfg.tailpatch.ks)
    groups_all = {"correct": setup.correct_Q, "bucket": setup.buckets_Q}
    groups_tp = {name: g[setup.tailpatch_index] for name, g in groups_all.items()}
    splits: dict[str, dict] = {}
    for method in [*methods, GROUND_TRUTH]:
        pq = per_query[method]
        ret = {m: v for m, v in pq.items() if not m.startswith("tailpatch")}
        tp = {m: v for m, v in pq.items() if m.startswith("tailpatch")}
        splits[method] = {
            **(metrics.summarize(ret, groups_all) if ret else {}),
            **(metrics.summarize(tp, groups_tp) if tp else {}),
        }
    results["splits"] = splits
    results["split_sizes"] = {
        split: {str(v): int(np.sum(g == v)) for v in np.unique(g)}
        for split, g in groups_all.items()
    }
    # Per-bucket accuracy of the task queries, the split's own context.
    results["accuracy_by_bucket"] = {
        str(b): float(np.mean(setup.correct_Q[setup.buckets_Q == b]))
        for b in np.unique(setup.buckets_Q)
    }
    sections = [_header(setup, results, "E7: splits by correctness and frequency")]
    for split in ("correct", "bucket"):
        labels = sorted(results["split_sizes"][split], key=_label_order)
        body = []
        for method, s in splits.items():
            for label in labels:
                cell = {m: s[m]["by"][split].get(label, {}) for m in s}
                body.append(
                    [
                        method,
                        label,
                        results["split_sizes"][split][label],
                        report.pm(cell.get("mrr", {}).get("mean"), None, 3, sign=False),
                        report.pm(cell.get(f"recall@{at_k}", {}).get("mean"), None, 3, False),
                        report.pm(
                            cell.get(f"tailpatch@{k_max}", {}).get("mean"),
                            cell.get(f"tailpatch@{k_max}", {}).get("se"),
                        ),
                    ]
                )
        sections.append(
            f"By {split}:\n\n"
            + report.markdown_table(
                ["method", split, "queries", "MRR", f"Recall@{at_k}", f"tail-patch@{k_max} (pp)"],
                body,
            )
        )
    sections.append(_sweep_section(results["methods"], results["ground_truth"], cfg))
    md = "\n\n".join(sections)
    out = _write_results(cfg, results, md)
    for split in ("correct", "bucket"):
        labels = sorted(results["split_sizes"][split], key=_label_order)
        for metric, label_y, with_gt in (
            ("mrr", "MRR", False),
            (f"tailpatch@{k_max}", f"tail-patch@{k_max} (pp)", True),
        ):
            series = {}
            for method, s in splits.items():
                if metric not in s or (method == GROUND_TRUTH and not with_gt):
                    continue
                by = s[metric]["by"][split]
                series[method] = (
                    [by.get(lab, {}).get("mean") for lab in labels],
                    [by.get(lab, {}).get("se") for lab in labels],
                )
            report.grouped_bars(
                labels,
                series,
                split,
                label_y,
                f"E7: {label_y} by {split}",
                os.path.join(out, f"{metric.replace('@', '_at_')}_by_{split}.png"),
            )
    results["markdown"] = md
    return results


def _label_order(label: str) -> tuple:
    try:
        return (0, float(label))
    except ValueError:
        return (1, label)


# ----- E3: projection dimension ---------------------------------------------------------------


def subgrid(vectors_NxD: np.ndarray, k_in: int, k_out: int, k: int) -> np.ndarray:
    """The top-left ``k x k`` block of global-mode Kronecker vectors, rescaled to variance 1/k.

    A global-mode vector is ``sum_l A_l^T G_l B_l`` flattened row-major from a ``k_in x k_out``
    grid; its ``[:k, :k]`` block is the same sum with only the first ``k`` columns of every
    ``A_l`` and ``B_l``, i.e. an independent Gaussian Kronecker projection to ``d = k^2``. The
    factor ``sqrt(k_in/k) * sqrt(k_out/k)`` restores the ``1/k`` entry variance (E[PᵀP] = I).
    """
    n = vectors_NxD.shape[0]
    if vectors_NxD.shape[1] != k_in * k_out:
        raise ExperimentError(
            f"vectors have d = {vectors_NxD.shape[1]}, not k_in * k_out = {k_in * k_out}"
        )
    if not 0 < k <= min(k_in, k_out):
        raise ExperimentError(f"sub-grid k = {k} must be in [1, min(k_in, k_out)]")
    grid = np.asarray(vectors_NxD, np.float32).reshape(n, k_in, k_out)[:, :k, :k]
    return grid.reshape(n, k * k) * np.float32(math.sqrt(k_in / k) * math.sqrt(k_out / k))


def run_e3(cfg: ml_collections.ConfigDict, progress: bool = True) -> dict:
    """E3 (paper Fig. 2 left): MRR and tail-patch vs projection dimension d = k·k.

    The stores are featurized once at the config's ``k_in x k_out`` (global mode); every
    smaller d is the ``subgrid`` of those vectors (exact, no re-featurization). Methods in
    ``experiment.tailpatch_methods`` are tail-patched at every d.
    """
    t0 = time.perf_counter()
    ex = experiment_section(cfg)
    f = cfg.featurize
    if f.projection_mode != "global":
        raise ExperimentError(
            "E3 sub-grids global-mode vectors; set featurize.projection_mode = 'global'"
        )
    methods = _methods(cfg, ("grad_cosine", "exp_opt_norm", "trackstar"))
    tp_methods = set(ex.get("tailpatch_methods", ("trackstar",)))
    ks = sorted(int(k) for k in ex.k_values)
    setup = make_setup(cfg, "candidates")
    vectors: dict[tuple[bool, str], np.ndarray] = {}

    def read(corrected: bool, which: str) -> np.ndarray:
        if (corrected, which) not in vectors:
            # The sub-grid vectors go into R and scores as plain arrays, which carry no
            # metadata to check later: every store must match the candidate store here.
            ref = stages.open_store(stages.store_path(cfg, "candidates", corrected))
            st = stages.open_store(
                stages.store_path(cfg, which, corrected), ref.meta, ("candidates", which)
            )
            vectors[(corrected, which)] = np.asarray(st.read_all()[1], np.float32)
        return vectors[(corrected, which)]

    rows: dict[str, dict[str, dict]] = {m: {} for m in methods}
    for method in methods:
        spec = score.get_preset(method)
        ensure_stores(cfg, setup.trained, "candidates", spec.corrected)
        for k in ks:
            d = k * k
            if k == f.k_in == f.k_out:
                ids = rank(setup, method, progress=progress)  # the stored d: E1's ranking
            else:
                key = _hash(
                    method,
                    k,
                    os.path.abspath(cfg.run_dir),
                    setup.trained.step,
                    [_section(cfg, s) for s in ("featurize", "hessian", "score")],
                )

                def make(method=method, spec=spec, k=k, d=d) -> np.ndarray:
                    sub = {
                        w: subgrid(read(spec.corrected, w), f.k_in, f.k_out, k)
                        for w in ("candidates", "task", cfg.hessian.eval_source)
                    }
                    fit = None
                    if spec.hessian != "none":
                        fit = hessian.fit_hessian(
                            sub["candidates"], sub[cfg.hessian.eval_source], cfg.hessian, d
                        )
                    ids, _ = score.score_preset(
                        sub["candidates"],
                        sub["task"],
                        method,
                        fit,
                        int(cfg.score.top_k),
                        rows_per_step=int(cfg.score.chunk_rows),
                    )
                    return ids

                ids = _cached(_cache_file(cfg, "rank", f"candidates_{method}-k{k}", key), make)
            row, _ = evaluate(setup, ids, with_tailpatch=method in tp_methods)
            rows[method][str(d)] = dict(row, k_in=k, k_out=k)
    results = {
        "experiment": ex.name,
        "d_values": [k * k for k in ks],
        "methods": rows,
        "n_queries": setup.n_queries,
        "tailpatch": _tailpatch_info(setup),
        "note": "smaller d = top-left k x k sub-grid of the stored global Kronecker vectors",
        "wall_s": time.perf_counter() - t0,
    }
    at_k, k_max = int(cfg.eval.at_k), max(int(k) for k in cfg.tailpatch.ks)
    body = []
    for method, by_d in rows.items():
        for d, r in by_d.items():
            body.append(
                [
                    method,
                    d,
                    report.pm(r.get("mrr"), None, 3, sign=False),
                    report.pm(r.get(f"recall@{at_k}"), None, 3, sign=False),
                    report.pm(r.get(f"tailpatch@{k_max}"), r.get(f"tailpatch@{k_max}_se")),
                ]
            )
    sweeps = {
        f"{m} d={d}": r["sweep"]
        for m, by_d in rows.items()
        for d, r in by_d.items()
        if "sweep" in r
    }
    md = "\n\n".join(
        [
            f"## E3: quality vs projection dimension d\n\n{setup.n_queries} queries, "
            f"{setup.n_tailpatch} tail-patched; d = k·k from the stored "
            f"{f.k_in}x{f.k_out} grid.",
            report.markdown_table(
                ["method", "d", "MRR", f"Recall@{at_k}", f"tail-patch@{k_max} (pp)"], body
            ),
            f"Tail-patch@{k_max} (pp) over lr multipliers:\n\n"
            + report.sweep_markdown(sweeps, f"tailpatch@{k_max}"),
        ]
    )
    out = _write_results(cfg, results, md)
    ds = [k * k for k in ks]
    report.line_chart(
        ds,
        {m: ([rows[m][str(d)].get("mrr") for d in ds], None) for m in methods},
        "projection dim d",
        "MRR",
        "E3: MRR vs d",
        os.path.join(out, "mrr_vs_d.png"),
        logx=True,
    )
    tp_series = {
        m: (
            [rows[m][str(d)].get(f"tailpatch@{k_max}") for d in ds],
            [rows[m][str(d)].get(f"tailpatch@{k_max}_se") for d in ds],
        )
        for m in methods
        if m in tp_methods
    }
    if tp_series:
        report.line_chart(
            ds,
            tp_series,
            "projection dim d",
            f"tail-patch@{k_max} (pp)",
            "E3: tail-patch vs d",
            os.path.join(out, "tailpatch_vs_d.png"),
            logx=True,
        )
    results["markdown"] = md
    return results


# ----- E4: model sizes ------------------------------------------------------------------------


def run_e4(cfg: ml_collections.ConfigDict, progress: bool = True) -> dict:
    """E4 (paper Fig. 2 right): the comparison across model sizes.

    ``experiment.variants`` maps a name to config overrides (``model`` sizes, and its own run
    dir as ``run_dir`` or ``run_dir_suffix`` appended to the base one); each variant is trained
    (or resumed) in its run dir on the same world.
    """
    t0 = time.perf_counter()
    ex = experiment_section(cfg)
    methods = _methods(cfg, ("bm25", "random", "grad_cosine", "exp_opt_norm", "trackstar"))
    variants: dict[str, dict] = {}
    for name, overrides in ex.variants.items():
        overrides = overrides.to_dict() if hasattr(overrides, "to_dict") else dict(overrides)
        # A suffix keeps a variant's run dir beside the base one whatever run_dir is set to.
        suffix = overrides.pop("run_dir_suffix", "")
        vcfg = with_overrides(cfg, overrides)
        if suffix:
            vcfg.run_dir = cfg.run_dir + suffix
        stages.stage_world(vcfg)
        acc = ensure_trained(vcfg, progress=progress)
        trained = load_trained(vcfg)
        res, _, _ = retrieval_results(vcfg, "candidates", methods, trained, progress=progress)
        res["n_params"] = model_lib.count_params(trained.params)
        res["accuracy_report"] = acc
        res["run_dir"] = vcfg.run_dir
        variants[name] = res
    results = {
        "experiment": ex.name,
        "variants": variants,
        "wall_s": time.perf_counter() - t0,
    }
    at_k, k_max = int(cfg.eval.at_k), max(int(k) for k in cfg.tailpatch.ks)
    body = []
    for name, res in variants.items():
        rows = dict(res["methods"], **{GROUND_TRUTH: res["ground_truth"]})
        for method, r in rows.items():
            body.append(
                [
                    name,
                    res["n_params"],
                    f"{res['accuracy']:.3f}",
                    method,
                    report.pm(r.get("mrr"), None, 3, sign=False),
                    report.pm(r.get(f"recall@{at_k}"), None, 3, sign=False),
                    report.pm(r.get(f"tailpatch@{k_max}"), r.get(f"tailpatch@{k_max}_se")),
                ]
            )
    sweeps = {
        f"{name}: {m}": s
        for name, res in variants.items()
        for m, s in _sweeps(res["methods"], res["ground_truth"]).items()
    }
    md = "\n\n".join(
        [
            "## E4: across model sizes",
            report.markdown_table(
                [
                    "model",
                    "params",
                    "greedy acc.",
                    "method",
                    "MRR",
                    f"Recall@{at_k}",
                    f"tail-patch@{k_max} (pp)",
                ],
                body,
            ),
            f"Tail-patch@{k_max} (pp) over lr multipliers:\n\n"
            + report.sweep_markdown(sweeps, f"tailpatch@{k_max}"),
        ]
    )
    out = _write_results(cfg, results, md)
    names = list(variants)
    groups = [f"{n}\n({variants[n]['n_params'] / 1e6:.2f}M)" for n in names]
    for metric, label in (("mrr", "MRR"), (f"tailpatch@{k_max}", f"tail-patch@{k_max} (pp)")):
        series = {
            m: (
                [variants[n]["methods"][m].get(metric) for n in names],
                [variants[n]["methods"][m].get(f"{metric}_se") for n in names],
            )
            for m in methods
        }
        report.grouped_bars(
            groups,
            series,
            "model",
            label,
            f"E4: {label} by model size",
            os.path.join(out, f"{metric.replace('@', '_at_')}_by_model.png"),
        )
    results["markdown"] = md
    return results


# ----- E5: output function --------------------------------------------------------------------


def run_e5(cfg: ml_collections.ConfigDict, progress: bool = True) -> dict:
    """E5 (paper Table A.3): the query output function, ``loss`` vs ``margin`` vs ``logit``.

    Each output function has its own query stores (tag = its name; ``loss`` is the default
    store) and its own R (R_eval comes from the queries); the candidate store is shared.
    """
    t0 = time.perf_counter()
    ex = experiment_section(cfg)
    methods = _methods(cfg, ("exp_opt_norm", "trackstar"))
    tp_methods = set(ex.get("tailpatch_methods", ("trackstar",)))
    setup = make_setup(cfg, "candidates")
    rows: dict[str, dict[str, dict]] = {}
    lambdas = {}
    store_tag = str(ex.get("store_tag", "") or "")
    for fn in ex.output_fns:
        vcfg = with_overrides(cfg, {"featurize": {"query_output_fn": fn}})
        tag = "-".join(t for t in (store_tag, "" if fn == "loss" else fn) if t)
        rows[fn] = {}
        for method in methods:
            ids = rank(setup, method, store_tag, tag, cfg=vcfg, progress=progress)
            rows[fn][method], _ = evaluate(setup, ids, with_tailpatch=method in tp_methods)
        lambdas[fn] = _lambda(vcfg, "candidates", store_tag, tag)
    results = {
        "experiment": ex.name,
        "output_fns": rows,
        "lambda_mix": lambdas,
        "n_queries": setup.n_queries,
        "tailpatch": _tailpatch_info(setup),
        "wall_s": time.perf_counter() - t0,
    }
    at_k, k_max = int(cfg.eval.at_k), max(int(k) for k in cfg.tailpatch.ks)
    body = [
        [
            fn,
            method,
            report.pm(r.get("mrr"), None, 3, sign=False),
            report.pm(r.get(f"recall@{at_k}"), None, 3, sign=False),
            report.pm(r.get(f"tailpatch@{k_max}"), r.get(f"tailpatch@{k_max}_se")),
        ]
        for fn, by_m in rows.items()
        for method, r in by_m.items()
    ]
    sweeps = {
        f"{fn}: {m}": r["sweep"]
        for fn, by_m in rows.items()
        for m, r in by_m.items()
        if "sweep" in r
    }
    md = "\n\n".join(
        [
            f"## E5: query output function\n\n{setup.n_queries} queries, {setup.n_tailpatch} "
            f"tail-patched; λ per output function: {lambdas}.",
            report.markdown_table(
                ["output fn", "method", "MRR", f"Recall@{at_k}", f"tail-patch@{k_max} (pp)"],
                body,
            ),
            f"Tail-patch@{k_max} (pp) over lr multipliers:\n\n"
            + report.sweep_markdown(sweeps, f"tailpatch@{k_max}"),
        ]
    )
    out = _write_results(cfg, results, md)
    fns = list(rows)
    for metric, label in (("mrr", "MRR"), (f"tailpatch@{k_max}", f"tail-patch@{k_max} (pp)")):
        series = {
            m: (
                [rows[fn][m].get(metric) for fn in fns],
                [rows[fn][m].get(f"{metric}_se") for fn in fns],
            )
            for m in methods
            if metric == "mrr" or m in tp_methods
        }
        report.grouped_bars(
            fns,
            series,
            "query output function",
            label,
            f"E5: {label} by output function",
            os.path.join(out, f"{metric.replace('@', '_at_')}_by_output_fn.png"),
        )
    results["markdown"] = md
    return results


RUNNERS: dict[str, Callable[..., dict]] = {
    "e1": run_e1,
    "e2": run_e2,
    "e3": run_e3,
    "e4": run_e4,
    "e5": run_e5,
    "e6": run_e6,
    "e7": run_e7,
}


def run(cfg: ml_collections.ConfigDict, progress: bool = True) -> dict:
    """Runs the experiment named by ``cfg.experiment.name`` (one of ``RUNNERS``)."""
    name = experiment_section(cfg).name
    if name not in RUNNERS:
        raise ExperimentError(f"experiment.name = {name!r}; choose one of {', '.join(RUNNERS)}")
    return RUNNERS[name](cfg, progress=progress)
