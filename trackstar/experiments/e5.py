"""E5 (paper Table A.3): the query output function, ``loss`` vs ``margin`` vs ``logit``.

Each output function has its own query stores and R (R_eval is built from query vectors); the
candidate store is shared.
"""

from __future__ import annotations

import time

import ml_collections

from trackstar import report
from trackstar.experiments.evaluation import evaluate, lambda_mix, methods_from, tailpatch_info
from trackstar.experiments.harness import (
    cutoffs,
    experiment_section,
    make_setup,
    rank,
    with_overrides,
    write_results,
)


def run(cfg: ml_collections.ConfigDict, progress: bool = True) -> dict:
    """E5 (paper Table A.3): the query output function, ``loss`` vs ``margin`` vs ``logit``.

    Each output function has its own query stores (tag = its name; ``loss`` is the default
    store) and its own R (R_eval comes from the queries); the candidate store is shared.
    """
    t0 = time.perf_counter()
    ex = experiment_section(cfg)
    methods = methods_from(cfg, ("exp_opt_norm", "trackstar"))
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
        lambdas[fn] = lambda_mix(vcfg, "candidates", store_tag, tag)
    results = {
        "experiment": ex.name,
        "output_fns": rows,
        "lambda_mix": lambdas,
        "n_queries": setup.n_queries,
        "tailpatch": tailpatch_info(setup),
        "wall_s": time.perf_counter() - t0,
    }
    at_k, k_max = cutoffs(cfg)
    md = "\n\n".join(
        [
            f"## E5: query output function\n\n{setup.n_queries} queries, {setup.n_tailpatch} "
            f"tail-patched; λ per output function: {lambdas}.",
            report.nested_metric_table(
                rows, ["output fn", "method"], at_k, k_max, lambda fn, m: f"{fn}: {m}"
            ),
        ]
    )
    out = write_results(cfg, results, md)
    fns = list(rows)
    report.metric_bar_charts(
        fns,
        rows,
        fns,
        lambda metric: [m for m in methods if metric == "mrr" or m in tp_methods],
        k_max,
        "query output function",
        "E5: {label} by output function",
        out,
        "{metric}_by_output_fn.png",
    )
    results["markdown"] = md
    return results
