"""BM25 and random baselines: exact-text retrieval, deterministic ties and seeds."""

import numpy as np
import pytest

from trackstar import baselines

CANDIDATES = [
    "Alice Varn was born in Lisbon.",
    "Boris Kell works for Omnicorp.",
    "Alice Varn speaks Danish.",
    "Boris Kell works for Omnicorp.",  # identical to id 1: a tie
    "The weather was mild that year.",
]


def test_bm25_ranks_exact_text_first():
    queries = [
        baselines.query_text("Alice Varn speaks", "Danish"),
        baselines.query_text("Alice Varn was born in", "Lisbon"),
    ]
    ranked = baselines.bm25_rank(queries, CANDIDATES, k=3)
    assert ranked.shape == (2, 3)
    assert ranked[0, 0] == 2 and ranked[1, 0] == 0
    # The other Alice sentence shares the name, so it comes next.
    assert ranked[0, 1] == 0 and ranked[1, 1] == 2


def test_bm25_ties_lower_id_first_and_empty_query():
    ranked = baselines.bm25_rank(["Boris Kell works for Omnicorp", "the of"], CANDIDATES, k=2)
    np.testing.assert_array_equal(ranked[0], [1, 3])
    # Stopwords only: every score is 0, so ids come in order.
    np.testing.assert_array_equal(ranked[1], [0, 1])
    scores = baselines.bm25_scores(["Boris"], CANDIDATES, stopwords="none")
    assert scores[0, 1] == scores[0, 3] > 0 and scores[0, 0] == 0


def test_random_rank_deterministic_distinct_and_padded():
    a = baselines.random_rank(5, 20, 10, seed=3)
    b = baselines.random_rank(5, 20, 10, seed=3)
    c = baselines.random_rank(5, 20, 10, seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert all(len(set(row)) == 10 for row in a) and a.min() >= 0 and a.max() < 20
    # Query q's ranking does not depend on how many queries are drawn.
    np.testing.assert_array_equal(baselines.random_rank(2, 20, 10, seed=3), a[:2])
    small = baselines.random_rank(2, 3, 5, seed=0)
    assert (small[:, 3:] == -1).all() and sorted(small[0, :3]) == [0, 1, 2]


def test_bad_inputs():
    with pytest.raises(baselines.BaselineError, match="no candidate"):
        baselines.bm25_rank(["x"], [], k=3)
    with pytest.raises(baselines.BaselineError, match="n_candidates"):
        baselines.random_rank(2, 0, 3, seed=0)
