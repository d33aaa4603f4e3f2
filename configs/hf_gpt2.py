"""TrackStar proponents for a Hugging Face GPT-2 checkpoint over a corpus file.

Run (docs/bring_your_own_model.md):

    trackstar attribute --config configs/hf_gpt2.py \
        --config.model.checkpoint_dir=checkpoints/gpt2 \
        --config.corpus.path=corpus.jsonl --config.queries.path=queries.jsonl

Defaults are sized for GPT-2 small (124M) on one accelerator; ``configs/hf_llama.py`` holds
the Llama-family (Llama / Mistral / Qwen2, ~1B) settings. Every field is overridable.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Everything the pipeline makes lands here: passages/, v_estimate/, stores/, hessian/,
    # results/ (proponents.jsonl, proponents.md, config.json). Rerunning reuses what is there.
    c.run_dir = "runs/hf_gpt2"

    # --- The checkpoint (a save_pretrained directory; nothing is downloaded) ---
    m = c.model = ml_collections.ConfigDict()
    m.checkpoint_dir = ""  # config.json + model.safetensors (or an index) + tokenizer.json.
    # Params and compute dtype, "float32" or "bfloat16". float32: 124M params are 0.5 GB, and
    # per-example gradients keep full precision; bfloat16 halves memory at some precision.
    m.dtype = "float32"
    # Row width in tokens with BOS: corpus documents longer than this are cut into passages at
    # sentence boundaries, and [BOS] + prompt + target of a query must fit. 0 = the checkpoint's
    # context (1024 for GPT-2). Featurize cost grows with it; 512 holds a paragraph or two.
    m.max_len = 512
    # Token id written before every passage and query; -1 = config.json's bos_token_id
    # (GPT-2: 50256, <|endoftext|>, the separator it saw between training documents).
    m.bos_token_id = -1

    # --- The corpus: candidate training documents (trackstar.corpus_files) ---
    co = c.corpus = ml_collections.ConfigDict()
    co.path = ""  # A jsonl / parquet file, a directory of them, or a save_to_disk directory.
    co.format = "auto"  # "jsonl", "parquet", "datasets" or "auto" (from the path).
    co.id_field = "id"  # Field of a document's id ("" = its row number from 0).
    co.text_field = "text"  # Field of its text.
    co.overlap_sentences = 0  # Sentences a passage repeats from the previous one of its doc.
    co.batch_rows = 1024  # Documents read and tokenized at a time (memory stays flat).
    co.skip_empty = False  # True: documents without tokens are left out instead of an error.

    # --- The queries: what to attribute (jsonl rows, one query each) ---
    q = c.queries = ml_collections.ConfigDict()
    q.path = ""  # Rows {"prompt", "target"} or {"inputs_plaintext", "targets_plaintext"}.
    # "prompt_target" (the rows above), "release" (the release's query files, a file or a
    # directory: fact_id, entity0, relation, entity1, prompt0..2, trex_sentences; the query is
    # prompt{prompt_index} -> entity1, its id the fact_id) or "auto" (release when the first
    # row has fact_id, entity1 and prompt0). Release queries are also evaluated against their
    # ground truth (trex_sentences, and the fact_triples of corpus shards read with
    # corpus.id_field = "sentence_id"): results/<preset>.release.jsonl.gz with opponents and
    # results/<preset>.release_metrics.json (MRR, Recall@10); docs/release_format.md.
    q.format = "auto"
    q.prompt_index = 0  # Release queries: which of prompt0, prompt1, prompt2 is asked.
    q.prompt_field = ""  # "" = "prompt", else "inputs_plaintext".
    q.target_field = ""  # "" = "target", else "targets_plaintext".
    q.id_field = "id"  # A row's id field (absent: its position from 0).
    # A space before a target that starts without one: "auto" = for byte-level BPE tokenizers
    # (GPT-2, Llama 3, Qwen2), where "Paris" after a prompt is the token " Paris"; "yes", "no".
    q.space_before_target = "auto"

    # --- Featurize: per-example gradient -> g / sqrt(V) -> projection -> store ---
    f = c.featurize = ml_collections.ConfigDict()
    f.query_output_fn = "loss"  # "loss", "margin" or "logit" (trackstar.losses.OUTPUT_FNS).
    # d = k_in * k_out. The paper uses d = 2^16 (k_in = k_out = 256); 2^14 keeps R (d x d) at
    # 1 GiB in float32 and its host eigendecomposition at minutes instead of hours, and every
    # store row at 64 KiB. Raise both to 256 for the paper's setting.
    f.projection_mode = "global"  # "global" (summed Kronecker grid), "per_tensor", "dense".
    f.k_in = 128
    f.k_out = 128
    f.dense_dim = 4096  # d in "dense" mode only (tiny models).
    f.projection_seed = 0  # Seed of the projection matrices (regenerated, never stored).
    # V: a pretrained checkpoint has no optimizer state, so "estimate" (mean squared batch
    # gradient over v_estimate_examples passages, batches of v_estimate_batch) is the
    # TrackStar correction; "none" = uncorrected stores (presets grad_dot, grad_cosine, trak).
    f.correction_source = "estimate"
    f.v_estimate_examples = 4096  # Passages the estimate averages over (0 = all).
    f.v_estimate_seed = 0
    f.v_estimate_batch = 32  # Passages per squared gradient (like a training batch).
    f.eps = -1.0  # Correction epsilon; < 0 = 1e-8 (optax Adam's).
    f.v_floor = 1e-4  # V raised to >= v_floor * mean V before 1/sqrt (0 = the plain formula).
    f.drop_unmoved = False  # True: factor 0 where the estimated V is exactly 0.
    f.max_unk_frac = 1.0  # Mostly-UNK warning: off (byte-level BPE has no UNK token).
    f.unk_error = False
    f.batch_size = 16  # Examples per per-example-gradient call (512 tokens, 124M: a few GB).
    f.chunk_size = 1024  # Store rows per atomically committed chunk (the resume unit).
    f.dtype = "float32"  # Store row dtype; "bfloat16" halves the store (d * 2 bytes a row).
    f.skip_bad_examples = False  # True: list examples without counted tokens, don't fail.

    # --- R: mixed Gauss-Newton matrix (docs/method.md), the project's defaults ---
    h = c.hessian = ml_collections.ConfigDict()
    h.lambda_mix = "auto_trace"  # lambda tr R_eval = (1 - lambda) tr R_train; or a number.
    h.crossing_per_65536 = 1000  # lambda_mix = "auto": eigen-crossing component c = d * x / 65536.
    h.damping = 0.1  # Eigenvalues damped as (l + damping * mean l)^-1/2.
    h.train_sample = 0  # Passages sampled for R_train (0 = all; d^2 per row on the device).
    h.eval_source = "task"  # R_eval from the queries file (the only query set here).
    h.sample_seed = 0

    # --- Scoring ---
    s = c.score = ml_collections.ConfigDict()
    s.preset = "trackstar"  # Any trackstar.score preset the correction source allows.
    s.top_k = 20  # Proponents kept per query.
    s.chunk_rows = 4096  # Store rows per scoring step.

    # --- Mesh (trackstar.sharding; docs/scaling.md): one accelerator by default ---
    mh = c.mesh = ml_collections.ConfigDict()
    mh.data = -1  # Devices on the data axis; -1 = all the model axis leaves.
    mh.model = 1  # Devices on the parameter axis (tensor-parallel / FSDP).
    mh.rules = "tensor"  # "tensor" (the family's rules), "fsdp" or "replicated".
    mh.rule_overrides = ()  # "regex=spec" rules tried before the preset.
    mh.featurize_scope = "local"  # "local" (this process's devices) or "global".
    mh.distributed = "auto"  # jax.distributed: "auto", "on", "off".
    mh.coordinator = ""  # "host:port" of process 0 ("" = auto-detect).
    mh.num_processes = 0  # 0 = auto-detect.
    mh.process_id = -1  # -1 = auto-detect.
    mh.cpu_collectives = "gloo"  # CPU cross-process collectives.
    mh.memory_vocab_size = 50257  # Vocab assumed by the memory report.
    return c
