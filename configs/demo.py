"""Demo experiment: synthetic fact world, small LM, TrackStar attribution end to end.

Run: python scripts/run_experiment.py --config configs/demo.py
Every field is overridable from the command line: --config.train.steps=500
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # Master seed: model init and data order derive from it.
    c.run_dir = "runs/demo"  # Everything a run makes lands here (config, world, ckpts, results).

    # --- Synthetic fact world (docs/method.md, Embedded synthetic world) ---
    w = c.world = ml_collections.ConfigDict()
    w.seed = 0  # World seed: names, facts, templates, documents.
    w.source = "synthetic"  # "synthetic" or "lama" (facts + templates jsonl, see *_path below).
    # LAMA T-REx facts: a jsonl file, or a directory of them (LAMA's data/TREx/P*.jsonl), rows
    # with sub_label, obj_label, predicate_id.
    w.lama_facts_path = ""
    # Templates with [X] / [Y] slots: a jsonl file or a directory of them. Rows are LAMA's
    # {"relation", "template"} (data/relations.jsonl) or ParaRel's {"pattern", ...}, one file per
    # relation named after it (data/pattern_data/graphs_json/P17.jsonl). README: "Running a
    # LAMA / ParaRel world".
    w.lama_templates_path = ""
    # Query templates (the rest are corpus phrasings): () = each relation's rows marked
    # "query": true, else its first template with [X] before [Y] and [Y] at the end; or pattern
    # indices, e.g. (0, 2) = the 1st and 3rd template rows of every relation, in file order.
    w.lama_query_patterns = ()
    w.trex_candidates_path = ""  # T-REx-style sentences jsonl as the closed set ("" = built).
    w.n_subjects = 400  # Number of person subjects.
    w.n_relations = 8  # Relations used (of the generator's ~10).
    w.n_objects_per_type = 24  # Object entities per type (cities, countries, ...).
    w.freq_buckets = (1, 2, 4, 8, 16)  # Times a fact is stated in the corpus.
    w.anchor_frac = 0.25  # Share of subjects that are anchors (never queried).
    w.anchor_query_form_p = 0.25  # P(an anchor sentence uses the query-prompt form).
    w.zipf_exponent = 1.0  # Object popularity ~ rank^-a; 0 = uniform.
    w.n_prefixes = 3  # Framing prefixes ("In fact, ...") multiplying the base phrasings.
    w.n_templates = 0  # Base phrasings per relation, the first n of 5; 0 = all (synthetic only).
    w.doc_sentences = (2, 4)  # Fact sentences per document (min, max), one subject per doc.
    w.filler_p = 0.5  # P(a document gets a filler sentence).
    w.distractor_p = 0.2  # P(a document gets a non-fact distractor sentence).
    w.n_distractor_candidates = 400  # Distractor sentences added to the closed candidate pool.
    # Extra distractor candidates, each a filler sentence with 1-3 made-up words that no training
    # document contains (kind "rare_token"): their embedding rows never train (Adam v = 0), to
    # probe the V correction on such tokens (featurize.v_floor). 0 = none (worlds unchanged).
    w.rare_token_candidates = 0
    w.n_queries = 200  # Task queries (one per fact, non-anchor subjects).
    w.n_heldout_queries = 200  # Held-out queries of the same templates (R_eval source).

    # --- Tokenizer ---
    t = c.tokenizer = ml_collections.ConfigDict()
    t.kind = "word"  # Word-level HF tokenizers model (whitespace + punctuation split).
    # Upper bound; the world's word count is usually smaller. 0 = exactly the world's words plus
    # the 4 special tokens (a LAMA / ParaRel world has thousands of entity words).
    t.vocab_size = 2048

    # --- Model (a small GPT-2, flax.nnx: trackstar.hf.gpt2) ---
    m = c.model = ml_collections.ConfigDict()
    # Model family by name (trackstar.families, docs/models.md): how the model is built, sized
    # and sharded. The demo model is a small configuration of the "gpt2" family, the same code
    # that imports Hugging Face GPT-2 checkpoints, so a trained run exports as one
    # (trackstar.hf.export).
    m.family = "gpt2"
    m.size = "small"  # Named size ("tiny", "small", "base"); fields below override if > 0.
    m.d_model = 128
    m.n_layers = 2
    m.n_heads = 4
    m.d_ff = 512
    m.max_len = 64  # Context length (GPT-2's n_positions); longer examples are an error.
    # Untied output head (lm_head, no bias): the embedding rows of words no document contains
    # then never train, which the V-floor study relies on (world.rare_token_candidates).
    m.tie_word_embeddings = False
    m.layer_norm_epsilon = 1e-5  # GPT-2's.
    m.activation = "gelu_new"  # GPT-2's tanh-approximated GELU.
    m.dtype = "float32"  # Compute dtype, "float32" or "bfloat16"; params and logits stay float32.

    # --- Training (optax AdamW, warmup + cosine) ---
    tr = c.train = ml_collections.ConfigDict()
    tr.optimizer = "adamw"  # "adamw" or "adafactor".
    tr.steps = 1500  # ~12 epochs of the demo corpus: f=1 facts mostly unlearned, f=16 learned.
    tr.batch_size = 32
    tr.seq_len = 64
    tr.lr = 3e-3  # Peak learning rate.
    tr.final_lr = 3e-4  # Learning rate at the last step (cosine end value).
    tr.warmup_steps = 100
    tr.b1 = 0.9  # AdamW first-moment decay.
    tr.b2 = 0.98  # AdamW second-moment decay (the V of the optimizer correction).
    tr.eps = 1e-8  # AdamW epsilon (also the default correction epsilon).
    tr.weight_decay = 0.01  # Decoupled weight decay on matrices (not biases/norms).
    tr.adafactor_eps = 1e-30  # optimizer="adafactor" only: epsilon of its factored moments.
    tr.checkpoint_every = 500  # Steps between Orbax checkpoints (resume points).
    tr.keep_checkpoints = 2  # Checkpoints kept on disk (the final one is always kept).
    tr.log_every = 50  # Steps per loss/tokens-per-second log record (one device sync each).
    # Train only to (and read) this step's checkpoint; 0 = train.steps. The schedule still spans
    # train.steps, so the model is step N of the full run (E4's checkpoint sweep, configs/e4.py).
    tr.checkpoint_step = 0

    # --- Featurize: per-example gradient -> V correction -> projection -> store ---
    f = c.featurize = ml_collections.ConfigDict()
    f.query_output_fn = "loss"  # "loss", "margin" or "logit" (trackstar.losses.OUTPUT_FNS).
    f.projection_mode = "global"  # "global" (summed Kronecker grid), "per_tensor", "dense".
    f.k_in = 64  # Kronecker input-side dim; d = k_in * k_out in "global" mode.
    f.k_out = 64
    f.dense_dim = 4096  # d in "dense" mode (tests / tiny models only).
    f.projection_seed = 0  # Seed of the projection matrices (regenerated, never stored).
    f.eps = -1.0  # Correction epsilon; < 0 means the checkpoint's own train.eps (Adam only).
    # V floor: before 1/sqrt, each element's v_hat is raised to >= v_floor * mean(v_hat) (mean
    # over every parameter element), so no element weighs more than 1/sqrt(v_floor) = 100x an
    # element of mean second moment. Without it a parameter training never moved (v = 0: the
    # UNK embedding row, an attention key bias) gets 1/eps = 1e8 and dominates every vector
    # touching it. 1e-4: on the tiny model (600 steps) it touches only those rows and the
    # unembedding columns of never-predicted tokens, and leaves fact-tracing MRR unchanged;
    # 1e-3 already lowers it. 0 = the plain formula. Recorded in each store.
    f.v_floor = 1e-4
    # True: entries whose second moment is exactly 0 (Adam nu == 0: every gradient training
    # saw there was 0, e.g. the input embedding rows of words no training document has) get
    # factor 0 instead of the floored 1/sqrt(v). A query without those words has gradient 0
    # there, so they add only projection cross-talk and vector length to its scores. Refused
    # for Adafactor (its epsilon keeps every statistic > 0). Recorded in each store when True.
    f.drop_unmoved = False
    # Where the correction's V comes from: "optimizer" = the checkpoint's optimizer state;
    # "estimate" = V estimated at the checkpoint's parameters (for checkpoints without an
    # optimizer state): the mean over v_estimate_examples corpus passages (drawn under
    # v_estimate_seed; 0 = all) of squared gradients of the training loss of batches of
    # v_estimate_batch passages (per batch, like Adam's nu; 32 = train.batch_size), then the
    # Adam form with featurize.eps (< 0: 1e-8) and v_floor; saved in <run_dir>/v_estimate/ and
    # reused; its stores are labelled "estimate". "none" = uncorrected stores only (presets
    # with the correction are refused). docs/method.md, "Estimated V".
    f.correction_source = "optimizer"
    f.v_estimate_examples = 4096
    f.v_estimate_seed = 0
    f.v_estimate_batch = 32
    f.max_unk_frac = 0.5  # Warn about examples that are more than this share UNK (1 = never).
    f.unk_error = False  # True: such mostly-UNK examples are an error instead of a warning.
    f.batch_size = 32  # Examples per jitted per-example-gradient call.
    f.chunk_size = 1024  # Rows per atomically committed store chunk.
    f.dtype = "float32"  # Store row dtype: "float32" or "bfloat16".
    f.skip_bad_examples = False  # Skip (and list) empty/too-long examples instead of failing.

    # --- Hessian approximation R (docs/method.md) ---
    h = c.hessian = ml_collections.ConfigDict()
    h.lambda_mix = "auto_trace"  # A number in [0, 1], "auto" (eigen-crossing) or "auto_trace".
    h.crossing_per_65536 = 1000  # "auto": crossing component c = d * this / 65536.
    h.damping = 0.1  # Eigenvalues damped as (l_i + damping * mean l)^-1/2.
    h.train_sample = 4096  # Train-store rows sampled for R_train (0 = all).
    h.eval_source = "heldout"  # "task" (the scored queries) or "heldout" queries.
    h.sample_seed = 0
    # "auto": with n_t + n_e < d rows (train sample + R_eval queries), R has rank <= n_t + n_e
    # and is fitted as Q diag(s) Q^T + damping from the rows' Gram matrix (no d x d matrix;
    # docs/method.md, "Low rank"); "never": always the d x d eigendecomposition; "always".
    h.low_rank = "auto"

    # --- Scoring (docs/method.md, Scoring) ---
    s = c.score = ml_collections.ConfigDict()
    s.preset = "trackstar"  # grad_dot, grad_cosine, trak, exp_opt, exp_opt_norm,
    #                          exp_opt_norm_rtrain, trackstar.
    s.top_k = 100  # Proponents kept per query.
    s.chunk_rows = 4096  # Train-store rows per scoring step.
    # Also keep each query's top_k most negative scores (opponents), found in the same pass
    # (the queries and their negations scored together); written beside the proponents.
    s.opponents = True

    # --- Viewer (trackstar view; docs/viewer.md) ---
    v = c.viewer = ml_collections.ConfigDict()
    v.write = True  # E1/E2 write per-method proponents files; `trackstar run` writes the viewer.
    v.top_k = 10  # Proponents and opponents shown per query and method.
    v.methods = ("trackstar", "bm25", "grad_cosine")  # Methods shown side by side at first.
    v.breakdown_preset = "trackstar"  # Whose top proponent gets a per-layer/per-token split.
    v.breakdown_queries = 12  # Queries (spread over the buckets) with a breakdown (0 = none).

    # --- Evaluation: fact-tracing metrics and baselines (docs/method.md, Evaluation) ---
    e = c.eval = ml_collections.ConfigDict()
    e.mrr_k = 100  # MRR: 1/rank of the first ground-truth candidate within this many.
    e.at_k = 10  # Cut-off of Recall@k and Precision@k.
    e.bm25_stopwords = "english"  # bm25s stopword list: "english" or "none".
    e.random_seed = 0  # Seed of the random-ranking baseline.

    # --- Tail-patch (docs/method.md, Tail-patch) ---
    tp = c.tailpatch = ml_collections.ConfigDict()
    tp.scale = "batch_share"  # "batch_share" (1 / tokens per training batch) or "single".
    tp.lr = -1.0  # Step size eta; < 0 means the final learning rate of training.
    tp.lr_multipliers = (0.1, 0.3, 1.0, 3.0, 10.0)  # Sweep reported beside every table.
    tp.ks = (1, 3, 5, 10)  # Tail-patch@k: mean delta over each query's top k proponents.
    tp.n_queries = 100  # Queries patched (n evenly spaced over the task queries; 0 = all).
    tp.carry_momentum = False  # True: step = U(g) - U(0) with the training optimizer.
    tp.pair_batch = 32  # (query, proponent) pairs per vmapped call (memory vs speed).

    # --- Experiments E1-E8 (docs/method.md); configs/e1.py ... e8.py set these per experiment ---
    ex = c.experiment = ml_collections.ConfigDict()
    ex.name = "e1"  # Which runner: e1 ... e8 (trackstar.experiments.RUNNERS).
    # Results folder <run_dir>/experiments/<output_name>; "" = the runner's name. Another name
    # runs a variant of an experiment without overwriting its results.
    ex.output_name = ""
    ex.methods = ()  # Methods to compare (presets, "bm25", "random"); () = the runner's default.
    ex.tailpatch_methods = ("trackstar",)  # e3/e5: methods tail-patched at every setting.
    ex.k_values = (8, 16, 32, 64)  # e3: sub-grid sides k (d = k * k, k <= featurize.k_in).
    # e3: sides k featurized on their own at d = k * k, beyond featurize.k_in (own stores,
    # tagged k<k>; R in low-rank form when the rows are fewer than d, hessian.low_rank).
    ex.e3_full_dims_k = (128,)
    # e4: sub-grid sides k at which each variant's tailpatch_methods are also ranked (E3's
    # sub-grids, d = k * k); () = none.
    ex.e4_dims_k = ()
    # e4: (a, b) method pairs whose per-query differences (MRR, tail-patch) each variant reports.
    ex.paired = ()
    ex.output_fns = ("loss", "margin", "logit")  # e5: query output functions compared.
    # e4: name -> config overrides of each model variant ({} = this run); each has its own run_dir.
    ex.variants = ml_collections.ConfigDict({"base": {}})
    # Tag of the stores this experiment featurizes (stores/<set>-<correction>-<tag>), so they
    # never mix with stores another featurizer version wrote into the same run dir.
    ex.store_tag = ""
    # e8 (linear datamodeling score): models retrained on lds_subsets random subsets of the
    # training documents, each holding lds_fraction of them, drawn under lds_seed.
    ex.lds_subsets = 32  # K: subsets (one retrained model each); >= 32 for a stable LDS.
    ex.lds_fraction = 0.5  # Share of the training documents in each subset (TRAK's 1/2).
    ex.lds_seed = 0  # Seed of the subset draws (subset k draws from its own stream [seed, k]).

    # --- Run log (trackstar.runlog: <run_dir>/logs/metrics.jsonl) ---
    lg = c.logging = ml_collections.ConfigDict()
    # Also write each record as TensorBoard scalars to <run_dir>/logs/tensorboard/ (needs
    # tensorboardX: pip install 'trackstar[tensorboard]').
    lg.tensorboard = False

    # --- Mesh and multi-host (trackstar.sharding; docs/scaling.md) ---
    mh = c.mesh = ml_collections.ConfigDict()
    mh.data = -1  # Devices on the data axis (examples, store rows); -1 = all the model axis leaves.
    mh.model = 1  # Devices on the parameter axis (tensor-parallel / FSDP); must divide the count.
    mh.rules = "tensor"  # Rule preset: "tensor" (model.family's own rules), "fsdp", "replicated".
    mh.rule_overrides = ()  # "regex=spec" rules tried before the preset, e.g. "head$=None,model".
    mh.featurize_scope = "local"  # Featurize mesh: "local" (this process's devices) or "global".
    mh.distributed = "auto"  # jax.distributed: "auto" (when a coordinator is set), "on", "off".
    mh.coordinator = ""  # "host:port" of process 0; "" = TRACKSTAR_COORDINATOR or auto-detect.
    mh.num_processes = 0  # Processes in the run; 0 = TRACKSTAR_NUM_PROCESSES / auto-detect.
    mh.process_id = -1  # This process's index; -1 = TRACKSTAR_PROCESS_ID / auto-detect.
    mh.cpu_collectives = "gloo"  # CPU cross-process collectives ("" = JAX default).
    mh.memory_vocab_size = 32000  # Vocab assumed by the memory report (real runs: the tokenizer).
    return c
