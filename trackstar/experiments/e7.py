"""E7 (paper Table A.7): metrics split by greedy correctness and by fact frequency bucket.

Correctness = greedy decoding reproduces the target; buckets = corpus frequency f. Retrieval
metrics are split over all task queries, tail-patch over the tail-patched ones.
"""

from __future__ import annotations

import os

import ml_collections
import numpy as np

from trackstar import metrics, report
from trackstar.experiments.evaluation import methods_from, retrieval_results
from trackstar.experiments.harness import (
    GROUND_TRUTH,
    cutoffs,
    experiment_section,
    write_results,
)

DEFAULT_METHODS = ("bm25", "grad_cosine", "exp_opt_norm", "trackstar")


def run(cfg: ml_collections.ConfigDict, progress: bool = True) -> dict:
    """E7: every metric per correctness and per frequency bucket, per method."""
    methods = methods_from(cfg, DEFAULT_METHODS)
    results, per_query, setup = retrieval_results(cfg, "candidates", methods, progress=progress)
    results["experiment"] = experiment_section(cfg).name
    at_k, k_max = cutoffs(cfg)
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
    sizes = {
        split: {str(v): int(np.sum(g == v)) for v in np.unique(g)}
        for split, g in groups_all.items()
    }
    results["split_sizes"] = sizes
    # Per-bucket accuracy of the task queries, the split's own context.
    results["accuracy_by_bucket"] = {
        str(b): float(np.mean(setup.correct_Q[setup.buckets_Q == b]))
        for b in np.unique(setup.buckets_Q)
    }
    title = "E7: splits by correctness and frequency"
    sections = [report.retrieval_header(title, results, setup.candidates)]
    for split in ("correct", "bucket"):
        table = report.split_table(splits, split, sizes[split], at_k, k_max)
        sections.append(f"By {split}:\n\n" + table)
    gt = {GROUND_TRUTH: results["ground_truth"]}
    sections.append(report.sweep_section({**results["methods"], **gt}, k_max))
    md = "\n\n".join(sections)
    out = write_results(cfg, results, md)
    for split in ("correct", "bucket"):
        labels = sorted(sizes[split], key=report.label_order)
        for metric, label_y, skip in (
            ("mrr", "MRR", (GROUND_TRUTH,)),
            (f"tailpatch@{k_max}", f"tail-patch@{k_max} (pp)", ()),
        ):
            report.split_bars(
                splits,
                split,
                labels,
                metric,
                label_y,
                f"E7: {label_y} by {split}",
                os.path.join(out, f"{metric.replace('@', '_at_')}_by_{split}.png"),
                skip=skip,
            )
    results["markdown"] = md
    return results
