"""Decoder-only pre-norm Transformer language model in ``flax.nnx``.

The rest of the library sees the model only as a pure function over a plain nested-dict params
pytree (``docs/design.md``): ``apply_fn(params, tokens_BxT) -> logits_BxTxV``. Every parameter is
a matrix or a vector with a stable, meaningful path (``embed/embedding``,
``blocks/0/attn/qkv/kernel``, ``unembed/kernel``, ...), which the projection, the optimizer
correction and the sharding rules (``TENSOR_RULES``) key on.

This is the ``"transformer"`` model family (``trackstar.families``; ``docs/models.md``): its
layers go through ``trackstar.taps``, so ``LMApply.tapped`` gives the fast per-example path.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from trackstar import losses
from trackstar.taps import NnxApply, Tap, dense, embed, norm

Params = dict[str, Any]

# Named sizes; explicit config fields > 0 override them.
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(d_model=32, n_layers=1, n_heads=2, d_ff=64, max_len=48),
    "small": dict(d_model=128, n_layers=2, n_heads=4, d_ff=512, max_len=64),
    "base": dict(d_model=256, n_layers=4, n_heads=8, d_ff=1024, max_len=128),
}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


MODEL = "model"  # trackstar.sharding.MODEL, the mesh axis of parameters (sharding imports us)
# Megatron-style tensor-parallel rules for these paths (the "tensor" preset of trackstar.sharding;
# the model family registers them): column-parallel in-projections, row-parallel out-projections,
# so the forward pass needs only activation collectives and per-example gradients inherit the
# parameter layout.
TENSOR_RULES: tuple[tuple[str, Any], ...] = (
    (r"(^|/)(embed|pos_embed)/embedding$", (None, MODEL)),
    (r"(^|/)(qkv|fc_in)/kernel$", (None, MODEL)),
    (r"(^|/)(qkv|fc_in)/bias$", (MODEL,)),
    (r"(^|/)(out|fc_out)/kernel$", (MODEL, None)),
    (r"(^|/)unembed/kernel$", (None, MODEL)),
    (r"(^|/)unembed/bias$", (MODEL,)),
    (r".*", ()),  # norms, out-projection biases: replicated
)


FAMILY = "transformer"  # this model's name in trackstar.families.MODEL_FAMILIES


class ModelConfigError(ValueError):
    """A model size that cannot be built; the message says which field to change."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Resolved model sizes (preset merged with explicit overrides), all validated."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    max_len: int
    dtype: str = "float32"

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


def resolve_spec(cfg_model: ml_collections.ConfigDict | dict, vocab_size: int) -> ModelSpec:
    """Merges ``cfg.model.size``'s preset with explicit fields (> 0) and checks the result.

    Raises ``ModelConfigError`` before any work for unknown presets, non-positive sizes,
    ``d_model % n_heads != 0`` or an unknown dtype.
    """
    get = cfg_model.get
    size = get("size", "small")
    if size not in SIZES:
        raise ModelConfigError(
            f"unknown model size {size!r}; set model.size to one of {sorted(SIZES)}"
        )
    sizes = dict(SIZES[size])
    for name in sizes:
        value = get(name, 0)
        if value is not None and int(value) > 0:
            sizes[name] = int(value)
        elif value is not None and int(value) < 0:
            raise ModelConfigError(f"model.{name} = {value} is negative; use > 0 (or 0 = preset)")
    dtype = get("dtype", "float32")
    if dtype not in _DTYPES:
        raise ModelConfigError(f"model.dtype = {dtype!r}; use one of {sorted(_DTYPES)}")
    if int(vocab_size) < 4:
        raise ModelConfigError(
            f"vocab_size = {vocab_size} is too small (PAD, BOS, EOS, UNK alone need 4); "
            "check the tokenizer"
        )
    if sizes["d_model"] % sizes["n_heads"] != 0:
        raise ModelConfigError(
            f"model.d_model = {sizes['d_model']} is not divisible by model.n_heads = "
            f"{sizes['n_heads']}; pick n_heads dividing d_model"
        )
    return ModelSpec(vocab_size=int(vocab_size), dtype=dtype, **sizes)


