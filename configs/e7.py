"""E7 (paper Table A.7): metrics split by model correctness and by fact frequency bucket.

Run: python scripts/experiment.py --config configs/e7.py
Tiny smoke setting: --config configs/e7.py:tiny (the tiny world and model of tiny.py).
Correctness = greedy decoding reproduces the target; buckets = corpus frequency f.
"""

import os

import ml_collections

from trackstar.config import load_config_file


def get_config(base: str = "demo") -> ml_collections.ConfigDict:
    c = load_config_file(os.path.join(os.path.dirname(__file__), f"{base}.py"))
    e = c.experiment
    e.name = "e7"
    e.methods = ("bm25", "grad_cosine", "exp_opt_norm", "trackstar")
    return c
