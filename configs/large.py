"""A ~1B-parameter model shape for scale-out runs (docs/scaling.md).

Shardings build on CPU without allocating anything (``jax.eval_shape``); the per-device memory
they imply is printed by ``python scripts/featurize_distributed.py --config configs/large.py
--memory-only``. The world, tokenizer and training fields stay those of demo.py: a model this
size is meant for a real corpus and checkpoint, not the synthetic demo.
"""

import os

import ml_collections

from trackstar.config import load_config_file


def get_config() -> ml_collections.ConfigDict:
    c = load_config_file(os.path.join(os.path.dirname(__file__), "demo.py"))
    c.run_dir = "runs/large"
    c.model.size = "base"
    c.model.d_model = 2048
    c.model.n_layers = 18
    c.model.n_heads = 16
    c.model.d_ff = 8192
    c.model.max_len = 2048
    c.model.dtype = "bfloat16"  # Compute dtype; params and optimizer moments stay float32.
    c.featurize.k_in = 256  # d = 2^16, the paper's projection size.
    c.featurize.k_out = 256
    c.featurize.batch_size = 16  # Rows per call per host; a per-example grad is 0.5 GiB at model=8.
    c.featurize.chunk_size = 4096
    c.score.chunk_rows = 8192
    c.mesh.data = -1  # One 8-device host: data = 1 at model = 8; more hosts add data replicas.
    c.mesh.model = 8
    c.mesh.rules = "tensor"
    c.mesh.memory_vocab_size = 32000
    return c
