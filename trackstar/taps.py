"""The model contract of attribution, and the tap contract of the fast path (docs/models.md).

**Every model** is a pure function ``apply_fn(params, tokens_BxT) -> logits_BxTxV`` over a
params pytree (``ApplyFn``): ``tokens_BxT`` integer ids, logits of the next token at every
position, row ``b`` of the output depending on row ``b`` of the input only. That alone is
enough for attribution: ``trackstar.gradients`` takes per-example gradients with
``jax.vmap(jax.grad(...))`` (the reference path, ``make_feature_fn(..., fast=False)``).

**The fast path** (``trackstar.gradients.activation_features``: one batched backward pass
instead of one per example) needs one more method (``TappedApplyFn``)::

    apply_fn.tapped(params, tokens_BxT, tap) -> logits_BxTxV

It computes what ``apply_fn(params, tokens_BxT)`` computes, but hands every parameterized op to
``tap(kind, path, x, y) -> y'`` and carries on with ``y'`` in place of ``y``. ``path`` is the
op's parameter path prefix in ``params`` (keys joined by ``/`` as ``trackstar.tree.path_name``
writes them, e.g. ``"blocks/0/attn/qkv"``), and ``kind`` one of ``TAP_KINDS``:

- ``"dense"``: ``y = x @ params[path]["kernel"] + params[path]["bias"]``; ``x`` is
  ``... x n_in``, the kernel ``n_in x n_out``, ``y`` ``... x n_out``.
- ``"embed"``: ``y = params[path]["embedding"][x]``; ``x`` holds integer ids, the table is
  ``n_ids x width``.
- ``"scale_shift"``: ``y = x * params[path]["scale"] + params[path]["bias"]`` elementwise over
  the last axis; for a norm ``x`` is the *normalized* input (LayerNorm:
  ``(h - mean) / sqrt(var + eps)``, RMSNorm: ``h / sqrt(mean(h^2) + eps)``), not ``h``.
- ``"unembed"``: ``y = x @ params[path]["embedding"].T``; the transposed use of an embedding
  table as the output head (tied weights, GPT-2's ``lm_head``): ``x`` is the hidden state
  ``... x width``, ``y`` the logits ``... x n_ids``. There is no bias leaf.

Rules every ``tapped`` must keep (``trackstar.gradients`` checks the ones it can):

1. ``x`` and ``y`` have leading axes that broadcast to ``(B, T)``, the positions of
   ``tokens_BxT`` (``(B, T, n)``, or ``(T, n)`` for a position embedding shared by all rows).
   ``y'`` may come back broadcast to ``(B, T, n)``; the model must accept that.
2. Every parameter leaf is covered: it is the ``kernel``/``bias``, ``embedding`` or
   ``scale``/``bias`` of some tapped op. A ``bias`` (or ``scale``) leaf may be absent (Llama-style
   layers have none). A leaf no tap covers is an error that names it.
3. Taps are called at trace time, in the same order with the same kinds and paths on every
   trace (the model is traced once abstractly to discover them, then differentiated).
4. A parameter used twice (tied weights) is tapped once per use and the contributions add:
   twice with the same kind, or, for an embedding table that is also the output head, as
   ``"embed"`` where ids are looked up and ``"unembed"`` where ``h @ embedding.T`` is taken.

Helpers for a model's forward pass route its layers through the active tap: ``emit`` (any
op, named by its nnx module or by its path string), ``dense``, ``embed`` and ``norm`` (nnx
``Linear``, ``Embed``, ``LayerNorm``/``RMSNorm``), ``unembed`` (an nnx ``Embed`` as the output
head), ``layer_norm_input``/``rms_norm_input`` (the ``x`` of a norm written by hand). With no
tap installed each helper is the plain op, so the same forward code serves ``apply_fn`` and
``apply_fn.tapped``. ``NnxApply`` is a ready ``TappedApplyFn`` for any ``flax.nnx`` module that
uses them; ``tapping`` installs a tap for a model written as plain functions.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
from flax import nnx

PyTree = Any
# tap(kind, path, x, y) -> y'
Tap = Callable[[str, str, jax.Array, jax.Array], jax.Array]

# The kinds of parameterized op a tap sees (module docstring); trackstar.gradients handles each.
TAP_KINDS = ("dense", "embed", "scale_shift", "unembed")


@runtime_checkable
class ApplyFn(Protocol):
    """Any model: ``apply_fn(params, tokens_BxT) -> logits_BxTxV``, pure over ``params``."""

    def __call__(self, params: PyTree, tokens_BxT: jax.Array) -> jax.Array: ...


@runtime_checkable
class TappedApplyFn(ApplyFn, Protocol):
    """A model the fast path can run: ``ApplyFn`` plus ``tapped`` (module docstring)."""

    def tapped(self, params: PyTree, tokens_BxT: jax.Array, tap: Tap) -> jax.Array: ...


def has_taps(apply_fn: Any) -> bool:
    """Whether ``apply_fn`` offers the fast path (a callable ``tapped`` attribute)."""
    return callable(getattr(apply_fn, "tapped", None))


# ----------------------------------------------------------------------------- routing

# The tap of the trace in progress, as (kind, layer, x, y) -> y' with ``layer`` an nnx module or a
# path string; None (the default) outside ``tapping``.
_ACTIVE: contextvars.ContextVar[Callable | None] = contextvars.ContextVar(
    "trackstar_tap", default=None
)


def active() -> bool:
    """Whether a tap is installed (a model may skip work only the tap needs when not)."""
    return _ACTIVE.get() is not None


def emit(kind: str, layer: nnx.Module | str, x: jax.Array, y: jax.Array) -> jax.Array:
    """Offers one parameterized op to the active tap and returns its ``y'`` (``y`` if none).

    ``layer`` is the op's nnx module (``tapping(..., module=root)`` turns it into its path) or its
    path string (plain-function models).
    """
    if kind not in TAP_KINDS:
        raise ValueError(f"unknown tap kind {kind!r}; use one of {TAP_KINDS} (trackstar.taps)")
    tap = _ACTIVE.get()
    return y if tap is None else tap(kind, layer, x, y)


@contextlib.contextmanager
def tapping(tap: Tap, module: nnx.Module | None = None) -> Iterator[None]:
    """Installs ``tap`` for the ops ``emit`` sees inside the ``with`` block.

    With ``module`` (the root of an nnx model) a layer given as an nnx module is named by its
    path below ``module`` (the path of its parameters in ``nnx.to_pure_dict``); path strings
    pass through unchanged.
    """
    names: dict[int, str] = {}
    if module is not None:
        names = {
            id(node): "/".join(str(k) for k in path)
            for path, node in nnx.iter_graph(module)
            if isinstance(node, nnx.Module)
        }

    def named(kind: str, layer: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        if isinstance(layer, str):
            return tap(kind, layer, x, y)
        if id(layer) not in names:
            raise ValueError(
                f"a {type(layer).__name__} emitted a {kind!r} tap but is not part of the tapped "
                "module; pass the model's root module to tapping(), or name the op by its path"
            )
        return tap(kind, names[id(layer)], x, y)

    token = _ACTIVE.set(named)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def dense(layer: nnx.Linear, x: jax.Array) -> jax.Array:
    """``layer(x)`` offered to the tap as ``"dense"``."""
    return emit("dense", layer, x, layer(x))


def embed(layer: nnx.Embed, ids: jax.Array) -> jax.Array:
    """``layer(ids)`` offered to the tap as ``"embed"``."""
    return emit("embed", layer, ids, layer(ids))


def unembed(layer: nnx.Embed, h: jax.Array) -> jax.Array:
    """``h @ layer.embedding.T`` (``layer.attend(h)``, a tied output head) as ``"unembed"``."""
    return emit("unembed", layer, h, layer.attend(h))


def layer_norm_input(h: jax.Array, epsilon: float) -> jax.Array:
    """The ``x`` of a LayerNorm's ``"scale_shift"``: ``(h - mean) / sqrt(var + eps)`` (float32)."""
    h32 = h.astype(jnp.float32)
    mean = jnp.mean(h32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(h32 - mean), axis=-1, keepdims=True)
    return (h32 - mean) * jax.lax.rsqrt(var + epsilon)


