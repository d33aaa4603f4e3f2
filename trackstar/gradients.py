"""Per-example gradient kernels of the output functions (docs/method.md, Output functions).

The output functions themselves (and every token log-probability) live in ``trackstar.losses``;
``OUTPUT_FNS`` and ``output_loss`` are re-exported here. ``output_fn`` is a name in
``losses.OUTPUT_FNS`` or ``losses.TRAIN_OUTPUT_FN`` (the training examples' stored label for
``"loss"``).

The kernels take any model as a pure function ``apply_fn(params, tokens_BxT) -> logits_BxTxV``
over a params pytree, so they work for the project's nnx model and for a researcher's own model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from trackstar import taps
from trackstar.correction import named_scales
from trackstar.losses import OUTPUT_FNS as OUTPUT_FNS  # re-exported
from trackstar.losses import output_loss, resolve_output_fn
from trackstar.projection import fold_scales
from trackstar.tree import named_leaves

PyTree = Any
ApplyFn = Callable[[PyTree, jax.Array], jax.Array]


def per_example_grads(
    apply_fn: ApplyFn,
    params: PyTree,
    tokens_BxT: jax.Array,
    weights_BxT: jax.Array,
    output_fn: str,
) -> PyTree:
    """Gradients of the output function for each example, w.r.t. all parameters.

    Returns a pytree shaped like ``params`` with a leading batch axis ``B`` on every leaf. Each
    example runs through ``apply_fn`` at batch size 1 inside ``jax.vmap``, so other rows of the
    batch (including padding rows with zero weights) cannot influence it.
    """
    resolve_output_fn(output_fn)
    if tokens_BxT.ndim != 2 or tokens_BxT.shape != weights_BxT.shape:
        raise ValueError(
            f"tokens and weights must both be B x T, got {tokens_BxT.shape} and "
            f"{weights_BxT.shape}; batch single examples with [None]"
        )

    def example_loss(p: PyTree, tokens_T: jax.Array, weights_T: jax.Array) -> jax.Array:
        logits_1xTxV = apply_fn(p, tokens_T[None])
        return output_loss(logits_1xTxV, tokens_T[None], weights_T[None], output_fn)[0]

    return jax.vmap(jax.grad(example_loss), in_axes=(None, 0, 0))(params, tokens_BxT, weights_BxT)


def make_feature_fn(
    apply_fn: ApplyFn,
    output_fn: str,
    projector: Any,
    preconditioner: PyTree | None = None,
    *,
    fast: bool | None = None,
) -> Callable[[PyTree, jax.Array, jax.Array], jax.Array]:
    """Builds the jitted per-example feature map ``fn(params, tokens_BxT, weights_BxT)``.

    The result is ``vectors_BxD`` (float32) ``= P(g * precond)`` with ``g`` the per-example
    gradient of ``output_fn``, ``precond`` the pytree from ``trackstar.correction.preconditioner``
    (``None``: no optimizer correction) and ``P`` a ``trackstar.projection.Projector``.

    Gradients are consumed leaf by leaf: each leaf is corrected and projected on its own and the
    blocks are combined, so nothing needs all corrected gradients at once. Factored (Adafactor)
    scales are folded into the projection factors instead of materialized where the projector
    supports it. The preconditioner is a jit argument, not a baked-in constant, so large
    optimizer states do not bloat the compiled program.

    ``fast``: ``None`` (default) uses ``activation_features`` when ``apply_fn`` has a
    ``tapped`` method (the project's model does) and the vmap-of-grad reference otherwise;
    ``True`` requires the fast path, ``False`` forces the reference. Both give the same vectors.
    """
    resolve_output_fn(output_fn)
    leaf_paths = [path for path, _ in named_leaves(projector.params_like)]
    if preconditioner is not None:
        _check_same_paths(leaf_paths, preconditioner)
    has_taps = taps.has_taps(apply_fn)
    if fast and not has_taps:
        raise ValueError(
            "fast=True needs an apply_fn with a tapped(params, tokens, tap) method (the tap "
            "contract of trackstar.taps, docs/models.md); pass fast=None to fall back to the "
            "reference path"
        )
    use_fast = has_taps if fast is None else bool(fast)

    def features(params: PyTree, precond: PyTree, tokens_BxT, weights_BxT) -> jax.Array:
        if use_fast:
            return activation_features(
                apply_fn, params, precond, tokens_BxT, weights_BxT, output_fn, projector
            )
        grads = per_example_grads(apply_fn, params, tokens_BxT, weights_BxT, output_fn)
        named_grads = named_leaves(grads)
        _check_grad_paths(leaf_paths, [p for p, _ in named_grads])
        scales = dict(named_scales(precond)) if precond is not None else {}
        factors = projector.leaf_factors()
        blocks = []
        for path, g in named_grads:
            blocks.append(projector.project_corrected(path, g, scales.get(path), factors[path]))
        return projector.combine(blocks)

    jitted = jax.jit(features)

    def feature_fn(params: PyTree, tokens_BxT: jax.Array, weights_BxT: jax.Array) -> jax.Array:
        return jitted(params, preconditioner, tokens_BxT, weights_BxT)

    feature_fn.jitted = jitted  # exposed for lowering / cost inspection
    feature_fn.fast = use_fast
    return feature_fn


def activation_features(
    apply_fn: Any,
    params: PyTree,
    precond: PyTree | None,
    tokens_BxT: jax.Array,
    weights_BxT: jax.Array,
    output_fn: str,
    projector: Any,
) -> jax.Array:
    """``P(g * precond)`` per example from layer inputs and output-gradients (``B x D``).

    Equals the reference (vmap of grad, then correct and project) without a per-example
    backward pass: one batched forward/backward of the summed per-example losses w.r.t. a zero
    perturbation added to every parameterized op's output (``apply_fn.tapped``) yields each
    example's output-gradients ``delta_t``; the inputs ``x_t`` come from the same forward. Rows
    of the batch never mix (the model is row-independent), so each row's ``delta`` is its own.
    Per leaf, with ``G = sum_t x_t delta_t^T``:

    - dense kernel, no or factored (Adafactor) V: ``A'^T G B' = sum_t (A'^T x_t)(B'^T delta_t)^T``
      with the scales folded into ``A' = diag(r) A`` and ``B' = diag(c) B``; ``G`` never exists.
      Elementwise (Adam) V: ``G`` is materialized for this one layer (``B x n_in x n_out``),
      corrected and projected, so memory is O(batch x largest layer), never O(batch x |theta|).
      Whichever of the two is cheaper in FLOPs is used where both are exact.
    - embedding (``x`` = ids): ``G`` has one row per token, so any V is applied per token by
      gathering its rows: ``sum_t A[id_t]^T ((V[id_t] * delta_t) B)`` (scatter-add in dense
      projection mode).
    - tied output head (``"unembed"``, ``y = x @ E.T``): ``G^T = sum_t delta_t x_t^T`` is treated
      as a dense kernel of shape ``n_ids x width`` (folded or materialized as above) and added
      to the table's ``"embed"`` block; corrections are linear, so the parts add exactly.
    - biases and norm scales: the per-example vector (``sum_t delta_t``, ``sum_t x_t * delta_t``)
      is small and is corrected and projected directly.

    ``apply_fn.tapped(params, tokens_BxT, tap)`` must call ``tap(kind, path, x, y) -> y'`` for
    every parameterized op (``trackstar.taps`` documents the contract and the kinds), with
    ``x``/``y`` whose leading axes broadcast to ``(B, T)``; every parameter must be covered.
    """
    resolve_output_fn(output_fn)
    batch, seq = tokens_BxT.shape
    calls = _discover_taps(apply_fn, params, tokens_BxT)
    leaf_set = set(projector.paths)

    def total_loss(perturb: list[jax.Array]) -> tuple[jax.Array, list[jax.Array]]:
        inputs: list[jax.Array] = []

        def tap(kind: str, path: str, x: jax.Array, y: jax.Array) -> jax.Array:
            inputs.append(x)
            return y + perturb[len(inputs) - 1].astype(y.dtype)

        logits = apply_fn.tapped(params, tokens_BxT, tap)
        return jnp.sum(output_loss(logits, tokens_BxT, weights_BxT, output_fn)), inputs

    zeros = [jnp.zeros((batch, seq, n_out), jnp.float32) for _, _, n_out in calls]
    deltas, inputs = jax.grad(total_loss, has_aux=True)(zeros)

    scales = dict(named_scales(precond)) if precond is not None else {}
    factors = projector.leaf_factors()
    blocks: dict[str, jax.Array] = {}

    def add(path: str, block: jax.Array) -> None:
        blocks[path] = block if path not in blocks else blocks[path] + block

    def vector(path: str, g_BxN: jax.Array) -> None:
        if path in leaf_set:
            add(
                path,
                projector.project_corrected(path, g_BxN, scales.get(path), factors[path]),
            )

    def kernel_use(name: str, in_BxTxI: jax.Array, out_BxTxO: jax.Array, last: Any) -> Any:
        """Adds one matrix use ``y = in @ W`` of parameter ``name`` (W: in x out); returns the
        new ordering token."""
        if _materializes(projector, name, seq, scales.get(name)):
            # Order the layers that materialize G: without the barrier XLA may schedule all
            # of them at once and hold B x |theta| floats, the cost this path exists to avoid.
            (in_BxTxI, out_BxTxO), _ = jax.lax.optimization_barrier(((in_BxTxI, out_BxTxO), last))
        block = _kernel_block(projector, name, in_BxTxI, out_BxTxO, scales.get(name), factors[name])
        add(name, block)
        return block[0, 0]

    last = jnp.zeros((), jnp.float32)
    for (kind, path, _), x, d in zip(calls, inputs, deltas, strict=True):
        d_BxTxO = d.astype(jnp.float32)
        if kind == "dense":
            x_BxTxI = jnp.broadcast_to(x, (batch, seq, x.shape[-1])).astype(jnp.float32)
            last = kernel_use(f"{path}/kernel", x_BxTxI, d_BxTxO, last)
            vector(f"{path}/bias", jnp.sum(d_BxTxO, axis=1))
        elif kind == "embed":
            ids_BxT = jnp.broadcast_to(x, (batch, seq))
            table = f"{path}/embedding"
            if projector.mode == "dense":  # scatter-adds a B x V x D gradient: order it too
                (ids_BxT, d_BxTxO), _ = jax.lax.optimization_barrier(((ids_BxT, d_BxTxO), last))
            block = _embed_block(
                projector, table, ids_BxT, d_BxTxO, scales.get(table), factors[table]
            )
            add(table, block)
            last = block[0, 0]
        elif kind == "unembed":
            # h @ E.T: E's gradient from this use is sum_t delta_t x_t^T (n_ids x width), a dense
            # kernel's with input and output-gradient swapped; it adds to the table's "embed"
            # contribution. The correction is linear in the gradient, so each use's part is
            # corrected and projected on its own and the sum is the corrected, projected sum.
            x_BxTxD = jnp.broadcast_to(x, (batch, seq, x.shape[-1])).astype(jnp.float32)
            last = kernel_use(f"{path}/embedding", d_BxTxO, x_BxTxD, last)
        elif kind == "scale_shift":
            xhat_BxTxO = jnp.broadcast_to(x, d_BxTxO.shape).astype(jnp.float32)
            vector(f"{path}/scale", jnp.sum(xhat_BxTxO * d_BxTxO, axis=1))
            vector(f"{path}/bias", jnp.sum(d_BxTxO, axis=1))
        else:
            raise ValueError(f"unknown tap kind {kind!r} at {path!r}; see trackstar.taps")
    missing = [p for p in projector.paths if p not in blocks]
    if missing:
        raise ValueError(
            f"the model's taps do not cover parameters {missing[:10]}; route every "
            "parameterized op through the tap, or use make_feature_fn(..., fast=False)"
        )
    return projector.combine([blocks[p] for p in projector.paths])


def _discover_taps(apply_fn: Any, params: PyTree, tokens_BxT: jax.Array) -> list[tuple]:
    """``[(kind, path, n_out), ...]`` in call order, from one abstract trace of the model."""
    calls: list[tuple] = []

    def record(kind: str, path: str, x: jax.Array, y: jax.Array) -> jax.Array:
        if kind not in taps.TAP_KINDS:
            raise ValueError(
                f"the model tapped {path!r} as {kind!r}; the tap kinds are {taps.TAP_KINDS} "
                "(trackstar.taps)"
            )
        calls.append((kind, path, int(y.shape[-1])))
        return y

    jax.eval_shape(lambda p, t: apply_fn.tapped(p, t, record), params, tokens_BxT)
    return calls


def _materializes(projector: Any, path: str, seq: int, scale: Any) -> bool:
    """Whether a dense kernel's corrected gradient must (or had better) be materialized.

    Folding needs a Kronecker projection and no V or a factored V; where both are exact, the
    cheaper in FLOPs per example wins.
    """
    if projector.mode == "dense":
        return True
    if scale is not None and scale.in_out_factors() is None:
        return True
    n_in, n_out = projector.shapes[path]
    k_in, k_out = projector.k_in, projector.k_out
    folded_cost = seq * (n_in * k_in + n_out * k_out + k_in * k_out)
    dense_cost = seq * n_in * n_out + min(
        n_in * n_out * k_out + n_in * k_in * k_out, n_in * n_out * k_in + n_out * k_in * k_out
    )
    return folded_cost > dense_cost


def _kernel_block(
    projector: Any, path: str, x_BxTxI: jax.Array, d_BxTxO: jax.Array, scale: Any, factors: tuple
) -> jax.Array:
    """Projected, corrected ``sum_t x_t d_t^T`` of one dense kernel (see activation_features)."""
    batch, seq, n_in = x_BxTxI.shape
    n_out = d_BxTxO.shape[-1]
    if (n_in, n_out) != tuple(projector.shapes[path]):
        raise ValueError(
            f"tap input/output widths {(n_in, n_out)} do not match kernel {path!r} of shape "
            f"{projector.shapes[path]}"
        )
    if not _materializes(projector, path, seq, scale):
        k_in, k_out = projector.k_in, projector.k_out
        row, col = scale.in_out_factors() if scale is not None else (None, None)
        a, b = fold_scales(factors, row, col)
        xa_BxTxK = jnp.einsum("bti,ik->btk", x_BxTxI, a)
        db_BxTxL = jnp.einsum("bto,ol->btl", d_BxTxO, b)
        return jnp.einsum("btk,btl->bkl", xa_BxTxK, db_BxTxL).reshape(batch, k_in * k_out)
    g_BxIxO = jnp.einsum("bti,bto->bio", x_BxTxI, d_BxTxO)
    return projector.project_corrected(path, g_BxIxO, scale, factors)


def _embed_block(
    projector: Any, path: str, ids_BxT: jax.Array, d_BxTxD: jax.Array, scale: Any, factors: tuple
) -> jax.Array:
    """Projected, corrected gradient of an embedding table gathered at ``ids``."""
    batch, seq, width = d_BxTxD.shape
    shape = tuple(projector.shapes[path])
    if len(shape) != 2 or shape[1] != width:
        raise ValueError(f"embedding {path!r} has shape {shape}, tap output width {width}")
    if scale is not None:
        # The gradient's row id_t is delta_t, so any elementwise V applies per token.
        d_BxTxD = d_BxTxD * scale.dense().astype(jnp.float32)[ids_BxT]
    if projector.mode == "dense":
        g_BxVxD = jax.vmap(lambda i, v: jnp.zeros(shape, jnp.float32).at[i].add(v))(
            ids_BxT, d_BxTxD
        )
        return projector.project_leaf(path, g_BxVxD, factors=factors)
    a, b = factors
    db_BxTxL = jnp.einsum("btd,dl->btl", d_BxTxD, b)
    return jnp.einsum("btk,btl->bkl", a[ids_BxT], db_BxTxL).reshape(batch, -1)


def _check_same_paths(param_paths: list[str], precond: PyTree) -> None:
    have = {p for p, _ in named_scales(precond)}
    want = set(param_paths)
    if have != want:
        raise ValueError(
            "preconditioner paths do not match the projector's parameters: "
            f"missing {sorted(want - have)}, extra {sorted(have - want)}; build both from the "
            "same params"
        )


def _check_grad_paths(param_paths: list[str], grad_paths: list[str]) -> None:
    if param_paths != grad_paths:
        missing = sorted(set(param_paths) - set(grad_paths))
        extra = sorted(set(grad_paths) - set(param_paths))
        raise ValueError(
            "the params passed to the feature function do not match the projector's params: "
            f"missing {missing}, extra {extra}; build the Projector from these params"
        )
