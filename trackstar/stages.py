"""The pipeline's stages over a run directory: world -> train -> featurize -> R -> score.

Each stage reads what the previous one wrote under ``cfg.run_dir`` and is resumable: a stage
whose output is complete is skipped, a partial one continues. Scripts in ``scripts/`` are thin
wrappers over these functions; ``run_experiment.py`` chains them (docs/method.md, Pipeline).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import optax

from trackstar import (
    checkpoint,
    correction,
    data,
    families,
    hessian,
    release,
    score,
    sharding,
    store,
    tokenizer,
    world,
)
from trackstar import index as index_lib
from trackstar import model as model_lib
from trackstar import train as train_lib
from trackstar import v_estimate as v_estimate_lib
from trackstar.config import (
    default_config_path,
    load_config_file,
    run_dir_conflicts,
    save_config,
    validate,
)
from trackstar.featurize import Examples, featurize_into_store, make_mesh_feature_fn
from trackstar.files import atomic_write, write_json
from trackstar.losses import TRAIN_OUTPUT_FN
from trackstar.multihost import barrier, is_main_process
from trackstar.projection import Projector
from trackstar.runlog import configure_from_config, log_metrics
from trackstar.tree import tree_fingerprint

# Example sets a store can be made of: the closed candidate set, the corpus passages (open
# set: documents, split at sentence boundaries where longer than model.max_len), the task
# queries and the held-out queries (R_eval source).
EXAMPLE_SETS = ("candidates", "corpus", "task", "heldout")


class StageError(RuntimeError):
    """A stage cannot run because an earlier one is missing or does not match; says what to run."""


# ----- paths ----------------------------------------------------------------------------------


def path(cfg: ml_collections.ConfigDict, *parts: str) -> str:
    """A path inside the run directory."""
    return os.path.join(cfg.run_dir, *parts)


# ----- caches ---------------------------------------------------------------------------------
# One scheme for every derived result in the run directory: a result is keyed by a hash of what
# decides its content (config sections, store metadata, checkpoint step, ...). Arrays live in
# ``results/cache/<kind>_<name>_<key>.npz``; a Hessian fit records its key in its provenance.
# Everything is written atomically (``trackstar.files``), so a killed run leaves no half file.

# Values computed (cache misses) per kind ("rank", "tailpatch", "hessian", ...) in this process.
CACHE_MISSES: Counter[str] = Counter()


def config_key(*parts: Any) -> str:
    """A short stable hash of ``parts`` (JSON with sorted keys; other objects by ``str``)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# Fields added after run directories were made, at the value that keeps the older behaviour:
# cache keys leave them out at that value, so caches made before the field existed stay valid.
_KEY_NEUTRAL_FIELDS = {"train": {"checkpoint_step": 0}, "world": {"n_templates": 0}}


def config_section(cfg: ml_collections.ConfigDict, name: str) -> dict:
    """The config section ``name`` as a plain dict ({} when the config has none), less the
    fields of ``_KEY_NEUTRAL_FIELDS`` at their neutral value."""
    section = cfg[name].to_dict() if name in cfg else {}
    for field, neutral in _KEY_NEUTRAL_FIELDS.get(name, {}).items():
        if section.get(field, neutral) == neutral:
            section.pop(field, None)
    return section


def final_step(cfg: ml_collections.ConfigDict) -> int:
    """The step a run directory trains to and reads: ``train.checkpoint_step``, 0 = the last."""
    return int(cfg.train.get("checkpoint_step", 0) or cfg.train.steps)


def cache_path(cfg: ml_collections.ConfigDict, kind: str, name: str, key: str) -> str:
    """``results/cache/<kind>_<name>_<key>.npz`` inside the run directory."""
    return path(cfg, "results", "cache", f"{kind}_{name}_{key}.npz")


def cached_array(
    cfg: ml_collections.ConfigDict, kind: str, name: str, key: str, make: Callable[[], Any]
) -> np.ndarray:
    """The array cached under ``(kind, name, key)``, or ``make()`` saved there first.

    Each computed value is counted in ``CACHE_MISSES[kind]`` (tests use it to prove reuse).
    """
    file = cache_path(cfg, kind, name, key)
    if os.path.exists(file):
        with np.load(file) as z:
            return z["value"]
    CACHE_MISSES[kind] += 1
    value = np.asarray(make())
    atomic_write(file, lambda f: np.savez(f, value=value), binary=True)
    return value


# ----- world + tokenizer ----------------------------------------------------------------------


def check_run_dir(cfg: ml_collections.ConfigDict) -> None:
    """Raises ``StageError`` when ``cfg`` changes a setting its run directory was built with.

    Scripts read those settings from the run directory (``config.resolve_for_run_dir``), so
    this only fires for configs built in code; it keeps a trained run from being read, or
    extended, under settings it was not made with.
    """
    conflicts = run_dir_conflicts(cfg)
    if conflicts:
        more = f" (+{len(conflicts) - 6} more)" if len(conflicts) > 6 else ""
        raise StageError(
            f"{cfg.run_dir} was built with other settings: {'; '.join(conflicts[:6])}{more}. "
            "Use its settings (scripts read them from its config.json; in code, "
            "trackstar.config.resolve_for_run_dir), or a new run_dir for the new ones"
        )


def _save_run_config(cfg: ml_collections.ConfigDict) -> None:
    # World fields the source ignored are left out (and listed), so the record claims nothing
    # that had no effect.
    unused = [f"world.{name}" for name in world.unused_fields(cfg.world)]
    save_config(cfg, path(cfg, "config.json"), unused=unused)


def stage_world(cfg: ml_collections.ConfigDict) -> world.World:
    """Builds (or reloads) the fact world and its tokenizer.

    On a fresh run directory, the config is validated, the world built and the tokenizer
    trained (input files, query counts and the vocabulary size all checked) before anything
    is written; then ``tokenizer.json``, ``config.json`` and ``world/`` (manifest last) are
    written. ``config.json`` is the run's record of what it was built with and is never
    rewritten once the world exists. On an existing run directory, ``cfg`` must agree with
    that record (``check_run_dir``).
    """
    validate(cfg)
    world_dir, tok_path = path(cfg, "world"), path(cfg, "tokenizer.json")
    if os.path.exists(os.path.join(world_dir, "manifest.json")):
        check_run_dir(cfg)
        w = world.load_world(world_dir)
        if not os.path.exists(tok_path):
            tokenizer.save_tokenizer(
                tokenizer.train_tokenizer(world.world_texts(w), cfg.tokenizer), tok_path
            )
        if not os.path.exists(path(cfg, "config.json")):  # A run made before it was kept.
            _save_run_config(cfg)
        return w
    w = world.build_world(cfg.world)
    tok = tokenizer.train_tokenizer(world.world_texts(w), cfg.tokenizer)
    # Everything is checked; a config.json or tokenizer.json here without a world is the
    # leftover of a failed first build and is replaced.
    tokenizer.save_tokenizer(tok, tok_path)
    _save_run_config(cfg)
    world.save_world(w, world_dir)
    return w


