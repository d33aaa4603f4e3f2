"""E4 along one training run: every method at checkpoints from barely trained to memorized.

Run: trackstar experiment --config configs/e4_checkpoints.py   (about 1 h on 2 CPU cores)
Tiny smoke setting: --config configs/e4_checkpoints.py:tiny (the tiny world and model; CI).

One run of the demo world and model trained 3,000 steps (twice the demo: by its end BM25 leads
TrackStar on MRR, EXPERIMENTS.md "Longer training"), read at five checkpoints. Each checkpoint
is a run dir of its own (<run_dir>_step<N>, train.checkpoint_step = N), so its stores, R and
caches never mix with another's. The run dir itself trains once to 3,000 steps keeping every
checkpoint, and each earlier step's run dir starts from a copy of its own checkpoint. The
learning-rate schedule spans all 3,000 steps at every checkpoint, and tail-patch uses the final
learning rate of that schedule at every checkpoint, so tail-patch numbers compare.
"""

import os

import ml_collections

from trackstar.config import load_config_file


def get_config(base: str = "demo") -> ml_collections.ConfigDict:
    c = load_config_file(os.path.join(os.path.dirname(__file__), f"{base}.py"))
    e = c.experiment
    e.name = "e4"  # The E4 runner; its results go to <run_dir>/experiments/e4.
    e.title = "along one training run (checkpoints)"  # The table's heading.
    # No correction (grad_cosine), the correction (exp_opt_norm), R on top (trackstar), the
    # one-step predictor (step_influence), and the text baseline.
    e.methods = ("bm25", "random", "grad_cosine", "exp_opt_norm", "trackstar", "step_influence")
    # E3's sub-grid at d = 16 x 16 = 256 beside the stored 4096, for these methods: does d move
    # the point where attribution stops working?
    e.tailpatch_methods = ("trackstar",)
    e.e4_dims_k = (16,)
    # What R, the correction and the text baseline change at each step, paired per query.
    e.paired = (
        ("trackstar", "exp_opt_norm"),
        ("exp_opt_norm", "grad_cosine"),
        ("trackstar", "bm25"),
        ("step_influence", "trackstar"),
    )
    if base == "tiny":
        c.run_dir = "runs/tiny_checkpoints"
        c.train.checkpoint_every = 20
        e.e4_dims_k = (4,)  # The tiny grid is 8 x 8.
        steps = (20, 40, 60)  # tiny.py trains 60 steps.
    else:
        c.run_dir = "runs/memorization"  # Own run dirs: the demo's 1,500-step run stays as is.
        c.train.steps = 3000
        c.train.checkpoint_every = 250
        steps = (250, 500, 1000, 2000, 3000)  # Barely trained ... memorized.
        # One learning rate (the final one) keeps five checkpoints' tail-patch affordable.
        c.tailpatch.lr_multipliers = (1.0,)
    # The run dir keeps every checkpoint; each earlier step's run dir copies its own from it.
    c.train.keep_checkpoints = c.train.steps // c.train.checkpoint_every
    e.variants = ml_collections.ConfigDict(
        {
            f"step{n}": {}  # The last step is the run dir itself.
            if n == c.train.steps
            else {
                "run_dir_suffix": f"_step{n}",  # Its run dir: <run_dir>_step<n>.
                "train": {"checkpoint_step": n},
            }
            for n in steps
        }
    )
    return c
