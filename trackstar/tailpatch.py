"""Tail-patch: does one training step on a proponent raise the query target's probability?

docs/method.md, Tail-patch. From parameters theta, for each query q and each of its
proponents m *separately*:

    theta' = theta - eta * mult * s * g_m * precond          (default: momentum not carried)
    theta' = theta + mult * (U(s * g_m) - U(0))                (``carry_momentum=True``)
    delta  = p_theta'(y | x) - p_theta(y | x),   p = exp(sum_t log p(y_t | x, y_<t))

with g_m the gradient of m's summed training loss, ``precond`` the optimizer correction of
``trackstar.correction.preconditioner`` (Adam: ``1 / (sqrt(v_hat) + eps)``; Adafactor: its
factored scale; each parameter's ``correction.Scale`` multiplies the gradient with ``apply``,
the same elementwise factor featurize applies), eta the final training learning rate and s the
scale: ``"batch_share"`` (1 / counted tokens per training batch, B (T - 1): m's share of one
ordinary batch) or ``"single"`` (1 / m's own counted tokens: a batch holding only m). U is one
full update of the training optimizer from the checkpoint's ``opt_state``; subtracting U(0)
keeps only m's contribution (momentum, weight decay and the step's own schedule cancel), so the
two definitions can be compared.

The model is any pure ``apply_fn(params, tokens_BxT) -> logits_BxTxV``. (query, proponent)
pairs are processed in fixed-size padded batches with ``jax.vmap`` (one compilation per
shape), and every learning-rate multiplier of a sweep reuses the same proponent gradient.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from trackstar import losses
from trackstar.correction import as_scale, is_scale, named_scales
from trackstar.metrics import mean_se
from trackstar.tree import named_leaves

PyTree = Any
ApplyFn = Callable[[PyTree, jax.Array], jax.Array]
SCALES = ("batch_share", "single")


class TailPatchError(ValueError):
    """Tail-patch inputs that do not fit together; the message says how to fix them."""


def _sequence_logprob(apply_fn: ApplyFn, params: PyTree, tokens_T, weights_T) -> jax.Array:
    """sum_t w_t log p(tokens[t] | tokens[:t]) for one example (``losses.sequence_logprob``)."""
    return losses.sequence_logprob(
        apply_fn(params, tokens_T[None]), tokens_T[None], weights_T[None]
    )[0]


@functools.lru_cache(maxsize=16)
def _pair_fn(apply_fn: ApplyFn, carry_momentum: bool, optimizer: Any) -> Callable:
    """The jitted batch computation; cached so repeated calls compile once per shape."""

    def example_loss(params, tokens_S, weights_S):
        """m's summed training loss (the ``"loss"`` output function)."""
        # -sequence_logprob, not losses.loss: the same quantity in the rounding tail-patch
        # deltas have always been computed with (losses module docstring).
        return -_sequence_logprob(apply_fn, params, tokens_S, weights_S)

    def one_pair(params, precond, opt_state, zero_update, lr, mults_M, qt, qw, mt, mw, scale):
        base = _sequence_logprob(apply_fn, params, qt, qw)
        g = jax.grad(example_loss)(params, mt, mw)
        if carry_momentum:
            scaled = jax.tree.map(lambda x: scale * x, g)
            update, _ = optimizer.update(scaled, opt_state, params)
            direction = jax.tree.map(lambda u, u0: u - u0, update, zero_update)
        else:
            # Each parameter's Scale multiplies its gradient (Scale.apply): factored
            # (Adafactor) scales are expanded here, inside the jit, so only their row and
            # column factors are held between calls; the product is the elementwise factor
            # featurize multiplies the gradient by.
            direction = jax.tree.map(
                lambda x, c: as_scale(c).apply(-lr * scale * x), g, precond, is_leaf=is_scale
            )

        def at_mult(mult):
            patched = jax.tree.map(lambda p, d: p + (mult * d).astype(p.dtype), params, direction)
            return _sequence_logprob(apply_fn, patched, qt, qw)

        logp_M = jax.lax.map(at_mult, mults_M)
        return jnp.exp(logp_M) - jnp.exp(base)

    batched = jax.vmap(one_pair, in_axes=(None, None, None, None, None, None, 0, 0, 0, 0, 0))
    return jax.jit(batched)


def _check_precond(params: PyTree, precond: PyTree) -> None:
    p_leaves = named_leaves(params)
    c_leaves = named_scales(precond)
    p_paths = [p for p, _ in p_leaves]
    c_paths = [p for p, _ in c_leaves]
    if p_paths != c_paths:
        missing = sorted(set(p_paths) - set(c_paths))[:3]
        extra = sorted(set(c_paths) - set(p_paths))[:3]
        raise TailPatchError(
            "precond must have the same parameter paths as params "
            f"(missing: {missing}, unexpected: {extra}); build it with "
            "correction.preconditioner(opt_state, params, eps, b2=...)"
        )
    for (path, p), (_, c) in zip(p_leaves, c_leaves, strict=True):
        parts = "/".join(str(np.shape(x)) for x in jax.tree.leaves(c))
        try:
            shape = c.shape()
        except (TypeError, ValueError):
            raise TailPatchError(
                f"{c.kind} precond at {path!r} has factors of shapes {parts} that do not "
                "combine into one scale; build it with correction.preconditioner(opt_state, "
                "params)"
            ) from None
        try:
            fits = np.broadcast_shapes(shape, np.shape(p)) == np.shape(p)
        except ValueError:  # numpy raises when the shapes do not broadcast at all
            fits = False
        if not fits:
            raise TailPatchError(
                f"{c.kind} precond at {path!r} has shape {shape}, which does not broadcast to the "
                f"parameter's shape {np.shape(p)}; build it from this checkpoint's opt_state "
                "and params"
            )


