"""Performance benchmark workload (scripts/benchmark.py).

The reference workload is fixed so figures compare across libraries: a decoder-only LM with
4 layers, 4 heads, d_model 256, vocab 8192, sequence length 128, random init (seed 0), 2048
training sequences and 64 queries of random token ids, batch 32, float32.

Run: python scripts/benchmark.py --json results/benchmark.json
     python scripts/benchmark.py --tiny          (seconds; what CI runs)
``get_config("tiny")`` (or ``--config configs/benchmark.py:tiny``) gives the tiny workload.
"""

import ml_collections


def get_config(mode: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.tiny = False  # True: the CI smoke workload below (no timing is meaningful).
    c.seed = 0  # Model init, data and projection seed.

    m = c.model = ml_collections.ConfigDict()
    m.size = "base"  # Preset of trackstar.model.SIZES; the fields below override it.
    m.n_layers = 4
    m.n_heads = 4
    m.d_model = 256
    m.d_ff = 1024  # 4 x d_model.
    m.max_len = 128
    m.dtype = "float32"
    c.vocab_size = 8192
    c.seq_len = 128  # Tokens per example (every example is full length).

    c.n_train = 2048  # Training sequences featurized and scored.
    c.n_queries = 64  # Query sequences (featurized with the "loss" output function).
    c.query_targets = 8  # Trailing tokens of a query that count as its target.
    c.batch_size = 32  # Examples per jitted call, floor and featurize alike.
    c.v_steps = 3  # Optimizer steps (on the training data) that produce the V of the correction.
    c.lr = 1e-3  # Learning rate of those steps (irrelevant to timing; keeps V realistic).

    c.k_in = 64  # Kronecker projection widths: d = k_in * k_out = 4096.
    c.k_out = 64
    c.dense_dim = 32  # d of the dense-projection contrast (a d x |theta| matrix per batch).
    c.dense_examples = 64  # Examples featurized with dense projection (it is slow).
    c.reference_examples = 128  # Examples featurized by the vmap-of-grad reference (contrast).
    c.chunk_size = 512  # Store rows per committed chunk.

    c.top_k = 100  # Proponents kept per query when scoring.
    c.score_rows_per_step = 512  # Train rows per jitted scoring step.
    c.score_repeats = 3  # Timed scoring passes (best is reported; the CPU is shared).

    c.hessian_dims = (1024, 4096, 16384)  # d of the R fit + R^-1/2 timings.
    c.hessian_rows = 2048  # Rows averaged into R for those timings.
    c.hessian_timeout_s = 900  # Per-d limit (subprocess); a d that runs over is reported as such.

    c.rss_sizes = (512, 2048)  # Corpus sizes N of the peak-RSS runs (one subprocess per stage).

    if mode == "tiny":
        c.tiny = True
        m.size = "tiny"
        m.n_layers, m.n_heads, m.d_model, m.d_ff, m.max_len = 1, 2, 16, 32, 16
        c.vocab_size = 64
        c.seq_len = 16
        c.n_train, c.n_queries, c.query_targets, c.batch_size = 64, 8, 3, 8
        c.v_steps = 2
        c.k_in = c.k_out = 4
        c.dense_dim, c.dense_examples, c.reference_examples = 8, 16, 16
        c.chunk_size = 32
        c.top_k, c.score_rows_per_step, c.score_repeats = 5, 16, 1
        c.hessian_dims = (16,)
        c.hessian_rows = 64
        c.hessian_timeout_s = 120
        c.rss_sizes = (32, 64)
    elif mode not in (None, "", "full"):
        raise ValueError(f"unknown benchmark config mode {mode!r}; use 'tiny' or nothing")
    return c
