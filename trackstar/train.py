"""Training: optimizer construction, the jitted step and a resumable loop with Orbax checkpoints.

The loop is independent of where batches come from: it calls ``batch_fn(step)``, which must be a
pure function of the step (``data.TrainStream.batch``), so a run resumed from a checkpoint at
step s replays exactly the batches an uninterrupted run would have seen and ends bit-identical.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm.auto import tqdm

from trackstar import checkpoint
from trackstar.losses import mean_token_loss

PyTree = Any
ApplyFn = Callable[[PyTree, jax.Array], jax.Array]
BatchFn = Callable[[int], tuple[Any, Any]]
OPTIMIZERS = ("adamw", "adafactor")
# Fields that change neither the math nor the data order, so a resume may differ in them.
# (checkpoint_step only says where a run stops: step N of the same trajectory.)
_BOOKKEEPING_FIELDS = ("checkpoint_every", "keep_checkpoints", "log_every", "checkpoint_step")


class TrainConfigError(ValueError):
    """A training setting or checkpoint directory that cannot be used; says what to change."""


class TrainingDiverged(ValueError):
    """The loss became non-finite; the message names the step window."""


def _as_dict(cfg: ml_collections.ConfigDict | dict) -> dict:
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def check_train_config(cfg_train: ml_collections.ConfigDict | dict) -> None:
    """Raises ``TrainConfigError`` for settings that cannot train (before any work starts)."""
    c = _as_dict(cfg_train)
    if c.get("optimizer", "adamw") not in OPTIMIZERS:
        raise TrainConfigError(
            f"train.optimizer = {c['optimizer']!r}; use one of {', '.join(OPTIMIZERS)}"
        )
    for name in ("steps", "checkpoint_every", "log_every"):
        if int(c.get(name, 1)) < 1:
            raise TrainConfigError(f"train.{name} = {c[name]}; it must be >= 1")
    if not 0 <= int(c["warmup_steps"]) < int(c["steps"]):
        raise TrainConfigError(
            f"train.warmup_steps = {c['warmup_steps']} must be in [0, train.steps = {c['steps']})"
        )
    if not (c["lr"] > 0 and c["final_lr"] >= 0):
        raise TrainConfigError(
            f"train.lr = {c['lr']} must be > 0 and train.final_lr = {c['final_lr']} >= 0"
        )


def lr_schedule(cfg_train: ml_collections.ConfigDict | dict) -> optax.Schedule:
    """Linear warmup 0 -> ``lr`` over ``warmup_steps``, cosine decay to ``final_lr`` at ``steps``.

    ``final_lr`` is the learning rate of the last steps (the tail-patch step size).
    """
    check_train_config(cfg_train)
    c = _as_dict(cfg_train)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=float(c["lr"]),
        warmup_steps=int(c["warmup_steps"]),
        decay_steps=int(c["steps"]),  # Counts the warmup too: the schedule ends at `steps`.
        end_value=float(c["final_lr"]),
    )


def _decay_mask(params: PyTree) -> PyTree:
    # Decay matrices only; biases and norm scales are left alone (the usual AdamW practice).
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg_train: ml_collections.ConfigDict | dict) -> optax.GradientTransformation:
    """``optax.adamw`` (or ``optax.adafactor``) on ``lr_schedule(cfg_train)``.

    AdamW uses ``b1, b2, eps, weight_decay`` (decay on matrices only). Adafactor uses the same
    schedule and weight decay, ``adafactor_eps``, and no parameter-scale multiplication, so the
    learning rate means the same step size as for AdamW.
    """
    c = _as_dict(cfg_train)
    schedule = lr_schedule(c)
    if c.get("optimizer", "adamw") == "adamw":
        return optax.adamw(
            schedule,
            b1=float(c["b1"]),
            b2=float(c["b2"]),
            eps=float(c["eps"]),
            weight_decay=float(c["weight_decay"]),
            mask=_decay_mask,
        )
    return optax.adafactor(
        learning_rate=schedule,
        multiply_by_parameter_scale=False,
        eps=float(c.get("adafactor_eps", 1e-30)),
        weight_decay_rate=float(c["weight_decay"]) or None,
        weight_decay_mask=_decay_mask,
    )


@functools.lru_cache(maxsize=8)
def make_train_step(apply_fn: ApplyFn, optimizer: optax.GradientTransformation):
    """A jitted ``step(params, opt_state, tokens_BxT, weights_BxT) -> (params, opt_state, loss)``.

    ``params`` and ``opt_state`` buffers are donated: do not reuse the arrays passed in.
    Cached per ``(apply_fn, optimizer)`` so repeated loops (resume, tail runs) compile once.
    """

    def loss_fn(params, tokens_BxT, weights_BxT):
        return mean_token_loss(apply_fn(params, tokens_BxT), tokens_BxT, weights_BxT)[0]

    def step(params, opt_state, tokens_BxT, weights_BxT):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens_BxT, weights_BxT)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def train_config_fingerprint(cfg_train: ml_collections.ConfigDict | dict) -> str:
    """Hash of the fields that determine the trajectory (bookkeeping fields excluded)."""
    c = {k: v for k, v in _as_dict(cfg_train).items() if k not in _BOOKKEEPING_FIELDS}
    return hashlib.sha256(json.dumps(c, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _config_diff(saved: dict, current: dict) -> str:
    keys = sorted((set(saved) | set(current)) - set(_BOOKKEEPING_FIELDS))
    diffs = [
        f"{k}: {saved.get(k)!r} -> {current.get(k)!r}"
        for k in keys
        if saved.get(k) != current.get(k)
    ]
    return ", ".join(diffs) or "(fields equal; fingerprint scheme differs)"


def _copy_tree(tree: PyTree) -> PyTree:
    # The step donates its inputs; copying keeps the caller's arrays valid.
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def train_loop(
    apply_fn: ApplyFn,
    params: PyTree,
    optimizer: optax.GradientTransformation,
    batch_fn: BatchFn,
    cfg_train: ml_collections.ConfigDict | dict,
    ckpt_dir: str,
    resume: bool = True,
    progress: bool = True,
    stop_after: int | None = None,
    meta: dict | None = None,
    on_log: Callable[[dict], Any] | None = None,
) -> tuple[PyTree, PyTree, list[dict]]:
    """Trains ``cfg_train.steps`` steps with checkpoints; returns ``(params, opt_state, history)``.

    Args:
      apply_fn: pure ``(params, tokens_BxT) -> logits_BxTxV``.
      params: initial params (used when there is no checkpoint to resume; not modified).
      optimizer: e.g. ``make_optimizer(cfg_train)``; must match the one that wrote ``ckpt_dir``.
      batch_fn: ``batch_fn(step) -> (tokens_BxT int32, weights_BxT float32)``, pure in ``step``.
      cfg_train: the ``train`` config section.
      ckpt_dir: Orbax checkpoint directory; a checkpoint is written every ``checkpoint_every``
        steps, at ``stop_after`` and at the end.
      resume: continue from the latest complete checkpoint in ``ckpt_dir`` if any. With
        ``resume=False`` the directory must hold no checkpoint.
      progress: show a tqdm bar with loss and tokens/s.
      stop_after: stop (with a checkpoint) once this many steps are done, e.g. to split a run.
      meta: extra JSON-serializable fields stored in every checkpoint's meta.
      on_log: called with each ``log_every`` window's record (e.g. ``runlog.log_metrics``).

    History: one dict per ``log_every`` window (``step``, ``loss`` = window mean, ``lr``,
    ``tokens_per_s``) for the steps run in this call.
    """
    check_train_config(cfg_train)
    c = _as_dict(cfg_train)
    total = int(c["steps"])
    end = total if stop_after is None else min(int(stop_after), total)
    fingerprint = train_config_fingerprint(c)
    schedule = lr_schedule(c)

    start = 0
    found = checkpoint.latest_step(ckpt_dir)
    if found is not None and not resume:
        raise TrainConfigError(
            f"{os.path.abspath(ckpt_dir)} already holds checkpoints (latest step {found}); "
            "pass resume=True or use an empty directory"
        )
    if found is not None:
        saved = checkpoint.read_meta(ckpt_dir, found)
        if saved.get("train_config_fingerprint") != fingerprint:
            raise TrainConfigError(
                f"checkpoints in {os.path.abspath(ckpt_dir)} come from a different train config "
                f"({_config_diff(saved.get('train_config', {}), c)}); "
                "use a fresh directory or the original config"
            )
        abstract_params = jax.eval_shape(lambda p: p, params)
        abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
        params, opt_state, saved = checkpoint.restore(
            ckpt_dir, abstract_params, abstract_opt, found
        )
        start = int(saved["step"])
    else:
        params = _copy_tree(params)
        opt_state = optimizer.init(params)

    history: list[dict] = []
    if start >= end:
        return params, opt_state, history

    step_fn = make_train_step(apply_fn, optimizer)
    ckpt_meta = dict(meta or {})
    ckpt_meta.update(train_config=c, train_config_fingerprint=fingerprint)
    every, log_every = int(c["checkpoint_every"]), int(c["log_every"])
    bar = tqdm(total=end, initial=start, disable=not progress, desc="train", unit="step")
    window_losses: list[jax.Array] = []
    window_tokens, t0 = 0, time.perf_counter()
    with checkpoint.Checkpointer(ckpt_dir, keep=c.get("keep_checkpoints")) as ck, bar:
        for step in range(start, end):
            tokens_BxT, weights_BxT = batch_fn(step)
            tokens_BxT = jnp.asarray(tokens_BxT, dtype=jnp.int32)
            weights_BxT = jnp.asarray(weights_BxT, dtype=jnp.float32)
            params, opt_state, loss = step_fn(params, opt_state, tokens_BxT, weights_BxT)
            window_losses.append(loss)
            window_tokens += int(np.prod(tokens_BxT.shape))
            done = step + 1
            bar.update(1)
            if done % log_every == 0 or done == end:
                mean_loss = float(jnp.mean(jnp.stack(window_losses)))  # One sync per window.
                elapsed = time.perf_counter() - t0
                rec = dict(
                    step=done,
                    loss=mean_loss,
                    lr=float(schedule(step)),
                    tokens_per_s=window_tokens / max(elapsed, 1e-9),
                )
                history.append(rec)
                if on_log is not None:
                    on_log(rec)
                bar.set_postfix(loss=f"{mean_loss:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
                if not math.isfinite(mean_loss):
                    raise TrainingDiverged(
                        f"loss became {mean_loss} in steps {done - len(window_losses)}..{done}; "
                        "lower train.lr or check the data"
                    )
                window_losses, window_tokens, t0 = [], 0, time.perf_counter()
            if done % every == 0 or done == end:
                ck.save(done, params, opt_state, dict(ckpt_meta, data_position=done))
    return params, opt_state, history
