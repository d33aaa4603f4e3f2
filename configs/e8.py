"""E8: linear datamodeling score (LDS) of every method over retrained subset models.

Run: python scripts/experiment.py --config configs/e8.py   (about 30 min on 2 CPU cores)
Tiny smoke setting: --config configs/e8.py:tiny (the tiny world and model of tiny.py, 4 subsets;
CI).

The full size is smaller than the demo because the model is retrained once per subset: a
120-subject x 4-relation world (~900 training documents, 64 task queries), a 2-layer GPT-2 of
d_model 64 trained 1200 steps of 16 x 48 tokens (~27 epochs, ~15 s on 2 cores), projection
d = 32 x 32, and 48 subsets of half the documents each. Its own run_dir: the world and model
differ from the demo's.
"""

import os

import ml_collections

from trackstar.config import load_config_file


def get_config(base: str = "demo") -> ml_collections.ConfigDict:
    c = load_config_file(os.path.join(os.path.dirname(__file__), f"{base}.py"))
    e = c.experiment
    e.name = "e8"
    e.methods = ()  # () = bm25, random and every scoring preset (score.PRESETS at run time).
    e.lds_fraction = 0.5  # TRAK's choice: each subset holds half of the training documents.
    e.lds_seed = 0
    if base == "tiny":
        e.lds_subsets = 4  # CI: enough for a correlation, seconds per retrain.
        return c
    e.lds_subsets = 48
    if base != "demo":
        return c  # Other bases keep their own sizes.
    c.run_dir = "runs/e8"
    w = c.world
    w.n_subjects = 120
    w.n_relations = 4
    w.n_objects_per_type = 12
    w.n_distractor_candidates = 100
    w.n_queries = 64
    w.n_heldout_queries = 32
    m = c.model
    m.size = "tiny"
    m.d_model = 64
    m.n_layers = 2
    m.n_heads = 4
    m.d_ff = 256
    m.max_len = 48
    tr = c.train
    tr.steps = 1200
    tr.batch_size = 16
    tr.seq_len = 48
    tr.warmup_steps = 60
    tr.checkpoint_every = 600  # Two saves per subset model.
    tr.keep_checkpoints = 1
    tr.log_every = 100
    f = c.featurize
    f.k_in = 32
    f.k_out = 32
    f.batch_size = 16
    e.k_values = (8, 16, 32)  # Unused by E8; kept within the 32 x 32 grid (a config check).
    c.hessian.train_sample = 0  # Every passage.
    c.score.top_k = 100
    c.viewer.write = False  # E8 writes no per-method proponents.
    return c
