"""E1 (paper Table 1): every scoring preset + bm25 + random on the closed candidate set.

Writes ``results.json``, ``table.md`` (MRR, Recall@k, tail-patch@1 and @max k, the lr sweep),
``methods.png``, ``sweep.png`` and, with ``viewer.write``, ``proponents/<method>.jsonl.gz``
(``experiments.records``: what ``trackstar view`` shows). ``run_retrieval`` is also E2's
runner (another pool).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import ml_collections

from trackstar import report
from trackstar.experiments.evaluation import methods_from, retrieval_results
from trackstar.experiments.harness import (
    ALL_METHODS,
    GROUND_TRUTH,
    cutoffs,
    experiment_section,
    write_results,
)
from trackstar.experiments.records import viewer_settings, write_method_records


def run(cfg: ml_collections.ConfigDict, progress: bool = True) -> dict:
    """E1: every preset + bm25 + random on the closed set (``experiment.methods`` or all)."""
    return run_retrieval(cfg, "candidates", ALL_METHODS, "E1: closed-set fact tracing", progress)


def run_retrieval(
    cfg: ml_collections.ConfigDict,
    candidates: str,
    default_methods: Sequence[str],
    title: str,
    progress: bool = True,
) -> dict:
    """Ranks, evaluates and tail-patches the methods on one pool; writes the table and plots."""
    methods = methods_from(cfg, default_methods)
    results, per_query, setup = retrieval_results(cfg, candidates, methods, progress=progress)
    results["experiment"] = experiment_section(cfg).name
    at_k, k_max = cutoffs(cfg)
    rows, gt = results["methods"], {GROUND_TRUTH: results["ground_truth"]}
    md = "\n".join(
        [
            report.retrieval_header(title, results, setup.candidates),
            report.main_table({**rows, **gt}, at_k, k_max),
            "",
            report.sweep_section({**rows, **gt}, k_max),
        ]
    )
    out = write_results(cfg, results, md)
    if viewer_settings(cfg)["write"]:  # proponents/<method>.jsonl.gz: what the viewer shows
        write_method_records(
            setup, methods, per_query, out, tag=results["store_tag"], progress=progress
        )
    report.method_bars(rows, gt, k_max, title, os.path.join(out, "methods.png"))
    report.sweep_chart(
        {**rows, **gt},
        cfg.tailpatch.lr_multipliers,
        k_max,
        title + ": lr sweep",
        os.path.join(out, "sweep.png"),
    )
    results["markdown"] = md
    return results