def load_world_and_tokenizer(cfg: ml_collections.ConfigDict):
    """The saved world and tokenizer of a run, or an error saying to run make_world first.

    ``cfg`` must agree with the settings the run was built with (``check_run_dir``).
    """
    world_dir, tok_path = path(cfg, "world"), path(cfg, "tokenizer.json")
    if not (os.path.exists(os.path.join(world_dir, "manifest.json")) and os.path.exists(tok_path)):
        raise StageError(
            f"{cfg.run_dir} has no world/tokenizer yet; run scripts/make_world.py with this config"
        )
    check_run_dir(cfg)
    return world.load_world(world_dir), tokenizer.load_tokenizer(tok_path)


# ----- training -------------------------------------------------------------------------------


@dataclasses.dataclass
class Trained:
    """A trained model with everything attribution needs."""

    apply_fn: Any
    params: Any
    opt_state: Any
    optimizer: optax.GradientTransformation
    tok: Any
    world: world.World
    step: int


def _model_and_optimizer(cfg, tok):
    apply_fn, params = families.make_model(cfg.model, tokenizer.vocab_size(tok), cfg.seed)
    return apply_fn, params, train_lib.make_optimizer(cfg.train)


def stage_train(cfg: ml_collections.ConfigDict, progress: bool = True) -> dict:
    """Trains (resuming from the latest checkpoint) and reports greedy accuracy per bucket.

    A run with its final checkpoint is used as it is (its ``results/accuracy.json`` when
    present), so a config field that does not change training never forces a retrain.
    """
    configure_from_config(cfg)  # logging.tensorboard, before any record (each stage that logs).
    step = checkpoint.latest_step(path(cfg, "checkpoints"))
    if step is not None and step >= final_step(cfg):
        file = path(cfg, "results", "accuracy.json")
        if os.path.exists(file):
            with open(file) as f:
                return json.load(f)
        t = load_trained(cfg)
        acc = accuracy_report(cfg, t.apply_fn, t.params, t.tok, t.world)
        write_json(file, acc, default=str)
        return acc
    CACHE_MISSES["train"] += 1
    w, tok = load_world_and_tokenizer(cfg)
    apply_fn, params, optimizer = _model_and_optimizer(cfg, tok)
    stream = data.train_stream(tok, w, cfg.train.seq_len, cfg.train.batch_size, cfg.seed)
    params, opt_state, _ = train_lib.train_loop(
        apply_fn,
        params,
        optimizer,
        stream.batch,
        cfg.train,
        path(cfg, "checkpoints"),
        progress=progress,
        stop_after=final_step(cfg),
        meta={"data_fingerprint": stream.fingerprint},
        on_log=lambda rec: log_metrics(cfg.run_dir, "train", **rec),
    )
    acc = accuracy_report(cfg, apply_fn, params, tok, w)
    write_json(path(cfg, "results", "accuracy.json"), acc, default=str)
    log_metrics(
        cfg.run_dir,
        "train_accuracy",
        accuracy=acc["accuracy"],
        per_bucket={b: v["accuracy"] for b, v in acc["per_bucket"].items()},
    )
    return acc


# Restored checkpoints by (run dir, model and train config, step): every stage and experiment
# in one process shares one ``Trained`` and so one apply function, whose jitted kernels then
# compile only once.
_TRAINED: dict[str, Trained] = {}


def load_trained(cfg: ml_collections.ConfigDict) -> Trained:
    """Restores the final checkpoint of a run (``final_step``: params and full optimizer
    state), memoized per run dir, model and train config and final step."""
    key = config_key(
        os.path.abspath(cfg.run_dir),
        config_section(cfg, "model"),
        config_section(cfg, "train"),
        checkpoint.latest_step(path(cfg, "checkpoints")),
        final_step(cfg),
    )
    if key not in _TRAINED:
        _TRAINED[key] = _restore_trained(cfg)
    return _TRAINED[key]


def _restore_trained(cfg: ml_collections.ConfigDict) -> Trained:
    w, tok = load_world_and_tokenizer(cfg)
    apply_fn, params, optimizer = _model_and_optimizer(cfg, tok)
    ckpt_dir = path(cfg, "checkpoints")
    latest, step = checkpoint.latest_step(ckpt_dir), final_step(cfg)
    if latest is None or latest < step:
        raise StageError(
            f"{ckpt_dir} holds no final checkpoint (latest: {latest}, want {step}); "
            "run scripts/train.py with this config first"
        )
    if not checkpoint.is_complete(ckpt_dir, step):
        raise StageError(
            f"{ckpt_dir} no longer holds step {step} (train.checkpoint_step; latest: {latest}); "
            "read the run at its last step (checkpoint_step = 0), or train the step into a "
            "new run_dir"
        )
    abstract_params = jax.eval_shape(lambda p: p, params)
    abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
    params, opt_state, _ = checkpoint.restore(ckpt_dir, abstract_params, abstract_opt, step)
    return Trained(apply_fn, params, opt_state, optimizer, tok, w, step)


def query_examples(cfg, tok, queries) -> Examples:
    """Queries encoded as prompt + target with only the target tokens counted."""
    tokens, weights = data.encode_queries(
        tok, [q.prompt for q in queries], [q.target for q in queries], cfg.model.max_len
    )
    return Examples(tokens, weights)


