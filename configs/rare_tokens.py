"""E1 on the tiny world with rare-token distractors: what the V floor does to unmoved parameters.

120 of the 780 closed-set candidates (15%) are filler sentences carrying 1-3 made-up words that
no training document contains (world.rare_token_candidates). The tokenizer gives those words
ids, but training never moves their embedding rows, so Adam's v is 0 there and the plain
correction g / (sqrt(v_hat) + eps) multiplies their gradient by 1 / eps = 1e8. Compare:

    python scripts/experiment.py --config configs/rare_tokens.py \\
        --config.featurize.v_floor=0 --config.experiment.store_tag=vfloor0
    python scripts/experiment.py --config configs/rare_tokens.py

(the second run writes the same experiments/e1 directory: copy the first one away before it).
Rankings of both stay in results/cache (the store tag and the featurize settings name them).
"""

import os

import ml_collections

from trackstar.config import load_config_file


def get_config() -> ml_collections.ConfigDict:
    c = load_config_file(os.path.join(os.path.dirname(__file__), "e1.py:tiny"))
    c.run_dir = "runs/rare_tokens"
    # 120 / (640 fact + 20 distractor + 120) = 15% of the closed set.
    c.world.rare_token_candidates = 120
    # 32 task queries, all tail-patched: tiny's 16 / 8 leave too few to compare settings.
    c.world.n_queries = 32
    c.world.n_heldout_queries = 32
    c.tailpatch.n_queries = 0
    # tiny's 60 steps barely fit the facts; 600 (the V-floor measurement in
    # docs/reliability.md) learn them in well under a minute on CPU.
    c.train.steps = 600
    c.train.warmup_steps = 30
    c.train.checkpoint_every = 200
    c.train.log_every = 100
    return c
