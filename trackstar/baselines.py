"""Non-gradient retrieval baselines: BM25 (lexical) and random (docs/method.md, Baselines).

Both return ``ranked_ids_QxK`` in the same form as the gradient scorers, so the same metrics
apply. BM25 queries are the prompt followed by the target text.
"""

from __future__ import annotations

from collections.abc import Sequence

import bm25s
import numpy as np

from trackstar.metrics import top_k_ids


class BaselineError(ValueError):
    """A baseline called with inputs it cannot rank; the message says how to fix them."""


def bm25_scores(
    query_texts: Sequence[str],
    candidate_texts: Sequence[str],
    stopwords: str | list[str] | None = "english",
    k1: float = 1.5,
    b: float = 0.75,
) -> np.ndarray:
    """Dense BM25 scores ``scores_QxN`` of every candidate for every query (bm25s, Lucene).

    Query words absent from the candidates score nothing; a query with no usable words gets an
    all-zero row.
    """
    if isinstance(stopwords, str) and stopwords.lower() in ("", "none"):
        stopwords = None  # Config files spell "no stopword removal" as a string.
    if len(candidate_texts) == 0:
        raise BaselineError("no candidate texts to rank; pass the candidate pool (closed or open)")
    corpus_tokens = bm25s.tokenize(list(candidate_texts), stopwords=stopwords, show_progress=False)
    retriever = bm25s.BM25(k1=k1, b=b)
    retriever.index(corpus_tokens, show_progress=False)
    query_tokens = bm25s.tokenize(
        list(query_texts), stopwords=stopwords, return_ids=False, show_progress=False
    )
    scores_QxN = np.zeros((len(query_texts), len(candidate_texts)), dtype=np.float32)
    for q, words in enumerate(query_tokens):
        if words:  # bm25s cannot score an empty query.
            scores_QxN[q] = retriever.get_scores(words)
    return scores_QxN


def bm25_rank(
    query_texts: Sequence[str],
    candidate_texts: Sequence[str],
    k: int,
    stopwords: str | list[str] | None = "english",
) -> np.ndarray:
    """Top-``k`` candidate ids per query by BM25, ties broken by lower candidate id.

    Args:
      query_texts: one text per query, ``prompt + " " + target``.
      candidate_texts: the candidate pool; ids are positions in this list.
      k: how many to keep (padded with -1 if the pool is smaller).
      stopwords: bm25s stopword setting (``"english"``, a list, or None / ``"none"``).
    """
    return top_k_ids(bm25_scores(query_texts, candidate_texts, stopwords=stopwords), k)


def query_text(prompt: str, target: str) -> str:
    """The BM25 query of a fact query: the prompt followed by the target."""
    return f"{prompt} {target}"


def random_rank(n_queries: int, n_candidates: int, k: int, seed: int) -> np.ndarray:
    """``ranked_ids_QxK`` of distinct uniformly random candidates per query.

    Deterministic in ``seed``; each query draws from its own stream, so query q's ranking does
    not depend on how many queries there are. Padded with -1 if ``k > n_candidates``.
    """
    if n_candidates <= 0 or k <= 0 or n_queries < 0:
        raise BaselineError(
            f"random_rank needs n_candidates > 0 and k > 0 (got n_queries={n_queries}, "
            f"n_candidates={n_candidates}, k={k})"
        )
    take = min(k, n_candidates)
    out = np.full((n_queries, k), -1, dtype=np.int64)
    for q in range(n_queries):
        rng = np.random.default_rng([seed, q])
        out[q, :take] = rng.choice(n_candidates, size=take, replace=False)
    return out
