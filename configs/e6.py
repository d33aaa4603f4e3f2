"""E6 (paper Table A.6): tail-patch@1, 3, 5, 10 for every method.

Run: python scripts/experiment.py --config configs/e6.py
Tiny smoke setting: --config configs/e6.py:tiny (the tiny world and model of tiny.py).
"""

import os

import ml_collections

from trackstar.config import load_config_file


def get_config(base: str = "demo") -> ml_collections.ConfigDict:
    # E1's methods and settings; only the reported tail-patch cut-offs differ.
    c = load_config_file(os.path.join(os.path.dirname(__file__), f"e1.py:{base}"))
    c.experiment.name = "e6"
    c.tailpatch.ks = (1, 3, 5, 10)  # The paper's cut-offs.
    return c
