"""E6 (paper Table A.6): tail-patch@1, 3, 5, 10 for every method, with the lr sweep of each.

Same rankings and tail-patch deltas as E1 (its caches) when the configs agree: only the
reported cut-offs ``tailpatch.ks`` differ.
"""

from __future__ import annotations

import os

import ml_collections

from trackstar import report
from trackstar.experiments.evaluation import methods_from, retrieval_results
from trackstar.experiments.harness import (
    ALL_METHODS,
    GROUND_TRUTH,
    experiment_section,
    write_results,
)


def run(cfg: ml_collections.ConfigDict, progress: bool = True) -> dict:
    """E6: tail-patch@k for every k in ``tailpatch.ks``, per method and for the ground truth."""
    methods = methods_from(cfg, ALL_METHODS)
    results, _, setup = retrieval_results(cfg, "candidates", methods, progress=progress)
    results["experiment"] = experiment_section(cfg).name
    ks = [int(k) for k in cfg.tailpatch.ks]
    rows = dict(results["methods"], **{GROUND_TRUTH: results["ground_truth"]})
    sweeps = [
        f"Tail-patch@{k} (pp) over lr multipliers:\n\n"
        + report.sweep_markdown(report.sweeps_of(rows), f"tailpatch@{k}")
        for k in ks
    ]
    md = "\n\n".join(
        [
            report.retrieval_header("E6: tail-patch@k", results, setup.candidates),
            report.tailpatch_at_k_table(rows, ks),
            *sweeps,
        ]
    )
    out = write_results(cfg, results, md)
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
