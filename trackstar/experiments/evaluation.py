"""Metrics of a ranking: tail-patch deltas (cached), MRR / Recall / Precision and tail-patch@k.

Tail-patch (docs/method.md, Tail-patch; ``tailpatch`` section): final learning rate,
``batch_share`` scale = 1 / counted tokens of one training batch, the checkpoint's
preconditioner, proponents = each method's top ``max(tailpatch.ks)``, plus a ``ground_truth``
row (the query's own fact statements as proponents) and a sweep over
``tailpatch.lr_multipliers`` in every table.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from trackstar import hessian, metrics, stages, tailpatch
from trackstar.experiments.harness import (
    ALL_METHODS,
    GROUND_TRUTH,
    ExperimentError,
    Setup,
    experiment_section,
    ground_truth_ids,
    make_setup,
    rank,
)

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
    key = stages.config_key(
        setup.candidates,
        os.path.abspath(cfg.run_dir),
        setup.trained.step,
        stages.config_section(cfg, "tailpatch"),
        stages.config_section(cfg, "train"),
        stages.config_section(cfg, "model"),
        # The step's preconditioner depends on featurize.eps and featurize.v_floor too.
        stages.correction_settings(cfg, setup.trained).to_dict(),
        hashlib.sha256(ids.tobytes()).hexdigest(),
    )

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
            counted_tokens_per_batch=setup.counted_tokens_per_batch,
            carry_momentum=bool(tp.carry_momentum),
            optimizer=t.optimizer,
            opt_state=t.opt_state,
            pair_batch=int(tp.pair_batch),
        )

    return stages.cached_array(cfg, "tailpatch", setup.candidates, key, make)


def default_mult_index(cfg) -> int:
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
        at_default = tailpatch.tailpatch_at_k(deltas[default_mult_index(cfg)], ks)
        row["n_tailpatch_queries"] = at_default.pop("n_queries")
        row.update(at_default)
        row["sweep"] = tailpatch.sweep_table(deltas, cfg.tailpatch.lr_multipliers, setup.lr, ks)
        for k in ks:
            per_query[f"tailpatch@{k}"] = per_query_tailpatch(deltas[default_mult_index(cfg)], k)
    return row, per_query


def paired_rows(
    per_query: Mapping[Any, Mapping[str, np.ndarray]],
    pairs: Sequence[tuple[Any, Any]],
    metric_names: Sequence[str],
) -> list[dict]:
    """For each pair ``(a, b)`` of ``per_query`` keys and each metric both have: mean ± se over
    queries of the per-query difference a − b (``metrics.mean_se``; NaN entries left out).
    Tail-patch differences are in pp, as ``evaluate`` gives them."""
    out = []
    for a, b in pairs:
        pa, pb = per_query.get(a, {}), per_query.get(b, {})
        for name in metric_names:
            if name in pa and name in pb:
                diff = np.asarray(pa[name], np.float64) - np.asarray(pb[name], np.float64)
                out.append({"a": a, "b": b, "metric": name, **metrics.mean_se(diff)})
    return out


def tailpatch_info(setup: Setup) -> dict:
    tp = setup.cfg.tailpatch
    return {
        "lr": setup.lr,
        "scale": tp.scale,
        "counted_tokens_per_batch": setup.counted_tokens_per_batch,
        "lr_multipliers": list(tp.lr_multipliers),
        "ks": list(tp.ks),
        "carry_momentum": bool(tp.carry_momentum),
        "n_queries": setup.n_tailpatch,
        "query_selection": "evenly spaced over the task queries (all frequency buckets)",
        "unit": "percentage points of p(target | prompt)",
    }


# ----- many methods on one candidate pool (E1, E2, E4, E6, E7) ------------------------------------


def methods_from(cfg, default: Sequence[str]) -> list[str]:
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
        "tailpatch": tailpatch_info(setup),
        "accuracy": float(np.mean(setup.correct_Q)),
        "lambda_mix": lambda_mix(cfg, candidates, tag, tag),
        "store_tag": tag,
        "wall_s": time.perf_counter() - t0,
    }
    return results, per_query, setup


def lambda_mix(cfg, candidates: str, train_tag: str = "", query_tag: str = "") -> float | None:
    file = stages.hessian_path(cfg, candidates, True, train_tag, query_tag)
    if not os.path.exists(file):
        return None
    lam = hessian.HessianFit.load(file).lambda_mix
    return None if lam is None else float(lam)