def model_answers(cfg, trained: Trained, queries: Sequence) -> list[tuple[str, float]]:
    """``(answer text, probability)`` of the model for each query: its greedy (teacher-forced)
    tokens at the target positions, decoded, and exp of their summed log-probability."""
    ex = query_examples(cfg, trained.tok, queries)
    pred_BxT, logp_B = model_lib.greedy_answer(
        trained.apply_fn, trained.params, ex.tokens_NxT, ex.weights_NxT
    )
    pred_BxT, logp_B, w_BxT = np.asarray(pred_BxT), np.asarray(logp_B), np.asarray(ex.weights_NxT)
    answers = []
    for i in range(len(queries)):
        text = tokenizer.decode(trained.tok, pred_BxT[i][w_BxT[i] > 0].tolist())
        answers.append((text, float(np.exp(logp_B[i]))))
    return answers


def accuracy_report(cfg, apply_fn, params, tok, w: world.World) -> dict:
    """Greedy fact accuracy per frequency bucket on task + held-out queries."""
    queries = list(w.task_queries) + list(w.heldout_queries)
    ex = query_examples(cfg, tok, queries)
    correct = np.asarray(
        jax.jit(model_lib.greedy_correct, static_argnums=0)(
            apply_fn, params, ex.tokens_NxT, ex.weights_NxT
        )
    )
    buckets = np.array([q.bucket for q in queries])
    per_bucket = {}
    for b in sorted(set(buckets.tolist())):
        sel = buckets == b
        per_bucket[str(b)] = {"accuracy": float(correct[sel].mean()), "n": int(sel.sum())}
    # Zipf objects make guessing a relation's most common object pay; report that baseline.
    by_relation: dict[str, list[str]] = {}
    for fact in w.facts:
        by_relation.setdefault(fact.relation, []).append(fact.object)
    top_object = {r: max(set(objs), key=objs.count) for r, objs in by_relation.items()}
    guessed = [top_object[w.facts[q.fact_id].relation] == q.target for q in queries]
    return {
        "accuracy": float(correct.mean()),
        "per_bucket": per_bucket,
        "majority_object_share": float(np.mean(guessed)),
        "n_queries": len(queries),
    }


# ----- open-set passages ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Passage:
    """An open-set candidate: a corpus document, or a sentence-aligned piece of a long one."""

    doc_id: int
    text: str
    fact_ids: tuple[int, ...]


def corpus_passages(w: world.World, tok, max_len: int) -> list[Passage]:
    """The corpus documents as open-set candidates, each fitting ``max_len`` tokens with BOS.

    The model's learned position table has ``max_len`` rows, so a longer document cannot be
    one example; it is cut at sentence boundaries into the fewest greedy pieces that fit. A
    passage's ``fact_ids`` are the facts its own sentences state.
    """
    out: list[Passage] = []
    for doc in w.documents:
        if 1 + len(tokenizer.encode(tok, doc.text)) <= max_len:
            out.append(Passage(doc.doc_id, doc.text, tuple(doc.fact_ids)))
            continue
        groups: list[list[int]] = [[]]
        for i in range(len(doc.sentences)):
            trial = " ".join(doc.sentences[j] for j in [*groups[-1], i])
            if groups[-1] and 1 + len(tokenizer.encode(tok, trial)) > max_len:
                groups.append([])
            groups[-1].append(i)
        for g in groups:
            text = " ".join(doc.sentences[i] for i in g)
            facts = sorted({doc.sentence_fact_ids[i] for i in g} - {-1})
            out.append(Passage(doc.doc_id, text, tuple(facts)))
    return out


def candidate_pool(cfg, w: world.World, tok, candidates: str) -> tuple[list[str], list[set]]:
    """``(texts, ground_truth)`` of a candidate pool: ground truth per task query as id sets.

    ``"candidates"`` is the closed set (the world's annotated ground truth); ``"corpus"`` the
    open set, where a passage is ground truth for a query when it states the query's fact.
    """
    if candidates == "candidates":
        return data.candidate_texts(w), [set(q.candidate_ids) for q in w.task_queries]
    if candidates == "corpus":
        passages = corpus_passages(w, tok, cfg.model.max_len)
        by_fact: dict[int, set] = {}
        for i, p in enumerate(passages):
            for f in p.fact_ids:
                by_fact.setdefault(f, set()).add(i)
        return [p.text for p in passages], [by_fact.get(q.fact_id, set()) for q in w.task_queries]
    raise StageError(f"unknown candidate pool {candidates!r}; use 'candidates' or 'corpus'")


# ----- featurize ------------------------------------------------------------------------------


def _encoded(encode, n: int, skip: bool) -> Examples:
    """Runs ``encode(skip_too_long)``; with ``skip``, unencodable examples keep their position
    as zero-weight rows and are listed with the reason, so ids stay the example positions."""
    if not skip:
        return Examples(*encode(False))
    tokens, weights, kept = encode(True)
    full_t = np.zeros((n, tokens.shape[1]), tokens.dtype)
    full_w = np.zeros((n, weights.shape[1]), weights.dtype)
    full_t[kept], full_w[kept] = tokens, weights
    reason = "empty or longer than model.max_len"
    return Examples(full_t, full_w, {int(i): reason for i in sorted(set(range(n)) - set(kept))})


def unk_policy(cfg) -> dict:
    """The mostly-UNK policy of ``cfg.featurize`` as keyword arguments of ``data.encode_texts``
    / ``encode_queries``: a warning naming the examples, or an error (``featurize.unk_error``)."""
    return {
        "max_unk_frac": float(cfg.featurize.max_unk_frac),
        "unk_error": bool(cfg.featurize.unk_error),
    }


def examples_for(cfg, trained: Trained, which: str) -> tuple[Examples, str, str]:
    """``(examples, output_fn, kind)`` for one of ``EXAMPLE_SETS``.

    An example that is empty or longer than the model's context is an error naming it, or with
    ``featurize.skip_bad_examples`` is skipped and listed in the store's metadata. Examples
    that are more than ``featurize.max_unk_frac`` UNK tokens are named in a warning, or with
    ``featurize.unk_error`` in an error.
    """
    w, tok, max_len = trained.world, trained.tok, cfg.model.max_len
    skip = bool(cfg.featurize.skip_bad_examples)
    unk = unk_policy(cfg)
    if which in ("candidates", "corpus"):
        if which == "candidates":
            texts = data.candidate_texts(w)
        else:
            texts = [p.text for p in corpus_passages(w, tok, max_len)]
        ex = _encoded(lambda s: data.encode_texts(tok, texts, max_len, s, **unk), len(texts), skip)
        return ex, TRAIN_OUTPUT_FN, "train"  # the "loss" output function
    if which in ("task", "heldout"):
        qs = w.task_queries if which == "task" else w.heldout_queries
        prompts, targets = [q.prompt for q in qs], [q.target for q in qs]
        ex = _encoded(
            lambda s: data.encode_queries(tok, prompts, targets, max_len, s, **unk),
            len(qs),
            skip,
        )
        return ex, cfg.featurize.query_output_fn, "query"
    raise StageError(f"unknown example set {which!r}; choose one of {EXAMPLE_SETS}")


