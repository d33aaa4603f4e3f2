"""Fact-tracing metrics over ranked candidate lists (docs/method.md, Evaluation).

A ranking is an int array ``ranked_ids_QxK``: row q lists candidate ids, best first. Negative ids
are padding (fewer than K candidates retrieved) and never count as hits. Ground truth is one set
of candidate ids per query. Every metric has a per-query form (for splits and standard errors)
and a mean form.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


class MetricsError(ValueError):
    """Inputs to a metric that do not fit together; the message says how to fix them."""


def _check(ranked_ids_QxK: np.ndarray, ground_truth: Sequence[set]) -> np.ndarray:
    ranked = np.asarray(ranked_ids_QxK)
    if ranked.ndim != 2:
        raise MetricsError(
            f"ranked ids must be a 2-D array (queries x K), got shape {ranked.shape}; "
            "stack one ranking per query"
        )
    if not np.issubdtype(ranked.dtype, np.integer):
        raise MetricsError(f"ranked ids must be integers, got dtype {ranked.dtype}")
    if len(ground_truth) != ranked.shape[0]:
        raise MetricsError(
            f"{ranked.shape[0]} rankings but {len(ground_truth)} ground-truth sets; "
            "pass exactly one set of candidate ids per query"
        )
    return ranked


def _hits(ranked_QxK: np.ndarray, ground_truth: Sequence[set]) -> np.ndarray:
    """Boolean ``hits_QxK``: whether each retrieved id is a ground-truth candidate."""
    hits = np.zeros(ranked_QxK.shape, dtype=bool)
    for q, (row, gt) in enumerate(zip(ranked_QxK, ground_truth, strict=True)):
        if gt:
            hits[q] = np.isin(row, np.fromiter(gt, dtype=np.int64)) & (row >= 0)
    return hits


def reciprocal_ranks(
    ranked_ids_QxK: np.ndarray, ground_truth: Sequence[set], k: int = 100
) -> np.ndarray:
    """Per-query 1/rank of the first ground-truth candidate within the top ``k`` (0 if none)."""
    ranked = _check(ranked_ids_QxK, ground_truth)[:, :k]
    hits = _hits(ranked, ground_truth)
    first = np.argmax(hits, axis=1)
    return np.where(hits.any(axis=1), 1.0 / (first + 1.0), 0.0)


def hits_at(ranked_ids_QxK: np.ndarray, ground_truth: Sequence[set], k: int = 10) -> np.ndarray:
    """Per-query 1.0 if any ground-truth candidate is in the top ``k``, else 0.0."""
    ranked = _check(ranked_ids_QxK, ground_truth)[:, :k]
    return _hits(ranked, ground_truth).any(axis=1).astype(np.float64)


def precisions_at(
    ranked_ids_QxK: np.ndarray, ground_truth: Sequence[set], k: int = 10
) -> np.ndarray:
    """Per-query share of the top ``k`` slots holding a ground-truth candidate.

    The denominator is ``k`` even when fewer candidates were retrieved (padding is a miss).
    """
    ranked = _check(ranked_ids_QxK, ground_truth)[:, :k]
    return _hits(ranked, ground_truth).sum(axis=1) / float(k)


def mrr(ranked_ids_QxK: np.ndarray, ground_truth: Sequence[set], k: int = 100) -> float:
    """Mean reciprocal rank of the first ground-truth candidate within the top ``k``."""
    return float(np.mean(reciprocal_ranks(ranked_ids_QxK, ground_truth, k)))


def recall_at(ranked_ids_QxK: np.ndarray, ground_truth: Sequence[set], k: int = 10) -> float:
    """Share of queries with at least one ground-truth candidate in the top ``k``."""
    return float(np.mean(hits_at(ranked_ids_QxK, ground_truth, k)))


def precision_at(ranked_ids_QxK: np.ndarray, ground_truth: Sequence[set], k: int = 10) -> float:
    """Mean over queries of the share of the top ``k`` that are ground-truth candidates."""
    return float(np.mean(precisions_at(ranked_ids_QxK, ground_truth, k)))


def fact_tracing_metrics(
    ranked_ids_QxK: np.ndarray,
    ground_truth: Sequence[set],
    mrr_k: int = 100,
    at_k: int = 10,
) -> dict[str, np.ndarray]:
    """Per-query values of every fact-tracing metric, keyed ``mrr``, ``recall@k``,
    ``precision@k`` (ready for :func:`summarize`)."""
    return {
        "mrr": reciprocal_ranks(ranked_ids_QxK, ground_truth, mrr_k),
        f"recall@{at_k}": hits_at(ranked_ids_QxK, ground_truth, at_k),
        f"precision@{at_k}": precisions_at(ranked_ids_QxK, ground_truth, at_k),
    }


def top_k_ids(scores_QxN: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest scores per row, ties broken by lower index first.

    Rows with fewer than ``k`` candidates are padded with -1.
    """
    scores = np.asarray(scores_QxN)
    if scores.ndim != 2:
        raise MetricsError(f"scores must be 2-D (queries x candidates), got {scores.shape}")
    n = scores.shape[1]
    # A stable sort of the negated scores keeps equal scores in index order.
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    if n < k:
        pad = np.full((scores.shape[0], k - n), -1, dtype=order.dtype)
        order = np.concatenate([order, pad], axis=1)
    return order.astype(np.int64)


def mean_se(values: np.ndarray) -> dict[str, float]:
    """Mean, standard error of the mean (sample std / sqrt(n); NaN if n < 2) and n.

    NaN entries (e.g. undefined per-query values) are left out.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[~np.isnan(v)]
    n = int(v.size)
    if n == 0:
        return {"mean": float("nan"), "se": float("nan"), "n": 0}
    se = float(np.std(v, ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    return {"mean": float(np.mean(v)), "se": se, "n": n}


def summarize(
    per_query_values: np.ndarray | Mapping[str, np.ndarray],
    groups: Mapping[str, np.ndarray] | None = None,
) -> dict:
    """Mean and standard error overall and within each group of each split.

    Args:
      per_query_values: one value per query, or a dict ``metric name -> values_Q``.
      groups: ``split name -> labels_Q`` (e.g. ``{"bucket": freq_Q, "correct": bool_Q}``).

    Returns:
      For a single array: ``{"all": stats, "by": {split: {str(label): stats}}}`` with
      ``stats = {"mean", "se", "n"}``; for a dict of metrics, that structure per metric name.
      Labels are sorted and stringified so the result is JSON-ready.
    """
    if isinstance(per_query_values, Mapping):
        return {name: summarize(v, groups) for name, v in per_query_values.items()}
    values = np.asarray(per_query_values, dtype=np.float64).ravel()
    out: dict = {"all": mean_se(values), "by": {}}
    for split, labels in (groups or {}).items():
        labels = np.asarray(labels).ravel()
        if labels.shape[0] != values.shape[0]:
            raise MetricsError(
                f"split {split!r} has {labels.shape[0]} labels for {values.shape[0]} values; "
                "give one label per query, in query order"
            )
        out["by"][split] = {
            str(label.item() if hasattr(label, "item") else label): mean_se(values[labels == label])
            for label in np.unique(labels)
        }
    return out
