"""E2 (paper Table 2): the open set, candidates = the training corpus passages.

E1's runner on the ``corpus`` pool: documents longer than ``model.max_len`` are split at
sentence boundaries into passages (``stages.corpus_passages``).
"""

from __future__ import annotations

import ml_collections

from trackstar.experiments.e1 import run_retrieval

DEFAULT_METHODS = ("bm25", "random", "grad_dot", "grad_cosine", "trackstar")


def run(cfg: ml_collections.ConfigDict, progress: bool = True) -> dict:
    """E2: ``experiment.methods`` (default: the paper's rows) on the corpus passages."""
    return run_retrieval(
        cfg,
        "corpus",
        DEFAULT_METHODS,
        "E2: open-set fact tracing (training corpus passages)",
        progress,
    )