# Train fields the correction reads from the checkpoint's own training config (b2 and eps only
# for AdamW; read from the correction registry); cfg.train must agree with the checkpoint on
# them (see checkpoint_train_config).
_CORRECTION_TRAIN_FIELDS = {
    c.optimizer: ("optimizer", *c.train_fields)
    for c in correction.CORRECTIONS.values()
    if c.optimizer is not None
}


def checkpoint_train_config(cfg, step: int | None = None) -> dict:
    """The ``train`` config the run's checkpoint (latest, or ``step``) was trained with.

    The correction is defined by the optimizer that produced the moments, so it is read from
    the checkpoint's metadata, never from ``cfg.train``. When ``cfg.train`` disagrees with the
    checkpoint on a field the correction reads (optimizer; b2 and eps for AdamW) this refuses
    instead of silently picking one: the config then does not describe the checkpoint, and
    other users of ``cfg.train`` (the tail-patch step, its learning rate) would be wrong.
    To change only the correction epsilon use ``featurize.eps``.

    Raises:
      StageError: the checkpoint has no training config, or ``cfg.train`` contradicts it.
    """
    ckpt_dir = path(cfg, "checkpoints")
    meta = checkpoint.read_meta(ckpt_dir, step)
    saved = meta.get("train_config")
    if not isinstance(saved, dict):
        raise StageError(
            f"the checkpoint at step {meta.get('step')} in {ckpt_dir} records no train_config, "
            "so its optimizer correction cannot be pinned; retrain with this trackstar version"
        )
    optimizer = saved.get("optimizer", "adamw")
    fields = _CORRECTION_TRAIN_FIELDS.get(optimizer, ("optimizer",))
    current = cfg.train.to_dict()
    diffs = [
        f"train.{k}: checkpoint {saved.get(k)!r}, config {current.get(k)!r}"
        for k in fields
        if saved.get(k, "adamw" if k == "optimizer" else None) != current.get(k)
    ]
    if diffs:
        raise StageError(
            f"the config's train section contradicts the checkpoint in {ckpt_dir} on what the "
            f"optimizer correction reads ({'; '.join(diffs)}); featurize with the train "
            "settings the checkpoint was trained with (set featurize.eps to change only the "
            "correction epsilon), or train a new run_dir"
        )
    return saved


# Where the correction's V comes from (featurize.correction_source): the checkpoint's optimizer
# state, an estimate from squared batch gradients (trackstar.v_estimate), or nowhere (only
# uncorrected stores and presets).
CORRECTION_SOURCES = ("optimizer", "estimate", "none")


def correction_source(cfg) -> str:
    """``featurize.correction_source`` ("optimizer" for a config without the field)."""
    source = str(cfg.featurize.get("correction_source", "optimizer"))
    if source not in CORRECTION_SOURCES:
        raise StageError(
            f"featurize.correction_source = {source!r}; use one of {CORRECTION_SOURCES}"
        )
    return source


def correction_kind(cfg, corrected: bool) -> str:
    """The store's ``correction`` field: the checkpoint's moment kind, "estimate", or "none".

    With ``featurize.correction_source = "optimizer"`` the optimizer is the checkpoint's own
    (``checkpoint_train_config``); a run directory without checkpoints (scoring stores made
    elsewhere) falls back to ``cfg.train.optimizer``, and an optimizer without a known
    correction is refused. ``"estimate"`` gives the estimated V's label; ``"none"`` refuses
    every corrected store (and so every preset that needs one).
    """
    if not corrected:
        return "none"
    source = correction_source(cfg)
    if source == "none":
        raise StageError(
            "featurize.correction_source = 'none' makes only uncorrected stores, but a "
            "corrected store (a preset with the optimizer correction: exp_opt, exp_opt_norm, "
            "exp_opt_norm_rtrain, trackstar) was asked for; use an uncorrected preset "
            "(grad_dot, grad_cosine, trak), or set featurize.correction_source = 'estimate' "
            "(V from squared gradients) or 'optimizer' (the checkpoint's optimizer state)"
        )
    if source == "estimate":
        return correction.ESTIMATE
    if checkpoint.latest_step(path(cfg, "checkpoints")) is not None:
        optimizer = checkpoint_train_config(cfg).get("optimizer", "adamw")
    else:
        optimizer = cfg.train.optimizer
    registered = correction.for_optimizer(optimizer)
    if registered is None:
        raise StageError(
            f"optimizer {optimizer!r} has no known second-moment correction; corrected stores "
            f"need one of {sorted(correction.OPTIMIZER_KINDS)} (or use an uncorrected preset)"
        )
    return registered.label


def _tagged(name: str, *tags: str) -> str:
    return "-".join([name, *[t for t in tags if t]])


def store_path(cfg, which: str, corrected: bool, tag: str = "") -> str:
    """``stores/<which>-<correction>[-<tag>]``; a tag keeps variants (another output function,
    projection or model) apart from the default store."""
    return path(cfg, "stores", _tagged(f"{which}-{correction_kind(cfg, corrected)}", tag))


def make_projector(cfg, params) -> Projector:
    f = cfg.featurize
    return Projector(params, f.projection_mode, f.k_in, f.k_out, f.projection_seed, f.dense_dim)


def v_estimate_sample(cfg) -> v_estimate_lib.EstimateSample:
    """The estimate's sample from ``featurize.v_estimate_examples``, ``_seed``, ``_batch``."""
    f = cfg.featurize
    return v_estimate_lib.EstimateSample(
        int(f.get("v_estimate_examples", 4096)),
        int(f.get("v_estimate_seed", 0)),
        int(f.get("v_estimate_batch", 32)),
    )


# Estimates loaded or computed in this process, by key.
_V_ESTIMATES: dict[str, tuple[correction.VEstimate, dict]] = {}


