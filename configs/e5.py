"""E5 (paper Table A.3): query output function, loss vs margin vs logit.

Run: python scripts/experiment.py --config configs/e5.py
Tiny smoke setting: --config configs/e5.py:tiny (the tiny world and model of tiny.py).
Each output function gets its own query stores and R (R_eval is built from query vectors).
"""

import os

import ml_collections

from trackstar.config import load_config_file


def get_config(base: str = "demo") -> ml_collections.ConfigDict:
    c = load_config_file(os.path.join(os.path.dirname(__file__), f"{base}.py"))
    e = c.experiment
    e.name = "e5"
    e.methods = ("exp_opt_norm", "trackstar")  # Presets scored with each output function.
    e.tailpatch_methods = ("trackstar",)  # Tail-patched for each output function.
    e.output_fns = ("loss", "margin", "logit")
    return c