class CausalSelfAttention(nnx.Module):
    """Multi-head causal self-attention with a fused qkv projection."""

    def __init__(self, spec: ModelSpec, *, rngs: nnx.Rngs):
        dt = _DTYPES[spec.dtype]
        self.n_heads = spec.n_heads
        self.qkv = nnx.Linear(spec.d_model, 3 * spec.d_model, dtype=dt, rngs=rngs)
        self.out = nnx.Linear(spec.d_model, spec.d_model, dtype=dt, rngs=rngs)

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        B, T, D = x_BxTxD.shape
        H = self.n_heads
        qkv_BxTx3xHxK = dense(self.qkv, x_BxTxD).reshape(B, T, 3, H, D // H)
        q_BxTxHxK, k_BxTxHxK, v_BxTxHxK = (qkv_BxTx3xHxK[:, :, i] for i in range(3))
        scores_BxHxTxS = jnp.einsum("bthk,bshk->bhts", q_BxTxHxK, k_BxTxHxK) / jnp.sqrt(D // H)
        # Softmax in float32 with a finite mask value: no row can become NaN, in any dtype.
        causal_TxS = jnp.tril(jnp.ones((T, T), dtype=bool))
        scores_BxHxTxS = jnp.where(causal_TxS, scores_BxHxTxS.astype(jnp.float32), -1e30)
        attn_BxHxTxS = jax.nn.softmax(scores_BxHxTxS, axis=-1).astype(v_BxTxHxK.dtype)
        y_BxTxHxK = jnp.einsum("bhts,bshk->bthk", attn_BxHxTxS, v_BxTxHxK)
        return dense(self.out, y_BxTxHxK.reshape(B, T, D))


class MLP(nnx.Module):
    """Linear -> gelu -> Linear."""

    def __init__(self, spec: ModelSpec, *, rngs: nnx.Rngs):
        dt = _DTYPES[spec.dtype]
        self.fc_in = nnx.Linear(spec.d_model, spec.d_ff, dtype=dt, rngs=rngs)
        self.fc_out = nnx.Linear(spec.d_ff, spec.d_model, dtype=dt, rngs=rngs)

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        return dense(self.fc_out, jax.nn.gelu(dense(self.fc_in, x_BxTxD)))


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, spec: ModelSpec, *, rngs: nnx.Rngs):
        dt = _DTYPES[spec.dtype]
        self.attn_norm = nnx.LayerNorm(spec.d_model, dtype=dt, rngs=rngs)
        self.attn = CausalSelfAttention(spec, rngs=rngs)
        self.mlp_norm = nnx.LayerNorm(spec.d_model, dtype=dt, rngs=rngs)
        self.mlp = MLP(spec, rngs=rngs)

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        x_BxTxD = x_BxTxD + self.attn(norm(self.attn_norm, x_BxTxD))
        return x_BxTxD + self.mlp(norm(self.mlp_norm, x_BxTxD))


class TransformerLM(nnx.Module):
    """Token + learned position embedding, ``n_layers`` blocks, final norm, untied unembedding."""

    def __init__(self, spec: ModelSpec, *, rngs: nnx.Rngs):
        dt = _DTYPES[spec.dtype]
        self.spec = spec
        embed_init = nnx.initializers.normal(0.02)
        self.embed = nnx.Embed(
            spec.vocab_size, spec.d_model, dtype=dt, embedding_init=embed_init, rngs=rngs
        )
        self.pos_embed = nnx.Embed(
            spec.max_len, spec.d_model, dtype=dt, embedding_init=embed_init, rngs=rngs
        )
        self.blocks = nnx.List([Block(spec, rngs=rngs) for _ in range(spec.n_layers)])
        self.final_norm = nnx.LayerNorm(spec.d_model, dtype=dt, rngs=rngs)
        self.unembed = nnx.Linear(spec.d_model, spec.vocab_size, dtype=dt, rngs=rngs)

    def __call__(self, tokens_BxT: jax.Array) -> jax.Array:
        """Returns float32 next-token logits; position t predicts token t + 1."""
        T = tokens_BxT.shape[-1]
        if T > self.spec.max_len:
            raise ValueError(
                f"sequence length {T} exceeds the model's max_len {self.spec.max_len}; "
                "truncate the examples or raise model.max_len"
            )
        x_BxTxD = embed(self.embed, tokens_BxT) + embed(self.pos_embed, jnp.arange(T))
        for block in self.blocks:
            x_BxTxD = block(x_BxTxD)
        return dense(self.unembed, norm(self.final_norm, x_BxTxD)).astype(jnp.float32)


class LMApply(NnxApply):
    """The pure apply function of a ``TransformerLM``: ``(params, tokens_BxT) -> logits_BxTxV``.

    A ``trackstar.taps.NnxApply``: holds only the module's graph definition, each call rebuilds
    the module from ``params`` (pure, jittable), ``module(params)`` returns the nnx module for
    interactive use, and ``tapped`` gives the fast path.
    """

    def __init__(self, graphdef: Any, spec: ModelSpec):
        super().__init__(graphdef)
        self.spec = spec

    def module(self, params: Params) -> TransformerLM:
        """Rebuilds the ``TransformerLM`` holding ``params``."""
        return super().module(params)

    def tapped(self, params: Params, tokens_BxT: jax.Array, tap: Tap) -> jax.Array:
        """Like ``__call__``, but routes every parameterized op through ``tap``.

        ``tap(kind, path, x, y) -> y'`` follows the contract of ``trackstar.taps`` (kinds
        ``"dense"``, ``"embed"``, ``"scale_shift"``); paths are e.g. ``"blocks/0/attn/qkv"``.
        Used by ``trackstar.gradients``' activation-based per-example features.
        """
        return super().tapped(params, tokens_BxT, tap)

    def __repr__(self) -> str:
        return f"LMApply({self.spec})"


def build_module(
    cfg_model: ml_collections.ConfigDict | dict, vocab_size: int, seed: int
) -> TransformerLM:
    """Builds and initializes the nnx ``TransformerLM`` (sizes checked first)."""
    family = cfg_model.get("family", FAMILY) or FAMILY
    if family != FAMILY:
        raise ModelConfigError(
            f"model.family = {family!r} is not this module's {FAMILY!r}; build it with "
            "trackstar.families.make_model"
        )
    spec = resolve_spec(cfg_model, vocab_size)
    return TransformerLM(spec, rngs=nnx.Rngs(params=seed))


def make_model(
    cfg_model: ml_collections.ConfigDict | dict, vocab_size: int, seed: int
) -> tuple[LMApply, Params]:
    """Returns ``(apply_fn, params)``: a pure apply function and a plain nested-dict params tree.

    ``params`` is ``nnx.to_pure_dict`` of the module's ``nnx.Param`` state; block indices are
    int keys (paths such as ``blocks/0/attn/qkv/kernel``).
    """
    module = build_module(cfg_model, vocab_size, seed)
    graphdef, state = nnx.split(module, nnx.Param)
    return LMApply(graphdef, module.spec), nnx.to_pure_dict(state)


def abstract_params(cfg_model: ml_collections.ConfigDict | dict, vocab_size: int) -> Params:
    """``jax.ShapeDtypeStruct``s of ``make_model``'s params (nothing allocated)."""
    abstract = nnx.eval_shape(lambda: build_module(cfg_model, vocab_size, 0))
    state = nnx.split(abstract, nnx.Param)[1]
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(state))


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