def v_estimate(
    cfg,
    trained: Trained,
    sample: v_estimate_lib.EstimateSample | None = None,
    progress: bool = True,
) -> tuple[correction.VEstimate, dict]:
    """``(estimate, record)``: V estimated at ``trained``'s parameters (``trackstar.v_estimate``)
    from a sample of the corpus passages (``v_estimate_sample(cfg)``, or ``sample``).

    The estimate is keyed (``config_key``) by the parameters' fingerprint, the sampled
    examples' fingerprint and the sample settings, saved as ``v_estimate/<key>.npz`` in the run
    directory and reused from there; each computation counts in ``CACHE_MISSES["v_estimate"]``.
    ``record`` (per, loss, batch, examples, seed, used, source, key) is what a store made with
    it records as ``correction_settings["estimate"]``.
    """
    sample = sample or v_estimate_sample(cfg)
    examples, _, _ = examples_for(cfg, trained, "corpus")
    pos = v_estimate_lib.sample_positions(len(examples), sample)
    tokens, weights = examples.tokens_NxT[pos], examples.weights_NxT[pos]
    key = config_key(
        "v_estimate",
        v_estimate_lib.VERSION,
        v_estimate_lib.PER,
        v_estimate_lib.LOSS,
        tree_fingerprint(trained.params),
        v_estimate_lib.data_fingerprint(tokens, weights),
        sample.to_dict(),
    )
    if key in _V_ESTIMATES:
        return _V_ESTIMATES[key]
    file = path(cfg, "v_estimate", f"{key}.npz")
    if os.path.exists(file):
        _V_ESTIMATES[key] = v_estimate_lib.load(file, trained.params)
        return _V_ESTIMATES[key]
    CACHE_MISSES["v_estimate"] += 1
    est = v_estimate_lib.estimate_v(
        trained.apply_fn,
        trained.params,
        tokens,
        weights,
        sample.batch,
        progress=progress and is_main_process(),
    )
    record = {
        "per": v_estimate_lib.PER,
        "loss": v_estimate_lib.LOSS,
        **sample.to_dict(),
        "used": int(len(pos)),
        "source": "corpus",
        "key": key,
    }
    if is_main_process():
        v_estimate_lib.save(file, est, record)
    barrier("trackstar-v-estimate-saved")
    _V_ESTIMATES[key] = (est, record)
    return est, record


def correction_settings(cfg, trained: Trained) -> correction.CorrectionSettings:
    """The effective correction of ``trained``'s checkpoint: optimizer, b2, eps and step count
    from the checkpoint (``checkpoint_train_config`` and the moment state), the epsilon
    override ``featurize.eps``, the guard ``featurize.v_floor`` and ``featurize.drop_unmoved``
    from ``cfg`` (a config without the last field means False, as before it existed).

    With ``featurize.correction_source = "estimate"`` the settings of the estimated V instead
    (``v_estimate``, ``correction.estimate_settings``: no optimizer is read); with ``"none"``
    a ``StageError`` (``correction_kind``)."""
    source = correction_source(cfg)
    if source == "none":
        correction_kind(cfg, True)  # The StageError that names the fix.
    if source == "estimate":
        est, record = v_estimate(cfg, trained)
        return correction.estimate_settings(
            est,
            record,
            featurize_eps=float(cfg.featurize.eps),
            v_floor=float(cfg.featurize.v_floor),
            drop_unmoved=bool(cfg.featurize.get("drop_unmoved", False)),
        )
    return correction.settings_from(
        trained.opt_state,
        checkpoint_train_config(cfg, trained.step),
        featurize_eps=float(cfg.featurize.eps),
        v_floor=float(cfg.featurize.v_floor),
        drop_unmoved=bool(cfg.featurize.get("drop_unmoved", False)),
    )


def make_preconditioner(
    cfg, trained: Trained, settings: correction.CorrectionSettings | None = None
) -> Any:
    """The correction factor of ``trained`` from ``correction_settings`` (or ``settings``).

    Featurize and the tail-patch step both build their factor here, so a store's vectors and
    the training step that evaluates them use the same numbers. Settings of an estimated V
    (``settings.estimate``) rebuild that estimate from its recorded sample (``v_estimate``);
    a ``StageError`` when the parameters or corpus no longer give the recorded one.
    """
    settings = settings or correction_settings(cfg, trained)
    if settings.estimate is not None:
        sample = v_estimate_lib.EstimateSample.from_dict(settings.estimate)
        est, record = v_estimate(cfg, trained, sample)
        if record["key"] != settings.estimate.get("key"):
            raise StageError(
                f"the correction settings record the V estimate {settings.estimate.get('key')}, "
                f"but this run's parameters and corpus give {record['key']} for the same "
                "sample; featurize again with this checkpoint"
            )
        return correction.preconditioner_for(settings, est, trained.params)
    return correction.preconditioner_for(settings, trained.opt_state, trained.params)


def featurize_mesh(cfg, params) -> tuple[Any, Any]:
    """``(mesh, param_shardings)`` the feature kernel runs on: the featurize mesh
    (``mesh.featurize_scope``) with ``params`` laid out by the config's rules."""
    mesh = sharding.mesh_from_config(cfg.mesh, scope=cfg.mesh.featurize_scope)
    shardings = sharding.param_shardings(
        params, mesh, sharding.rules_from_config(cfg.mesh, cfg.model)
    )
    return mesh, shardings


def optimizer_fingerprint(trained: Trained, settings: correction.CorrectionSettings | None) -> str:
    """A store's ``optimizer_fingerprint``: the optimizer state's, or for an estimated V the
    estimate's key (``"v_estimate:<key>"``), so stores of the two never pass
    ``store.check_compatible`` together."""
    if settings is not None and settings.estimate is not None:
        return f"v_estimate:{settings.estimate['key']}"
    return correction.opt_state_fingerprint(trained.opt_state)


@dataclasses.dataclass
class FeaturizeJob:
    """Everything one featurize pass needs; the store is created (or reopened to resume)."""

    examples: Examples
    output_fn: str
    projector: Projector
    preconditioner: Any
    store: store.VectorStore
    feature_fn: Any  # make_mesh_feature_fn(...) of this job (built before the store, see below)
    settings: correction.CorrectionSettings | None  # None for an uncorrected store


