"""Optimizer second-moment correction ``g / (sqrt(v_hat) + eps)`` (SPEC §2.2).

``preconditioner(opt_state, params, ...)`` returns a pytree with the params' paths whose leaves
are the elementwise factor the gradient is multiplied by:

- Adam / AdamW (optax ``ScaleByAdamState`` anywhere in the state):
  ``1 / (sqrt(nu / (1 - b2^t)) + eps)``, ``t`` the state's step count.
- Adafactor (optax ``FactoredState`` from ``scale_by_factored_rms``): exactly the factor optax
  divides the gradient by, using the stored moments. Factored leaves stay factored
  (``FactoredScale``: a row and a column factor), so a projector can fold them into its
  Kronecker factors; ``dense()`` expands them for tests.
"""

from __future__ import annotations

import hashlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from trackstar.tree import named_leaves, path_name

PyTree = Any

_ADAM_FIELDS = {"count", "mu", "nu"}
_FACTORED_FIELDS = {"count", "v_row", "v_col", "v"}


class CorrectionError(ValueError):
    """An optimizer state that cannot give a correction; the message says how to fix it."""


class PathMismatchError(CorrectionError):
    """Params and optimizer-state moments do not cover the same parameter paths."""


@jax.tree_util.register_pytree_node_class
class FactoredScale:
    """Adafactor's factored scale of one tensor: ``expand(row, d0) * expand(col, d1)``.

    Mirrors optax's ``scale_by_factored_rms``: ``row`` has the tensor's shape without axis
    ``d0`` and ``col`` its shape without axis ``d1``.
    """

    def __init__(self, row: jax.Array, col: jax.Array, d0: int, d1: int):
        self.row, self.col, self.d0, self.d1 = row, col, d0, d1

    def tree_flatten(self):
        return (self.row, self.col), (self.d0, self.d1)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    def dense(self) -> jax.Array:
        """The full elementwise scale, shaped like the parameter."""
        return jnp.expand_dims(self.row, self.d0) * jnp.expand_dims(self.col, self.d1)

    def in_out_factors(self) -> tuple[jax.Array, jax.Array] | None:
        """``(in_N, out_M)`` with ``dense() == outer(in, out)`` in the ``(n_in, n_out)`` view.

        Only 2-D tensors have this form (for higher ranks each factor spans the other axes);
        returns ``None`` otherwise, and callers multiply by ``dense()`` instead.
        """
        if self.row.ndim != 1:
            return None
        # For 2-D, row is indexed by axis d1 (it has d0 removed) and col by axis d0.
        by_axis = {self.d1: self.row, self.d0: self.col}
        return by_axis[0], by_axis[1]


def dense(precond: PyTree) -> PyTree:
    """Expands every ``FactoredScale`` in a preconditioner pytree to a full array."""
    return jax.tree.map(
        lambda s: s.dense() if isinstance(s, FactoredScale) else s,
        precond,
        is_leaf=lambda s: isinstance(s, FactoredScale),
    )


def _field(state: Any, name: str) -> Any:
    return state[name] if isinstance(state, dict) else getattr(state, name)


def _kind(node: Any) -> str | None:
    if isinstance(node, optax.ScaleByAdamState):
        return "adam"
    if isinstance(node, optax.FactoredState):
        return "factored"
    # A state restored without a target (e.g. Orbax into plain dicts) keeps the field names.
    if isinstance(node, dict) and set(node) == _ADAM_FIELDS:
        return "adam"
    if isinstance(node, dict) and set(node) == _FACTORED_FIELDS:
        return "factored"
    return None


def find_moment_states(opt_state: Any) -> list[tuple[str, Any]]:
    """All Adam / Adafactor moment states inside a nested optax state, as ``(kind, state)``."""
    found: list[tuple[str, Any]] = []

    def walk(node: Any) -> None:
        kind = _kind(node)
        if kind is not None:
            found.append((kind, node))
            return
        if isinstance(node, dict):
            for v in node.values():
                walk(v)
        elif isinstance(node, tuple | list):  # also namedtuples (optax chain / inject states)
            for v in node:
                walk(v)

    walk(opt_state)
    return found


def _check_paths(params: PyTree, moments: PyTree, what: str) -> dict[str, Any]:
    want = {p: leaf for p, leaf in named_leaves(params)}
    have = {p: leaf for p, leaf in named_leaves(moments)}
    if set(want) != set(have):
        raise PathMismatchError(
            f"optimizer-state {what} and params cover different parameter paths: "
            f"missing in state {sorted(set(want) - set(have))}, extra in state "
            f"{sorted(set(have) - set(want))}; load the params and opt_state of the same "
            "checkpoint"
        )
    return have


def _count(state: Any) -> int:
    t = int(np.asarray(_field(state, "count")))
    if t < 1:
        raise CorrectionError(
            f"optimizer state has step count {t}; the second moment is undefined before the "
            "first update (use a checkpoint saved after training steps)"
        )
    return t


