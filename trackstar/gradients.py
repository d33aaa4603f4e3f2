"""Output functions and per-example gradient kernels (SPEC §2.1).

Every output function is written as a loss (lower = more confident) over the tokens that count:
``weights[..., t] = 1`` means token ``t`` is predicted from ``logits[..., t - 1, :]``.

The kernels take any model as a pure function ``apply_fn(params, tokens_BxT) -> logits_BxTxV``
over a params pytree, so they work for the project's nnx model and for a researcher's own model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from trackstar.tree import named_leaves, path_name

PyTree = Any
ApplyFn = Callable[[PyTree, jax.Array], jax.Array]

# "train" is the corpus-example name of the same quantity as the query output function "loss".
OUTPUT_FNS = ("train", "loss", "margin", "logit")


class NonFiniteFeatureError(ValueError):
    """A per-example feature contains NaN or inf; the message names the examples."""


def _check_kind(kind: str) -> None:
    if kind not in OUTPUT_FNS:
        raise ValueError(
            f"unknown output_fn {kind!r}; choose one of {', '.join(OUTPUT_FNS)} "
            "(config field featurize.query_output_fn)"
        )


def output_loss(
    logits_BxTxV: jax.Array, tokens_BxT: jax.Array, weights_BxT: jax.Array, kind: str
) -> jax.Array:
    """Per-example output function, summed over counted tokens (SPEC §2.1).

    Works for any leading batch shape (``...`` may be empty). Returns one loss per example:
      - ``"train"`` / ``"loss"``: ``-sum_t w_t log p(y_t)``
      - ``"margin"``: ``-sum_t w_t [log p(y_t) - log(1 - p(y_t))]``
      - ``"logit"``: ``-sum_t w_t z_{y_t}``
    where ``y_t = tokens[t]`` and ``p``/``z`` come from ``logits[t - 1]``.
    """
    _check_kind(kind)
    logits = logits_BxTxV[..., :-1, :].astype(jnp.float32)
    targets = tokens_BxT[..., 1:]
    weights = weights_BxT[..., 1:].astype(jnp.float32)
    z_y = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    if kind == "logit":
        per_token = -z_y
    else:
        log_norm = jax.nn.logsumexp(logits, axis=-1)
        logp_y = z_y - log_norm
        if kind in ("train", "loss"):
            per_token = -logp_y
        else:
            # log(1 - p_y) = logsumexp over the other tokens - logsumexp over all: exact and
            # finite even when p_y rounds to 1, unlike log1p(-exp(logp_y)).
            is_target = jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.bool_)
            log_rest = jax.nn.logsumexp(jnp.where(is_target, -jnp.inf, logits), axis=-1)
            per_token = -(logp_y - (log_rest - log_norm))
    return jnp.sum(weights * per_token, axis=-1)


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
    _check_kind(output_fn)
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
    """
    _check_kind(output_fn)
    leaf_paths = [path for path, _ in named_leaves(projector.params_like)]
    if preconditioner is not None:
        _check_same_paths(leaf_paths, preconditioner)

    def features(params: PyTree, precond: PyTree, tokens_BxT, weights_BxT) -> jax.Array:
        grads = per_example_grads(apply_fn, params, tokens_BxT, weights_BxT, output_fn)
        named_grads = named_leaves(grads)
        _check_grad_paths(leaf_paths, [p for p, _ in named_grads])
        scales = dict(_named_scales(precond)) if precond is not None else {}
        factors = projector.leaf_factors()
        blocks = []
        for path, g in named_grads:
            blocks.append(
                _project_corrected_leaf(projector, path, g, scales.get(path), factors[path])
            )
        return projector.combine(blocks)

    jitted = jax.jit(features)

    def feature_fn(params: PyTree, tokens_BxT: jax.Array, weights_BxT: jax.Array) -> jax.Array:
        return jitted(params, preconditioner, tokens_BxT, weights_BxT)

    feature_fn.jitted = jitted  # exposed for lowering / cost inspection
    return feature_fn


def _named_scales(precond: PyTree) -> list[tuple[str, Any]]:
    # Factored scales are pytree nodes; keep them whole so each path maps to one scale object.
    leaves, _ = jax.tree_util.tree_flatten_with_path(
        precond, is_leaf=lambda x: hasattr(x, "in_out_factors")
    )
    return [(path_name(p), leaf) for p, leaf in leaves]


def _check_same_paths(param_paths: list[str], precond: PyTree) -> None:
    have = {p for p, _ in _named_scales(precond)}
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


def _project_corrected_leaf(
    projector: Any, path: str, g: jax.Array, scale: Any, factors: tuple
) -> jax.Array:
    g = g.astype(jnp.float32)
    if scale is None:
        return projector.project_leaf(path, g, factors=factors)
    if hasattr(scale, "in_out_factors"):
        in_out = scale.in_out_factors() if projector.can_fold else None
        if in_out is not None:
            row_scale, col_scale = in_out
            return projector.project_leaf(
                path, g, row_scale=row_scale, col_scale=col_scale, factors=factors
            )
        scale = scale.dense()
    return projector.project_leaf(path, g * scale.astype(jnp.float32), factors=factors)


def nonfinite_rows(vectors_BxD: Any) -> np.ndarray:
    """Indices of rows holding any NaN or inf (empty when all rows are finite)."""
    v = np.asarray(vectors_BxD)
    return np.flatnonzero(~np.isfinite(v).all(axis=tuple(range(1, v.ndim))))


def check_finite(vectors_BxD: Any, example_ids: Any = None) -> None:
    """Raises ``NonFiniteFeatureError`` naming the examples whose feature is not finite.

    ``example_ids`` (length B) names rows in the message; without it the row indices are used.
    """
    bad = nonfinite_rows(vectors_BxD)
    if bad.size:
        names = [example_ids[i] for i in bad] if example_ids is not None else bad.tolist()
        raise NonFiniteFeatureError(
            f"non-finite feature for {len(names)} example(s): {names[:20]}"
            f"{' ...' if len(names) > 20 else ''}; check these examples (empty weights, "
            "overlong input) and the optimizer state (zero second moments) before rerunning"
        )
