"""Fact-tracing metrics on hand-built rankings whose answers are worked out by hand."""

import numpy as np
import pytest

from trackstar import metrics

# Query 0: first hit at rank 2. Query 1: no hit. Query 2: hits at ranks 1 and 2, then padding.
RANKED = np.array([[5, 3, 7], [1, 2, 3], [9, 8, -1]])
GT = [{3, 7}, {4}, {8, 9}]


def test_reciprocal_rank_and_mrr():
    np.testing.assert_allclose(metrics.reciprocal_ranks(RANKED, GT, k=100), [0.5, 0.0, 1.0])
    assert metrics.mrr(RANKED, GT, k=100) == pytest.approx(0.5)
    # Cutting at k=1 drops query 0's hit at rank 2.
    assert metrics.mrr(RANKED, GT, k=1) == pytest.approx(1 / 3)


def test_recall_and_precision():
    np.testing.assert_allclose(metrics.hits_at(RANKED, GT, k=1), [0.0, 0.0, 1.0])
    assert metrics.recall_at(RANKED, GT, 2) == pytest.approx(2 / 3)
    # Query 0 has 2 hits in its top 3, query 2 has 2 (padding is a miss, denominator stays 3).
    np.testing.assert_allclose(metrics.precisions_at(RANKED, GT, k=3), [2 / 3, 0.0, 2 / 3])
    assert metrics.precision_at(RANKED, GT, 3) == pytest.approx(4 / 9)
    per_q = metrics.fact_tracing_metrics(RANKED, GT, mrr_k=100, at_k=2)
    assert set(per_q) == {"mrr", "recall@2", "precision@2"}
    np.testing.assert_allclose(per_q["precision@2"], [0.5, 0.0, 1.0])


def test_padding_and_empty_ground_truth_never_hit():
    ranked = np.array([[-1, -1], [0, 1]])
    np.testing.assert_allclose(metrics.reciprocal_ranks(ranked, [{-1}, set()]), [0.0, 0.0])


def test_top_k_ids_breaks_ties_by_lower_index_and_pads():
    scores = np.array([[1.0, 3.0, 3.0, 0.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(metrics.top_k_ids(scores, 3), [[1, 2, 4], [0, 1, 2]])
    padded = metrics.top_k_ids(scores[:, :2], 3)
    np.testing.assert_array_equal(padded, [[1, 0, -1], [0, 1, -1]])


def test_summarize_groups_mean_and_standard_error():
    values = np.array([1.0, 0.0, 1.0, 0.5])
    out = metrics.summarize(
        values, {"bucket": np.array([1, 1, 2, 2]), "correct": np.array([True, False, True, True])}
    )
    assert out["all"]["mean"] == pytest.approx(0.625)
    assert out["all"]["se"] == pytest.approx(np.std(values, ddof=1) / 2)
    assert out["by"]["bucket"]["1"] == {"mean": 0.5, "se": pytest.approx(0.5), "n": 2}
    assert out["by"]["bucket"]["2"]["mean"] == pytest.approx(0.75)
    assert out["by"]["correct"]["False"]["n"] == 1
    assert np.isnan(out["by"]["correct"]["False"]["se"])  # one value: no standard error
    assert out["by"]["correct"]["True"]["mean"] == pytest.approx(2.5 / 3)
    many = metrics.summarize({"a": values, "b": 2 * values})
    assert many["b"]["all"]["mean"] == pytest.approx(1.25)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(metrics.MetricsError, match="ground-truth sets"):
        metrics.mrr(RANKED, GT[:2])
    with pytest.raises(metrics.MetricsError, match="2-D"):
        metrics.mrr(RANKED[0], GT[:1])
    with pytest.raises(metrics.MetricsError, match="labels"):
        metrics.summarize(np.zeros(3), {"bucket": np.zeros(2)})
