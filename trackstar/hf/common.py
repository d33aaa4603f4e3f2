"""Pieces the Hugging Face families (``gpt2``, ``llama``, ``neox``) share.

- ``GELU_ACTIVATIONS``: Hugging Face activation names computed as transformers' ``ACT2FN``
  does; a family's ``ACTIVATIONS`` table is this plus its own extra names;
- ``rotate_half``: the rotate-half layout of rotary position embeddings;
- ``SpecApply``: an ``NnxApply`` that also holds the family's resolved spec;
- ``nnx_build`` / ``nnx_make_apply`` / ``nnx_abstract_params``: ``build``, ``make_apply`` and
  ``abstract_params`` of a family from a function ``seed -> nnx module`` (the module holds
  its spec as ``.spec``).

Only jax and flax are imported; the family modules import this one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from trackstar.taps import NnxApply

Params = dict[str, Any]

# Hugging Face activation names every family computes the same way (transformers.activations).
GELU_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def rotate_half(x: jax.Array) -> jax.Array:
    """``concat(-x2, x1)`` of the two halves of the last axis."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


class SpecApply(NnxApply):
    """An ``NnxApply`` holding the resolved spec of its model (``repr`` shows it)."""

    def __init__(self, graphdef: Any, spec: Any):
        super().__init__(graphdef)
        self.spec = spec

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec})"


def nnx_build(module_fn: Callable[[int], nnx.Module], apply_cls: type, seed: int) -> tuple:
    """``(apply_cls(graphdef, module.spec), params)`` of ``module_fn(seed)``; ``params`` is the
    ``nnx.to_pure_dict`` of its ``nnx.Param`` state."""
    module = module_fn(seed)
    graphdef, state = nnx.split(module, nnx.Param)
    return apply_cls(graphdef, module.spec), nnx.to_pure_dict(state)


def nnx_make_apply(module_fn: Callable[[int], nnx.Module], apply_cls: type) -> Any:
    """The apply function alone: the module is traced abstractly (no parameter initialized)."""
    module = nnx.eval_shape(lambda: module_fn(0))
    return apply_cls(nnx.split(module, nnx.Param)[0], module.spec)


def nnx_abstract_params(module_fn: Callable[[int], nnx.Module]) -> Params:
    """``jax.ShapeDtypeStruct``s of the module's params (nothing allocated)."""
    state = nnx.split(nnx.eval_shape(lambda: module_fn(0)), nnx.Param)[1]
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(state))
