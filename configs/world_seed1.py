"""A second seed of the demo world: same sizes and settings, other names, facts and documents.

Checks that E1/E6's findings are not an accident of world seed 0 (EXPERIMENTS.md, "What R buys
and what it costs"). Every task query is tail-patched.

Run: trackstar run --config configs/world_seed1.py
then: trackstar experiment --config configs/e6.py --config.run_dir=runs/world_seed1 \
      --config.tailpatch.n_queries=200
"""

import os

import ml_collections

from trackstar.config import load_config_file


def get_config() -> ml_collections.ConfigDict:
    c = load_config_file(os.path.join(os.path.dirname(__file__), "demo.py"))
    c.run_dir = "runs/world_seed1"  # Own run dir: never mixes with runs/demo's caches.
    c.world.seed = 1  # Another world: names, facts, frequencies and documents redrawn.
    c.tailpatch.n_queries = 200  # All 200 task queries tail-patched (demo: 100).
    return c