def prepare_featurize(
    cfg: ml_collections.ConfigDict,
    which: str,
    corrected: bool,
    trained: Trained,
    tag: str = "",
) -> FeaturizeJob:
    """Encodes the example set and creates its store with the metadata that identifies it.

    Every mesh and process count makes the same store, so any run can resume another's
    partial store, and a store made another way is refused by ``VectorStore.create``. The
    store records the effective correction settings (``correction_settings``), so a resume
    with another b2, eps, step or V floor is refused instead of mixing two corrections.
    Everything that can reject the job (the examples, the correction, the output function)
    is built before the store is created, so a bad setting leaves no store behind whose
    metadata would block the corrected rerun.
    """
    examples, output_fn, kind = examples_for(cfg, trained, which)
    projector = make_projector(cfg, trained.params)
    settings = correction_settings(cfg, trained) if corrected else None
    precond = make_preconditioner(cfg, trained, settings) if corrected else None
    mesh, shardings = featurize_mesh(cfg, trained.params)
    feature_fn = make_mesh_feature_fn(
        trained.apply_fn, output_fn, projector, precond, mesh, shardings
    )
    meta = store.StoreMeta(
        kind=kind,
        dim=projector.dim,
        dtype=cfg.featurize.dtype,
        num_examples=len(examples),
        chunk_size=cfg.featurize.chunk_size,
        model_fingerprint=tree_fingerprint(trained.params),
        optimizer_fingerprint=optimizer_fingerprint(trained, settings),
        projection=projector.config(),
        output_fn=output_fn,
        correction=settings.kind if settings else "none",
        correction_settings=settings.to_dict() if settings else {},
        extra={"example_set": which},
    )
    vs = store.VectorStore.create(store_path(cfg, which, corrected, tag), meta)
    return FeaturizeJob(examples, output_fn, projector, precond, vs, feature_fn, settings)


def stage_featurize(
    cfg: ml_collections.ConfigDict,
    which: str,
    corrected: bool = True,
    trained: Trained | None = None,
    progress: bool = True,
    tag: str = "",
) -> str:
    """Featurizes an example set into ``stores/<which>-<correction>[-<tag>]``; resumes a
    partial store. Use a new ``tag`` whenever the featurize config differs from the store's.

    Runs on the mesh of ``cfg.mesh`` (``mesh.featurize_scope``); with several processes each
    writes its own chunks and process 0 finalizes the store (``featurize_into_store``).
    """
    configure_from_config(cfg)
    trained = trained or load_trained(cfg)
    job = prepare_featurize(cfg, which, corrected, trained, tag)
    if not job.store.is_complete:
        t0 = time.perf_counter()
        written = featurize_into_store(
            job.feature_fn,
            sharding.place(trained.params, job.feature_fn.shardings),
            job.examples,
            job.store,
            cfg.featurize.batch_size,
            skip_bad_examples=cfg.featurize.skip_bad_examples,
            progress=progress,
            desc=f"featurize {which}",
            finalize=True,
        )
        seconds = time.perf_counter() - t0
        log_metrics(
            cfg.run_dir,
            "featurize",
            store=os.path.basename(job.store.path),
            examples_written=int(written),  # by this process
            seconds=seconds,
            examples_per_s=written / max(seconds, 1e-9),
            dim=job.store.dim,
            store_mb=_dir_mb(job.store.path),
        )
    return job.store.path


def _dir_mb(directory: str) -> float:
    """Bytes under ``directory`` in MB (10^6)."""
    total = 0
    for root, _, files in os.walk(directory):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except FileNotFoundError:  # A temporary file renamed away while walking.
                pass
    return total / 1e6


# ----- Hessian + scoring ----------------------------------------------------------------------


def open_store(
    file: str,
    reference: store.StoreMeta | None = None,
    names: tuple[str, str] = ("train", "query"),
) -> store.VectorStore:
    """A finished store; a missing or partial one raises ``StoreError`` saying to featurize.

    With ``reference`` (the metadata of the store this one is used with), the store must also
    pass ``store.check_compatible(reference, meta, names)``: same model, optimizer state,
    projection and correction settings.
    """
    vs = store.VectorStore.open(file)
    if reference is not None:
        store.check_compatible(reference, vs.meta, names=names)
    return vs


def hessian_path(
    cfg, candidates: str, corrected: bool, train_tag: str = "", query_tag: str = ""
) -> str:
    name = _tagged(f"{candidates}-{correction_kind(cfg, corrected)}", train_tag, query_tag)
    return path(cfg, "hessian", f"{name}.npz")


def hessian_stores(
    cfg, candidates: str, corrected: bool, train_tag: str = "", query_tag: str = ""
) -> tuple[store.VectorStore, store.VectorStore]:
    """``(train_store, eval_store)`` a Hessian fit reads: the finished candidate store and the
    R_eval store (``hessian.eval_source``), checked compatible before any vector is read.

    ``train_tag`` / ``query_tag`` pick tagged candidate / query stores (see ``store_path``).
    """
    train_store = open_store(store_path(cfg, candidates, corrected, train_tag))
    eval_source = cfg.hessian.eval_source
    if eval_source not in ("task", "heldout"):
        raise StageError(f"hessian.eval_source must be 'task' or 'heldout', got {eval_source!r}")
    # An R_eval store featurized unlike the train store is refused (fit_hessian checks again).
    eval_store = open_store(
        store_path(cfg, eval_source, corrected, query_tag), train_store.meta, ("train", "R_eval")
    )
    return train_store, eval_store


