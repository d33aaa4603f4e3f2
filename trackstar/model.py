"""What every model family shares: named sizes, the tensor-parallel rules of the GPT-2 paths, and
the evaluation functions over any ``apply_fn``.

The library sees a model only as a pure function over a plain nested-dict params pytree
(``docs/design.md``): ``apply_fn(params, tokens_BxT) -> logits_BxTxV``, built by a model family
(``trackstar.families``; ``docs/models.md``). The project's demo model is a small configuration of
the ``"gpt2"`` family (``trackstar.hf.gpt2``: ``model.size = "small"``, an untied head), so one
implementation serves the demo, randomly initialized runs and imported GPT-2 checkpoints.

Parameter paths are stable and meaningful (``embed/embedding``, ``blocks/0/attn/qkv/kernel``,
``unembed/kernel``, ...); the projection, the optimizer correction and the sharding rules
(``TENSOR_RULES``) key on them.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from trackstar import losses

Params = dict[str, Any]

# Named sizes (``model.size``) of the families that take them (gpt2); explicit config fields > 0
# override them.
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(d_model=32, n_layers=1, n_heads=2, d_ff=64, max_len=48),
    "small": dict(d_model=128, n_layers=2, n_heads=4, d_ff=512, max_len=64),
    "base": dict(d_model=256, n_layers=4, n_heads=8, d_ff=1024, max_len=128),
}


MODEL = "model"  # trackstar.sharding.MODEL, the mesh axis of parameters (sharding imports us)
# Megatron-style tensor-parallel rules for the GPT-2 paths (the "tensor" preset of
# trackstar.sharding; the gpt2 family registers them): column-parallel in-projections,
# row-parallel out-projections, so the forward pass needs only activation collectives and
# per-example gradients inherit the parameter layout.
TENSOR_RULES: tuple[tuple[str, Any], ...] = (
    (r"(^|/)(embed|pos_embed)/embedding$", (None, MODEL)),
    (r"(^|/)(qkv|fc_in)/kernel$", (None, MODEL)),
    (r"(^|/)(qkv|fc_in)/bias$", (MODEL,)),
    (r"(^|/)(out|fc_out)/kernel$", (MODEL, None)),
    (r"(^|/)unembed/kernel$", (None, MODEL)),
    (r"(^|/)unembed/bias$", (MODEL,)),
    (r".*", ()),  # norms, out-projection biases: replicated
)


class ModelConfigError(ValueError):
    """A model that cannot be built as configured; the message says which field to change."""


def count_params(params: Params) -> int:
    """Total number of scalars in a params tree."""
    return sum(int(x.size) for x in jax.tree.leaves(params))


@functools.partial(jax.jit, static_argnums=0)
def target_logprob(apply_fn, params: Params, tokens_BxT, weights_BxT) -> jax.Array:
    """Sum over weighted tokens of log p(token | prefix), per example: float32[B].

    ``weights[b, t] = 1`` marks token t as a target predicted from ``tokens[b, :t]``
    (``trackstar.losses.sequence_logprob`` of the model's logits).
    """
    return losses.sequence_logprob(apply_fn(params, tokens_BxT), tokens_BxT, weights_BxT)


@functools.partial(jax.jit, static_argnums=0)
def greedy_answer(apply_fn, params: Params, tokens_BxT, weights_BxT) -> tuple[jax.Array, jax.Array]:
    """The model's own answer at the weighted (target) positions, teacher-forced.

    Returns ``(pred_BxT int32, logprob_B float32)``: ``pred[b, t]`` is the argmax token
    predicted for position t from ``tokens[b, :t]`` (0 at t = 0), and ``logprob`` the sum over
    weighted positions of log p(pred | prefix), the model's confidence in its answer.
    """
    logits_BxTxV = apply_fn(params, tokens_BxT)[:, :-1]
    logp_BxTxV = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
    pred_BxT = jnp.argmax(logp_BxTxV, axis=-1)
    best_BxT = jnp.max(logp_BxTxV, axis=-1)
    w_BxT = weights_BxT[:, 1:].astype(jnp.float32)
    pred_BxT = jnp.pad(pred_BxT, ((0, 0), (1, 0))).astype(jnp.int32)
    return pred_BxT, jnp.sum(best_BxT * w_BxT, axis=-1)


@functools.partial(jax.jit, static_argnums=0)
def greedy_correct(apply_fn, params: Params, tokens_BxT, weights_BxT) -> jax.Array:
    """Whether greedy decoding after the prompt reproduces every target token: bool[B].

    Teacher-forced argmax equals greedy decoding here: if every weighted position's argmax is
    its target, greedy decoding walks through exactly the same prefixes. Examples without any
    weighted token count as correct (vacuously); callers should not pass them.
    """
    logits_BxTxV = apply_fn(params, tokens_BxT)
    pred_BxT = jnp.argmax(logits_BxTxV[:, :-1], axis=-1)
    hit_BxT = (pred_BxT == tokens_BxT[:, 1:]) | (weights_BxT[:, 1:] == 0)
    return jnp.all(hit_BxT, axis=-1)
