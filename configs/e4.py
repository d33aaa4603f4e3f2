"""E4 (paper Fig. 2 right): the comparison across two model sizes on the same world.

Run: python scripts/experiment.py --config configs/e4.py
Tiny smoke setting: --config configs/e4.py:tiny (the tiny world and model of tiny.py).
The smaller model trains in its own run dir (<run_dir>_small) on the same world.
"""

import os

import ml_collections

from trackstar.config import load_config_file


def get_config(base: str = "demo") -> ml_collections.ConfigDict:
    c = load_config_file(os.path.join(os.path.dirname(__file__), f"{base}.py"))
    e = c.experiment
    e.name = "e4"
    # Corrected presets only: the second model then needs one candidate store, not two.
    e.methods = ("bm25", "random", "exp_opt_norm", "trackstar")
    m = c.model
    e.variants = ml_collections.ConfigDict(
        {
            "base": {},  # The run dir's own model.
            "small": {  # Half the width, one layer fewer.
                "run_dir_suffix": "_small",  # Its run dir: <run_dir>_small.
                "model": {
                    "d_model": m.d_model // 2,
                    "n_layers": max(1, m.n_layers - 1),
                    "n_heads": max(1, m.n_heads // 2),
                    "d_ff": m.d_ff // 2,
                },
            },
        }
    )
    return c