def stage_hessian(
    cfg,
    candidates: str = "candidates",
    corrected: bool = True,
    train_tag: str = "",
    query_tag: str = "",
) -> str:
    """Fits R_train (from the candidate store), R_eval (task or held-out queries), λ, R^{-1/2}.

    ``train_tag`` / ``query_tag`` pick tagged candidate / query stores (see ``store_path``).
    A fit already made from the same stores with the same ``hessian`` section is reused: its
    provenance carries the key (``config_key`` of both and of the stores' metadata). R_train
    is reduced over the mesh of ``cfg.mesh``; process 0 writes the fit.
    """
    configure_from_config(cfg)
    train_store, eval_store = hessian_stores(cfg, candidates, corrected, train_tag, query_tag)
    out = hessian_path(cfg, candidates, corrected, train_tag, query_tag)
    key = config_key(
        config_section(cfg, "hessian"), train_store.meta.to_dict(), eval_store.meta.to_dict()
    )
    saved = hessian.HessianFit.read_meta(out) or {}
    if saved.get("provenance", {}).get("config_key") == key:
        return out
    CACHE_MISSES["hessian"] += 1
    t0 = time.perf_counter()
    fit = hessian.fit_hessian(
        train_store,
        eval_store,
        cfg.hessian,
        train_store.dim,
        provenance={
            "train_store": train_store.path,
            "eval_store": eval_store.path,
            "config_key": key,
        },
        mesh=sharding.mesh_from_config(cfg.mesh),
    )
    if is_main_process():
        os.makedirs(os.path.dirname(out), exist_ok=True)
        fit.save(out)
    ev = np.asarray(fit.eigenvalues, np.float64)
    log_metrics(
        cfg.run_dir,
        "hessian",
        fit=os.path.basename(out),
        seconds=time.perf_counter() - t0,
        representation=fit.provenance.get("representation", "dense"),
        lambda_mix=fit.lambda_mix,
        damping=fit.damping,
        rule=fit.rule,
        # Spectrum summary: largest eigenvalue, trace, rank above round-off, and the
        # participation ratio (tr R)^2 / tr R^2, an effective number of directions.
        eig_max=float(ev.max(initial=0.0)),
        trace=float(ev.sum()),
        rank=int(np.sum(ev > ev.max(initial=0.0) * len(ev) * np.finfo(np.float64).eps)),
        effective_rank=float(ev.sum() ** 2 / max(float(np.sum(ev**2)), 1e-300)),
    )
    barrier("trackstar-hessian-saved")
    return out


@dataclasses.dataclass
class ScoreInputs:
    """What scoring one preset reads: the train and query stores and the Hessian fit (None
    for a preset without one)."""

    train_store: store.VectorStore
    query_store: store.VectorStore
    fit: hessian.HessianFit | None


def score_inputs(
    cfg, preset: str, candidates: str, train_tag: str = "", query_tag: str = ""
) -> ScoreInputs:
    """Opens and checks the stores (and Hessian fit) ``preset`` scores the task queries with.

    The query store is the one of the preset's query-side correction and must match the train
    store (``score.check_query_meta``); the fit must have been made from vectors like the train
    store's (a ``ScoreError`` otherwise).
    """
    spec = score.get_preset(preset)
    train_store = open_store(store_path(cfg, candidates, spec.corrected, train_tag))
    query_store = open_store(store_path(cfg, "task", spec.query_side_corrected, query_tag))
    score.check_query_meta(preset, train_store.meta, query_store.meta)
    fit = preset_fit(cfg, preset, candidates, train_store, train_tag, query_tag)
    return ScoreInputs(train_store, query_store, fit)


def preset_fit(
    cfg, preset: str, candidates: str, train_store: store.VectorStore, train_tag="", query_tag=""
) -> hessian.HessianFit | None:
    """The Hessian fit ``preset`` scores ``train_store`` with (None for a preset without one),
    checked to be made from vectors like the train store's (a ``ScoreError`` otherwise)."""
    spec = score.get_preset(preset)
    if spec.hessian == "none":
        return None
    fit = hessian.HessianFit.load(
        hessian_path(cfg, candidates, spec.corrected, train_tag, query_tag)
    )
    try:
        fit.check_compatible(train_store.meta.to_dict(), "the train store")
    except hessian.HessianError as e:
        raise score.ScoreError(str(e)) from None
    return fit


def proponents_path(
    cfg, candidates: str, preset: str, train_tag: str = "", query_tag: str = ""
) -> str:
    """``results/proponents_<candidates>_<preset>[-<tags>]`` (add ``.jsonl`` / ``.npz``)."""
    return path(cfg, "results", _tagged(f"proponents_{candidates}_{preset}", train_tag, query_tag))


