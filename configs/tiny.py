"""Tiny setting for tests and smoke runs: a small world and a 1-layer model (seconds on CPU).

Same fields as demo.py; only sizes change.
"""

import os

import ml_collections

from trackstar.config import load_config_file


def get_config() -> ml_collections.ConfigDict:
    c = load_config_file(os.path.join(os.path.dirname(__file__), "demo.py"))
    c.run_dir = "runs/tiny"
    c.world.n_subjects = 40
    c.world.n_relations = 4
    c.world.n_objects_per_type = 8
    c.world.n_distractor_candidates = 20
    c.world.n_queries = 16
    c.world.n_heldout_queries = 16
    c.model.size = "tiny"
    c.model.d_model = 32
    c.model.n_layers = 1
    c.model.n_heads = 2
    c.model.d_ff = 64
    c.model.max_len = 48
    c.train.steps = 60
    c.train.batch_size = 8
    c.train.seq_len = 48
    c.train.warmup_steps = 5
    c.train.checkpoint_every = 20
    c.train.log_every = 10
    c.featurize.k_in = 8
    c.featurize.k_out = 8
    c.featurize.dense_dim = 64
    c.featurize.batch_size = 8
    c.featurize.chunk_size = 32
    c.hessian.train_sample = 0
    c.score.top_k = 10
    c.score.chunk_rows = 64
    c.viewer.breakdown_queries = 2  # Two breakdowns keep the tiny E1 quick.
    c.tailpatch.n_queries = 8
    c.tailpatch.pair_batch = 8
    c.experiment.k_values = (2, 4, 8)  # e3: sub-grids of the 8 x 8 tiny projection.
    c.experiment.e3_full_dims_k = ()  # e3: no side featurized on its own (tests set one).
    return c