def tailpatch_sweep(
    apply_fn: ApplyFn,
    params: PyTree,
    query_tokens_QxT: np.ndarray,
    query_weights_QxT: np.ndarray,
    cand_tokens_NxS: np.ndarray,
    cand_weights_NxS: np.ndarray,
    proponent_ids_QxK: np.ndarray,
    *,
    lr: float,
    lr_multipliers: Sequence[float] = (1.0,),
    precond: PyTree | None = None,
    scale: str = "batch_share",
    counted_tokens_per_batch: float | None = None,
    carry_momentum: bool = False,
    optimizer: optax.GradientTransformation | None = None,
    opt_state: PyTree | None = None,
    pair_batch: int = 32,
) -> np.ndarray:
    """Tail-patch deltas for every (multiplier, query, proponent): ``deltas_MxQxK``.

    Args:
      apply_fn: ``apply_fn(params, tokens_BxT) -> logits_BxTxV``.
      params: parameters theta (the final checkpoint).
      query_tokens_QxT, query_weights_QxT: queries; weights mark the target tokens.
      cand_tokens_NxS, cand_weights_NxS: the candidate pool the proponent ids index into;
        weights mark the tokens the training loss counts.
      proponent_ids_QxK: proponents per query, best first; negative ids are padding and give
        NaN deltas.
      lr: eta, the final learning rate of training (ignored with ``carry_momentum``, where the
        optimizer's own schedule applies).
      lr_multipliers: step multipliers to sweep; the gradient is computed once per pair.
      precond: the optimizer correction from ``trackstar.correction.preconditioner``, same
        paths as params: arrays ``1 / (sqrt(v_hat) + eps)`` (Adam) and, for Adafactor,
        ``FactoredScale`` leaves; each parameter's ``correction.Scale`` is applied with
        ``apply``, its ``dense()`` elementwise factor (not needed with ``carry_momentum``).
      scale: ``"batch_share"`` (needs ``counted_tokens_per_batch``) or ``"single"``.
      counted_tokens_per_batch: counted tokens in one ordinary training batch
        (``batch_size * (seq_len - 1)``: every position after the first of each window).
      carry_momentum: use ``U(s g) - U(0)`` with the training optimizer instead of the
        preconditioned gradient step.
      optimizer, opt_state: the training optimizer and its checkpointed state
        (``carry_momentum`` only).
      pair_batch: (query, proponent) pairs per vmapped call; trades memory for speed.

    Returns:
      float64 array ``deltas_MxQxK`` of probability differences (not percentages).
    """
    if scale not in SCALES:
        raise TailPatchError(f"unknown tail-patch scale {scale!r}; use one of {SCALES}")
    if scale == "batch_share" and (
        counted_tokens_per_batch is None or counted_tokens_per_batch <= 0
    ):
        raise TailPatchError(
            "scale='batch_share' needs counted_tokens_per_batch > 0 (counted tokens in one "
            "training batch, batch_size * (seq_len - 1)); or use scale='single'"
        )
    if carry_momentum:
        if optimizer is None or opt_state is None:
            raise TailPatchError(
                "carry_momentum=True needs the training optimizer and its opt_state from the "
                "checkpoint (optimizer=..., opt_state=...)"
            )
    else:
        if precond is None:
            raise TailPatchError(
                "precond is required (the optimizer correction per parameter, from "
                "correction.preconditioner); or pass carry_momentum=True with the optimizer"
            )
        _check_precond(params, precond)
    qt = np.asarray(query_tokens_QxT, dtype=np.int32)
    qw = np.asarray(query_weights_QxT, dtype=np.float32)
    ct = np.asarray(cand_tokens_NxS, dtype=np.int32)
    cw = np.asarray(cand_weights_NxS, dtype=np.float32)
    ids = np.asarray(proponent_ids_QxK)
    if qt.ndim != 2 or qt.shape != qw.shape:
        raise TailPatchError(
            f"query tokens {qt.shape} and weights {qw.shape} must be equal 2-D shapes"
        )
    if ct.ndim != 2 or ct.shape != cw.shape:
        raise TailPatchError(
            f"candidate tokens {ct.shape} and weights {cw.shape} must be equal 2-D shapes"
        )
    if ids.ndim != 2 or ids.shape[0] != qt.shape[0]:
        raise TailPatchError(
            f"proponent ids {ids.shape} must be (queries={qt.shape[0]}, K); one row per query"
        )
    if ids.size and ids.max() >= ct.shape[0]:
        raise TailPatchError(
            f"proponent id {int(ids.max())} is out of range for {ct.shape[0]} candidates"
        )
    if pair_batch < 1:
        raise TailPatchError(f"pair_batch must be >= 1, got {pair_batch}")

    n_q, n_k = ids.shape
    mults = np.asarray(lr_multipliers, dtype=np.float32).reshape(-1)
    q_idx, k_idx = np.nonzero(ids >= 0)
    m_idx = ids[q_idx, k_idx]
    if scale == "batch_share":
        scales = np.full(m_idx.shape, 1.0 / float(counted_tokens_per_batch), np.float32)
    else:
        # A proponent with no counted tokens has zero gradient; max() only avoids 0/0.
        scales = (1.0 / np.maximum(cw[m_idx].sum(axis=1), 1.0)).astype(np.float32)

    fn = _pair_fn(apply_fn, bool(carry_momentum), optimizer if carry_momentum else None)
    if carry_momentum:
        zero = jax.tree.map(jnp.zeros_like, params)
        zero_update, _ = jax.jit(optimizer.update)(zero, opt_state, params)
        precond_arg = None
    else:
        zero_update, opt_state, precond_arg = None, None, precond

    out = np.full((mults.size, n_q, n_k), np.nan, dtype=np.float64)
    n_pairs = q_idx.size
    for start in range(0, n_pairs, pair_batch):
        sel = np.arange(start, min(start + pair_batch, n_pairs))
        # Pad to a fixed batch by repeating the first pair, so every call has one shape.
        padded = np.concatenate([sel, np.full(pair_batch - sel.size, sel[0])])
        deltas_PxM = fn(
            params,
            precond_arg,
            opt_state,
            zero_update,
            jnp.float32(lr),
            mults,
            qt[q_idx[padded]],
            qw[q_idx[padded]],
            ct[m_idx[padded]],
            cw[m_idx[padded]],
            scales[padded],
        )
        deltas_PxM = np.asarray(deltas_PxM, dtype=np.float64)[: sel.size]
        out[:, q_idx[sel], k_idx[sel]] = deltas_PxM.T
    return out


