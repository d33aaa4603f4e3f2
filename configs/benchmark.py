"""Performance benchmark workload (scripts/benchmark.py).

The reference workload is fixed so figures compare across libraries: a decoder-only LM with
4 layers, 4 heads, d_model 256, vocab 8192, sequence length 128, random init (seed 0), 2048
training sequences and 64 queries of random token ids, batch 32, float32.

Run: python scripts/benchmark.py --json results/benchmark.json
     python scripts/benchmark.py --tiny          (seconds; what CI runs)
``get_config("tiny")`` (or ``--config configs/benchmark.py:tiny``) gives the tiny workload.

``get_config("hf")`` (``--config configs/benchmark.py:hf``) runs only the rows of Hugging
Face-shaped models (``hf_rows``): a GPT-2-small-shaped model (124M parameters, tied head) and a
Llama-shaped one of similar size (GQA, SwiGLU, RoPE, untied head), random init, next to the
project's own model (the reference workload's, row "own") at the same batch, sequence length and
number of examples, each featurized with the exact Adam V and with an estimated V
(``trackstar.v_estimate``). ``--tiny`` with it (or ``:hf_tiny``) gives toy sizes.
"""

import ml_collections


def get_config(mode: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.tiny = False  # True: the CI smoke workload below (no timing is meaningful).
    c.seed = 0  # Model init, data and projection seed.

    m = c.model = ml_collections.ConfigDict()
    m.family = "gpt2"  # The project's model: a configuration of the gpt2 family, untied head.
    m.tie_word_embeddings = False
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

    c.index_dtype = "float32"  # Row dtype of the scoring index timed against the matmul.

    c.hessian_dims = (1024, 4096, 16384)  # d of the R fit + R^-1/2 timings.
    c.hessian_rows = 2048  # Rows averaged into R for those timings (low rank where < d).
    c.hessian_timeout_s = 900  # Per-d limit (subprocess); a d that runs over is reported as such.
    c.low_rank_dims = (16384, 65536)  # d of the low-rank R fit + (R + dI)^-1/2 timings.
    c.low_rank_rows = 8192  # n_t + n_e rows of those fits (random, decaying column scales).
    c.low_rank_eval_rows = 256  # Of them, the R_eval (query) rows; λ by auto_trace.

    # Approximate top-k (scripts/ann_benchmark.py): ann_rows synthetic rows at d = ann_dim, each
    # a row of this run's featurized store (mapped to ann_dim by a seeded Gaussian map) plus
    # Gaussian noise of relative size ann_noise; 0 rows skips the stage.
    c.ann_rows = 1_000_000
    c.ann_dim = 1024
    c.ann_noise = 0.3
    c.ann_nlist = 1000  # IVF cells (the library default, about 4 sqrt(N), trains ~10x longer).
    c.ann_timeout_s = 900  # Limit of the ann subprocess.

    c.rss_sizes = (512, 2048)  # Corpus sizes N of the peak-RSS runs (one subprocess per stage).

    # Rows of Hugging Face-shaped models (scripts/benchmark.py, run_hf). Each row times the
    # floor and featurize (exact Adam V from hf_v_steps AdamW steps, and V estimated by
    # trackstar.v_estimate from hf_estimate_examples examples) on hf_batch_size * hf_reps examples
    # of hf_seq_len tokens, with the Kronecker projection above (d = k_in * k_out).
    c.hf_rows = ()  # Names: "own" (the model above) and keys of hf_models; () runs none.
    c.hf_only = False  # True: only the hf rows (skip every other stage).
    c.hf_batch_size = 4  # Examples per jitted call (floor, featurize and the V estimate).
    c.hf_reps = 2  # Timed batches per floor / featurize pass (after one compile + warm-up call).
    c.hf_own_reps = 8  # The same for the own model (it is cheap; more batches, less noise).
    c.hf_passes = 2  # Rounds of (floor pass, featurize pass) per V; the best of each is kept.
    c.hf_seq_len = 128
    c.hf_v_steps = 2  # optax.adamw steps on random token batches that make the Adam nu.
    c.hf_estimate_examples = 8  # Examples of the V estimate (whole batches of hf_batch_size).
    h = c.hf_models = ml_collections.ConfigDict()
    # GPT-2 small (124M): d_model 768, 12 layers, 12 heads, d_ff 3072, n_positions 1024, tied head.
    h.gpt2_small = dict(
        vocab=50257,
        model=dict(
            family="gpt2", d_model=768, n_layers=12, n_heads=12, d_ff=3072, max_len=1024,
            tie_word_embeddings=True, dtype="float32",
        ),
    )  # fmt: skip
    # Llama-shaped, about as large: 4 kv heads (GQA), SwiGLU d_ff 2048, RoPE, untied head.
    h.llama_small = dict(
        vocab=32000,
        model=dict(
            family="llama", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
            num_key_value_heads=4, intermediate_size=2048, max_position_embeddings=1024,
            tie_word_embeddings=False, dtype="float32",
        ),
    )  # fmt: skip

    if mode in ("hf", "hf_tiny"):
        c.hf_rows = ("own", "gpt2_small", "llama_small")
        c.hf_only = True
    if mode in ("tiny", "hf_tiny"):
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
        c.hessian_dims = (16, 128)
        c.hessian_rows = 64
        c.hessian_timeout_s = 120
        c.low_rank_dims = (96,)
        c.low_rank_rows, c.low_rank_eval_rows = 40, 8
        c.ann_rows, c.ann_dim, c.ann_nlist, c.ann_timeout_s = 4000, 16, 50, 300
        c.rss_sizes = (32, 64)
        c.hf_batch_size, c.hf_reps, c.hf_seq_len, c.hf_v_steps = 2, 1, 16, 2
        c.hf_own_reps, c.hf_passes = 1, 1
        c.hf_estimate_examples = 2
        g, ll = h.gpt2_small, h.llama_small
        g.vocab, ll.vocab = 96, 80
        g.model.update(d_model=16, n_layers=2, n_heads=2, d_ff=32, max_len=32)
        ll.model.update(
            hidden_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=24, max_position_embeddings=32,
        )  # fmt: skip
    elif mode not in (None, "", "full", "hf"):
        raise ValueError(
            f"unknown benchmark config mode {mode!r}; use 'tiny', 'hf', 'hf_tiny' or nothing"
        )
    return c
