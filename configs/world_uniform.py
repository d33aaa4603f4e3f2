"""A world where a fact's own statements are its only strong proponents.

Against the demo world: objects drawn uniformly (no popular object whose other-subject
sentences raise p(object) for every subject), no framing prefixes (each relation keeps only its
5 base phrasings, the fewest the generator allows: trackstar/world/templates.py has no field
limiting them) and no anchor sentences in the query's own form. Every task query is
tail-patched.

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
    # Bare phrasings only: 5 per relation (demo: 3 prefixes x 5 = 15).
    c.world.n_prefixes = 1
    c.world.anchor_query_form_p = 0.0  # No anchor sentence in the query-prompt form (demo: 0.25).
    c.tailpatch.n_queries = 200  # All 200 task queries tail-patched (demo: 100).
    return c
