"""A world where a fact's own statements are its only strong proponents.

Against the demo world: objects drawn uniformly (no popular object whose other-subject
sentences raise p(object) for every subject), 3 bare phrasings per relation (no framing
prefixes; demo: 3 prefixes x 5 = 15) and no anchor sentences in the query's own form. Uniform
objects leave nothing to guess from popularity, so the model trains twice as long as the demo's
(3,000 steps) to learn a comparable share of the facts. Every task query is tail-patched.

Run: trackstar run --config configs/world_uniform.py
then: trackstar experiment --config configs/e6.py --config.run_dir=runs/world_uniform \
      --config.tailpatch.n_queries=200
"""

import os

import ml_collections

from trackstar.config import load_config_file


def get_config() -> ml_collections.ConfigDict:
    c = load_config_file(os.path.join(os.path.dirname(__file__), "demo.py"))
    c.run_dir = "runs/world_uniform"  # Own run dir: never mixes with runs/demo's caches.
    c.world.zipf_exponent = 0.0  # Uniform object popularity (demo: Zipf 1.0).
    c.world.n_templates = 3  # The first 3 base phrasings of each relation ...
    c.world.n_prefixes = 1  # ... bare, without framing prefixes.
    c.world.anchor_query_form_p = 0.0  # No anchor sentence in the query-prompt form (demo: 0.25).
    c.train.steps = 3000  # Demo: 1,500 (at 1,500 this world's model knew 14% of the facts).
    c.tailpatch.n_queries = 200  # All 200 task queries tail-patched (demo: 100).
    return c