def tailpatch_deltas(
    *args: Any, lr: float, lr_multiplier: float = 1.0, **kwargs: Any
) -> np.ndarray:
    """Tail-patch deltas ``deltas_QxK`` at one learning-rate multiplier.

    Same positional and keyword arguments as :func:`tailpatch_sweep`, with one
    ``lr_multiplier`` in place of the sweep's ``lr_multipliers``.
    """
    return tailpatch_sweep(*args, lr=lr, lr_multipliers=(lr_multiplier,), **kwargs)[0]


def tailpatch_at_k(deltas_QxK: np.ndarray, ks: Sequence[int] = (1, 3, 5, 10)) -> dict:
    """Tail-patch@k in percentage points: mean delta over each query's top k, then over queries.

    Returns ``{"tailpatch@k": mean_pp, "tailpatch@k_se": standard_error_pp, ...}`` plus
    ``"n_queries"``. NaN deltas (padding) are left out of a query's mean; queries with no
    proponent in the top k are left out of the average over queries.
    """
    deltas = np.asarray(deltas_QxK, dtype=np.float64)
    if deltas.ndim != 2:
        raise TailPatchError(f"deltas must be 2-D (queries x K), got shape {deltas.shape}")
    out: dict[str, float] = {}
    for k in ks:
        if k > deltas.shape[1]:
            raise TailPatchError(
                f"tailpatch@{k} asked for but only {deltas.shape[1]} proponents per query were "
                "patched; patch at least max(ks) proponents"
            )
        top = deltas[:, :k]
        valid = ~np.isnan(top)
        per_query = np.where(
            valid.any(axis=1), np.nansum(top, axis=1) / np.maximum(valid.sum(axis=1), 1), np.nan
        )
        stats = mean_se(100.0 * per_query)
        out[f"tailpatch@{k}"] = stats["mean"]
        out[f"tailpatch@{k}_se"] = stats["se"]
    out["n_queries"] = int(deltas.shape[0])
    return out


def sweep_table(
    deltas_MxQxK: np.ndarray,
    lr_multipliers: Sequence[float],
    lr: float,
    ks: Sequence[int] = (1, 3, 5, 10),
) -> list[dict]:
    """One row per learning-rate multiplier: ``{"lr_multiplier", "lr", "tailpatch@k", ...}``."""
    deltas = np.asarray(deltas_MxQxK)
    if deltas.ndim != 3 or deltas.shape[0] != len(lr_multipliers):
        raise TailPatchError(
            f"deltas {deltas.shape} must be (multipliers={len(lr_multipliers)}, queries, K)"
        )
    return [
        {"lr_multiplier": float(m), "lr": float(lr) * float(m), **tailpatch_at_k(d, ks)}
        for m, d in zip(lr_multipliers, deltas, strict=True)
    ]