def rms_norm_input(h: jax.Array, epsilon: float) -> jax.Array:
    """The ``x`` of an RMSNorm's ``"scale_shift"``: ``h / sqrt(mean(h^2) + eps)`` (float32)."""
    h32 = h.astype(jnp.float32)
    return h32 * jax.lax.rsqrt(jnp.mean(jnp.square(h32), axis=-1, keepdims=True) + epsilon)


def norm(layer: nnx.LayerNorm | nnx.RMSNorm, h: jax.Array) -> jax.Array:
    """``layer(h)`` offered to the tap as ``"scale_shift"`` of the normalized input.

    Supports ``nnx.LayerNorm`` and ``nnx.RMSNorm`` normalizing over the last axis.
    """
    y = layer(h)
    if not active():  # the normalized input is only needed by a tap
        return y
    axes = layer.reduction_axes
    axes = tuple(axes) if isinstance(axes, tuple | list) else (axes,)
    if axes not in ((-1,), (h.ndim - 1,)):
        raise ValueError("taps.norm supports norms over the last axis only")
    if isinstance(layer, nnx.RMSNorm):
        x = rms_norm_input(h, layer.epsilon)
    elif isinstance(layer, nnx.LayerNorm):
        x = layer_norm_input(h, layer.epsilon)
    else:
        raise TypeError(f"taps.norm takes nnx.LayerNorm or nnx.RMSNorm, got {type(layer)}")
    return emit("scale_shift", layer, x, y)


class NnxApply:
    """The pure apply function of a ``flax.nnx`` model: ``(params, tokens_BxT) -> logits``.

    Holds only the module's graph definition; each call rebuilds the module from ``params``
    (``nnx.to_pure_dict`` of its ``nnx.Param`` state), so it is pure and jittable. ``tapped``
    runs the same module under ``tapping``, so a model whose layers go through ``dense``,
    ``embed``, ``norm`` or ``emit`` gets the fast path with no further code.
    """

    def __init__(self, graphdef: Any):
        self.graphdef = graphdef

    def module(self, params: PyTree) -> nnx.Module:
        """Rebuilds the nnx module holding ``params``."""
        return nnx.merge(self.graphdef, nnx.State(params))

    def __call__(self, params: PyTree, tokens_BxT: jax.Array) -> jax.Array:
        return self.module(params)(tokens_BxT)

    def tapped(self, params: PyTree, tokens_BxT: jax.Array, tap: Tap) -> jax.Array:
        """Like ``__call__``, with every op the module emits handed to ``tap`` (module doc)."""
        module = self.module(params)
        with tapping(tap, module):
            return module(tokens_BxT)