def write_score_results(
    cfg,
    candidates: str,
    preset: str,
    ids: np.ndarray,
    scores: np.ndarray,
    train_tag: str = "",
    query_tag: str = "",
    opponents: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict:
    """Writes the task queries' top-k proponents (``proponents_path`` + ``.jsonl`` / ``.npz``,
    with the candidate texts, and ``.release.jsonl.gz`` in the release's results schema,
    ``trackstar.release``) and returns ``{"ids", "scores", "path", "release_path"}`` (path:
    the jsonl). ``opponents``: ``(ids, scores)`` of the most negative scores, kept in the npz
    (``opponent_ids`` / ``opponent_scores``) and the release file.
    """
    w, tok = load_world_and_tokenizer(cfg)
    texts, gt = candidate_pool(cfg, w, tok, candidates)
    queries = [dataclasses.asdict(q) for q in w.task_queries]
    out = proponents_path(cfg, candidates, preset, train_tag, query_tag)
    extra = {}
    if opponents is not None:
        extra = {"opponent_ids": opponents[0], "opponent_scores": opponents[1]}
    score.write_proponents(out + ".jsonl", out + ".npz", queries, ids, scores, texts, extra)
    records = release.results_from_run(
        w.task_queries,
        ids,
        scores,
        texts,
        opp_ids_QxK=None if opponents is None else opponents[0],
        opp_scores_QxK=None if opponents is None else opponents[1],
        facts=w.facts,
        ground_truth=gt,
    )
    release.write_results(out + ".release.jsonl.gz", records)
    return {
        "ids": ids,
        "scores": scores,
        "path": out + ".jsonl",
        "release_path": out + ".release.jsonl.gz",
    }


def stage_score(
    cfg,
    preset: str | None = None,
    candidates: str = "candidates",
    progress: bool = True,
    train_tag: str = "",
    query_tag: str = "",
) -> dict:
    """Scores the task queries against a candidate store with a scoring preset (``score.PRESETS``).

    Tagged stores (and their Hessian fit) are used when ``train_tag`` / ``query_tag`` are given;
    the proponents file then carries the tags in its name. The train rows are sharded over the
    mesh of ``cfg.mesh``; process 0 writes the proponents files, and every process returns
    ``{"ids", "scores", "path"}`` (the same on each).
    """
    configure_from_config(cfg)
    preset = preset or cfg.score.preset
    inputs = score_inputs(cfg, preset, candidates, train_tag, query_tag)
    t0 = time.perf_counter()
    run_kwargs = dict(
        rows_per_step=cfg.score.chunk_rows,
        progress=progress and is_main_process(),
        mesh=sharding.mesh_from_config(cfg.mesh),
    )
    args = (inputs.train_store, inputs.query_store, preset, inputs.fit, cfg.score.top_k)
    opponents = None
    if cfg.score.get("opponents", True):
        ids, scores, *opponents = release.score_with_opponents(*args, **run_kwargs)
    else:
        ids, scores = score.score_preset(*args, **run_kwargs)
    seconds = time.perf_counter() - t0
    log_metrics(
        cfg.run_dir,
        "score",
        preset=preset,
        store=os.path.basename(inputs.train_store.path),
        rows=inputs.train_store.num_rows,
        queries=int(ids.shape[0]),
        seconds=seconds,
        rows_per_s=inputs.train_store.num_rows / max(seconds, 1e-9),
    )
    if is_main_process():
        result = write_score_results(
            cfg, candidates, preset, ids, scores, train_tag, query_tag, opponents
        )
    else:
        out = proponents_path(cfg, candidates, preset, train_tag, query_tag)
        result = {
            "ids": ids,
            "scores": scores,
            "path": out + ".jsonl",
            "release_path": out + ".release.jsonl.gz",
        }
    barrier("trackstar-proponents-saved")
    return result


def index_path(
    cfg, candidates: str, preset: str, dtype: str = "float32", train_tag="", query_tag=""
) -> str:
    """``indexes/<candidates>-<preset>-<dtype>[-<tags>]``: a scoring index (``trackstar.index``)."""
    return path(cfg, "indexes", _tagged(f"{candidates}-{preset}-{dtype}", train_tag, query_tag))


def stage_index(
    cfg,
    preset: str | None = None,
    candidates: str = "candidates",
    dtype: str = "float32",
    progress: bool = True,
    train_tag: str = "",
    query_tag: str = "",
) -> str:
    """Builds the scoring index of a candidate store for ``preset`` (``index.build_index``):
    its rows R^{-1/2}-transformed and normalized once, as the preset scores them.

    Reads the store and Hessian fit ``stage_score`` would (``score_inputs``'s checks). An index
    already at ``index_path`` built from the same store, fit, preset and dtype (its recorded
    ``IndexInfo``) is reused; a partial one resumes; one of other inputs (a refeaturized store,
    a refit) is deleted and rebuilt, counted in ``CACHE_MISSES["index"]``. Rows are transformed
    on the mesh of ``cfg.mesh``. Returns the index directory.
    """
    preset = preset or cfg.score.preset
    spec = score.get_preset(preset)
    train_store = open_store(store_path(cfg, candidates, spec.corrected, train_tag))
    fit = preset_fit(cfg, preset, candidates, train_store, train_tag, query_tag)
    out = index_path(cfg, candidates, preset, dtype, train_tag, query_tag)
    wanted = index_lib.IndexInfo.make(train_store, fit, preset, dtype)
    existing = index_lib.read_info(out)
    # A moved run directory keeps its index: the recorded source path is only a label.
    same = existing is not None and (
        dataclasses.replace(existing, source_store=wanted.source_store) == wanted
    )
    if same and store.VectorStore.open(out, require_complete=False).is_complete:
        return out
    CACHE_MISSES["index"] += 1
    resumable = same and existing.source_store == wanted.source_store
    if not resumable and os.path.exists(out) and is_main_process():
        shutil.rmtree(out)  # Built from other inputs (or unreadable): rebuilt below.
    barrier("trackstar-index-cleared")
    index_lib.build_index(
        train_store,
        fit,
        preset,
        out,
        dtype,
        mesh=sharding.mesh_from_config(cfg.mesh),
        progress=progress and is_main_process(),
        rows_per_step=int(cfg.score.chunk_rows),
    )
    return out


def export_run(
    cfg: ml_collections.ConfigDict, out_dir: str | os.PathLike, overwrite: bool = False
) -> str:
    """Writes the trained model of the run ``cfg`` describes as a Hugging Face checkpoint.

    ``trackstar.hf.export.save_checkpoint`` of the final checkpoint's params, ``cfg.model`` and
    the run's tokenizer; returns the directory. The run's ``cfg.model.family`` must be
    ``"gpt2"`` (``HFExportError`` before anything is restored otherwise).
    """
    from trackstar.hf import export

    export.check_exportable(cfg.model)
    trained = load_trained(cfg)
    return export.save_checkpoint(
        out_dir, trained.params, cfg.model, trained.tok, overwrite=overwrite
    )


# ----- recorded configs -------------------------------------------------------------------


def config_for_run_dir(
    run_dir: str | os.PathLike,
    base: ml_collections.ConfigDict | None = None,
    *,
    saved_file: str = "config.json",
    default_config: str = "demo.py",
    missing: str = (
        "so it is not a built run directory; run the world and train stages into it first "
        "(trackstar world / trackstar train)"
    ),
) -> ml_collections.ConfigDict:
    """The config a run directory records (``saved_file``), with ``run_dir`` set to it.

    The recorded fields are laid over ``base`` (default: ``configs/<default_config>`` when the
    checkout has it), so fields newer than the run keep their defaults. The featurize, hessian,
    score and mesh sections are those of the command that built the run's world; pass a config
    to ``Attributor.from_run`` to use others. Without the file, ``StageError`` says ``missing``.
    """
    run_dir = os.fspath(run_dir)
    file = os.path.join(run_dir, saved_file)
    if not os.path.isfile(file):
        raise StageError(f"{run_dir} has no {saved_file}, {missing}")
    with open(file, encoding="utf-8") as f:
        saved = json.load(f)
    saved.pop("unused_fields", None)
    if base is None:
        default = default_config_path(default_config)
        base = load_config_file(default) if os.path.isfile(default) else None
    merged = overlay_config(base.to_dict() if base is not None else {}, saved)
    merged["run_dir"] = run_dir
    return ml_collections.ConfigDict(merged)


def overlay_config(base: dict, saved: dict) -> dict:
    """``base`` with every value of ``saved`` on top (nested; JSON lists back to tuples)."""
    out = dict(base)
    for key, value in saved.items():
        current = out.get(key)
        if isinstance(value, dict) and isinstance(current, dict):
            out[key] = overlay_config(current, value)
        elif isinstance(value, list) and (isinstance(current, tuple) or current is None):
            out[key] = tuple(value)
        else:
            out[key] = value
    return out
