"""E1 (paper Table 1): closed-set fact tracing, every scoring preset + bm25 + random.

Run: python scripts/experiment.py --config configs/e1.py
Tiny smoke setting: --config configs/e1.py:tiny (the tiny world and model of tiny.py).
Writes <run_dir>/experiments/e1/: results.json, table.md, methods.png, sweep.png.
"""

import os

import ml_collections

from trackstar.config import METHODS, load_config_file


def get_config(base: str = "demo") -> ml_collections.ConfigDict:
    c = load_config_file(os.path.join(os.path.dirname(__file__), f"{base}.py"))
    e = c.experiment
    e.name = "e1"
    e.methods = METHODS  # Every scoring preset plus the baselines, in table order.
    return c
