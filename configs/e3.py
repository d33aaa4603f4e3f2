"""E3 (paper Fig. 2 left): MRR and tail-patch vs projection dimension d = k * k.

Run: python scripts/experiment.py --config configs/e3.py
Tiny smoke setting: --config configs/e3.py:tiny (the tiny world and model of tiny.py).
Smaller d are exact k x k sub-grids of the stored featurize.k_in x k_out vectors.
"""

import os

import ml_collections

from trackstar.config import load_config_file


def get_config(base: str = "demo") -> ml_collections.ConfigDict:
    c = load_config_file(os.path.join(os.path.dirname(__file__), f"{base}.py"))
    e = c.experiment
    e.name = "e3"
    e.methods = ("grad_cosine", "exp_opt_norm", "trackstar")  # Methods ranked at every d.
    e.tailpatch_methods = ("trackstar",)  # Tail-patched at every d (the costly part).
    if base == "demo":
        e.k_values = (4, 8, 16, 32, 64)  # d = 16 ... 4096 (64 = the stored grid).
    return c
