"""E2 (paper Table 2): open set, candidates = the model's training corpus passages.

Run: python scripts/experiment.py --config configs/e2.py
Tiny smoke setting: --config configs/e2.py:tiny (the tiny world and model of tiny.py).
Documents longer than model.max_len (the learned position table) are split at sentence
boundaries into passages; a passage is ground truth when one of its sentences states the fact.
No store tag: the passages get their own store (stores/corpus-*), and the query stores are
E1's, which E2 would featurize identically (same model and featurize section).
"""

import os

import ml_collections

from trackstar.config import load_config_file


def get_config(base: str = "demo") -> ml_collections.ConfigDict:
    c = load_config_file(os.path.join(os.path.dirname(__file__), f"{base}.py"))
    e = c.experiment
    e.name = "e2"
    e.methods = ("bm25", "random", "grad_dot", "grad_cosine", "trackstar")  # The paper's E2 rows.
    return c