def preconditioner(
    opt_state: Any, params: PyTree, eps: float | None = None, *, b2: float | None = None
) -> PyTree:
    """The optimizer correction factor, a pytree with the same paths as ``params``.

    Args:
      opt_state: an optax state holding exactly one ``ScaleByAdamState`` (Adam/AdamW) or one
        ``FactoredState`` (Adafactor), at any nesting depth.
      params: the parameters (paths and shapes are checked against the moments).
      eps: Adam's ``eps`` (pass the optimizer's; required for Adam). Unused for Adafactor,
        whose epsilon is already inside the stored moments.
      b2: Adam's ``b2`` for bias correction (required for Adam; the state does not record it).

    Returns:
      Adam: arrays ``1 / (sqrt(nu / (1 - b2^t)) + eps)``. Adafactor: ``FactoredScale`` for
      factored tensors and arrays ``v^-1/2`` for the rest.
    """
    states = find_moment_states(opt_state)
    if len(states) != 1:
        kinds = [k for k, _ in states]
        raise CorrectionError(
            f"expected one Adam or Adafactor moment state in opt_state, found {len(states)} "
            f"({kinds}); pass the state of a single adam/adamw/adafactor optimizer"
        )
    kind, state = states[0]
    if kind == "adam":
        return _adam_preconditioner(state, params, eps, b2)
    return _factored_preconditioner(state, params)


second_moment = preconditioner  # the name docs/design.md uses


def _adam_preconditioner(state: Any, params: PyTree, eps: float | None, b2: float | None):
    if b2 is None or eps is None:
        raise CorrectionError(
            "an Adam state needs the optimizer's b2 (bias correction) and eps: pass "
            "b2=cfg.train.b2, eps=cfg.train.eps"
        )
    if not 0.0 <= b2 < 1.0:
        raise CorrectionError(f"b2 must be in [0, 1), got {b2}")
    nu = _field(state, "nu")
    moments = _check_paths(params, nu, "nu")
    t = _count(state)
    denom_scale = 1.0 / (1.0 - float(b2) ** t)

    def factor(path: str, p: Any) -> jax.Array:
        v = moments[path]
        if np.shape(v) != np.shape(p):
            raise PathMismatchError(
                f"nu for {path!r} has shape {np.shape(v)}, params {np.shape(p)}"
            )
        v_hat = jnp.asarray(v, jnp.float32) * denom_scale
        return 1.0 / (jnp.sqrt(v_hat) + eps)

    return _map_with_path(factor, params)


def _factored_preconditioner(state: Any, params: PyTree):
    _count(state)
    v_rows = _check_paths(params, _field(state, "v_row"), "v_row")
    v_cols = _check_paths(params, _field(state, "v_col"), "v_col")
    vs = _check_paths(params, _field(state, "v"), "v")

    def factor(path: str, p: Any):
        shape = tuple(np.shape(p))
        v = jnp.asarray(vs[path], jnp.float32)
        # optax keeps a full v exactly for the tensors it does not factor.
        if len(shape) < 2 or tuple(v.shape) == shape:
            if tuple(v.shape) != shape:
                raise PathMismatchError(f"v for {path!r} has shape {v.shape}, params {shape}")
            return v**-0.5
        # Same axis choice as optax.scale_by_factored_rms (_factored_dims).
        sorted_dims = np.argsort(shape)
        d1, d0 = int(sorted_dims[-2]), int(sorted_dims[-1])
        v_row = jnp.asarray(v_rows[path], jnp.float32)
        v_col = jnp.asarray(v_cols[path], jnp.float32)
        want_row = tuple(s for i, s in enumerate(shape) if i != d0)
        want_col = tuple(s for i, s in enumerate(shape) if i != d1)
        if tuple(v_row.shape) != want_row or tuple(v_col.shape) != want_col:
            raise PathMismatchError(
                f"factored moments for {path!r} have shapes {v_row.shape}/{v_col.shape}, "
                f"expected {want_row}/{want_col} for params {shape}"
            )
        reduced_d1 = d1 - 1 if d1 > d0 else d1
        row_col_mean = jnp.mean(v_row, axis=reduced_d1, keepdims=True)
        return FactoredScale((v_row / row_col_mean) ** -0.5, v_col**-0.5, d0, d1)

    return _map_with_path(factor, params)


def _map_with_path(fn, tree: PyTree) -> PyTree:
    return jax.tree_util.tree_map_with_path(lambda p, x: fn(path_name(p), x), tree)


def opt_state_fingerprint(opt_state: Any, sample: int = 1024) -> str:
    """A cheap, stable fingerprint of an optimizer state for store metadata.

    Hashes every leaf's path, shape and dtype and the bytes of up to ``sample`` evenly strided
    elements (taken on device, so large states are not copied to the host).
    """
    h = hashlib.sha256()
    for path, leaf in named_leaves(opt_state):
        arr = jnp.asarray(leaf)
        h.update(f"{path}:{arr.shape}:{arr.dtype};".encode())
        flat = arr.reshape(-1)
        stride = max(1, flat.size // sample)
        h.update(np.ascontiguousarray(np.asarray(flat[::stride][:sample])).tobytes())
    return h.hexdigest()[:16]
