"""GPT-2 (Hugging Face ``GPT2LMHeadModel``) as the ``"gpt2"`` model family, in ``flax.nnx``.

The math is Hugging Face's: learned token and position embeddings, pre-LayerNorm blocks
(``ln_1`` -> fused qkv attention -> ``c_proj``; ``ln_2`` -> ``c_fc`` -> ``gelu_new`` ->
``c_proj``), final ``ln_f``, logits ``h @ wte.T`` (the head tied to the token embedding unless
the config says ``tie_word_embeddings: false``). Attention is causal and scaled by
``1/sqrt(head_dim)`` (``scale_attn_weights``; ``scale_attn_by_inverse_layer_idx`` divides by
``layer + 1`` too). Hugging Face's ``Conv1D`` stores ``(in, out)`` weights, so they are the
kernels as they are. Padding is the caller's: with right padding and the causal mask a real
position never sees a pad, so its logits equal the unpadded sequence's.

Parameter paths (``embed/embedding``, ``pos_embed/embedding``, ``blocks/0/attn_norm/scale``,
``blocks/0/attn/qkv/kernel``, ``blocks/0/attn/out``, ``blocks/0/mlp_norm``,
``blocks/0/mlp/fc_in``, ``blocks/0/mlp/fc_out``, ``final_norm``; ``unembed/kernel`` only for an
untied head) are those ``trackstar.model.TENSOR_RULES`` shard. Every op goes through
``trackstar.taps``; the tied head is the ``"unembed"`` kind, so the fast path covers it.

This is also the project's own model: the demo LM is a small configuration of this family
(``configs/demo.py``: ``model.size = "small"``, ``tie_word_embeddings = False``), built with
GPT-2's initialization (normal(0.02) weights, out-projections scaled by 1/sqrt(2 n_layers)),
so a trained run exports as a Hugging Face checkpoint (``trackstar.hf.export``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from trackstar import families, taps
from trackstar import model as model_lib
from trackstar.hf.common import (
    GELU_ACTIVATIONS,
    SpecApply,
    nnx_abstract_params,
    nnx_build,
    nnx_make_apply,
)
from trackstar.hf.loader import HFImportError, require
from trackstar.model import ModelConfigError

FAMILY = "gpt2"
TENSOR_RULES = model_lib.TENSOR_RULES  # the same paths: column/row-parallel attention & MLP

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# Hugging Face ``activation_function`` -> the function (transformers.activations.ACT2FN).
ACTIVATIONS = {
    **GELU_ACTIVATIONS,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}

# Architecture fields of the ``model`` config section and their GPT-2 defaults; the sizes
# (d_model, n_layers, n_heads, d_ff, max_len) default to trackstar.model.SIZES[size] in ``build``.
_DEFAULTS = dict(
    layer_norm_epsilon=1e-5,
    activation="gelu_new",
    scale_attn_weights=True,
    scale_attn_by_inverse_layer_idx=False,
    tie_word_embeddings=True,
    dtype="float32",
)
_SIZE_FIELDS = ("d_model", "n_layers", "n_heads", "d_ff", "max_len")


# ----------------------------------------------------------------------------- config


def config_from_hf(hf_config: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """The ``model`` config section of a Hugging Face GPT-2 ``config.json``."""
    if hf_config.get("add_cross_attention"):
        raise HFImportError("GPT-2 with cross-attention (add_cross_attention) is not supported")
    act = hf_config.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise HFImportError(
            f"GPT-2 activation_function {act!r} is not supported; supported: {sorted(ACTIVATIONS)}"
        )
    d_model = int(hf_config["n_embd"])
    n_inner = hf_config.get("n_inner")
    return ml_collections.ConfigDict(
        dict(
            family=FAMILY,
            vocab_size=int(hf_config["vocab_size"]),
            d_model=d_model,
            n_layers=int(hf_config["n_layer"]),
            n_heads=int(hf_config["n_head"]),
            d_ff=int(n_inner) if n_inner else 4 * d_model,
            max_len=int(hf_config["n_positions"]),
            layer_norm_epsilon=float(hf_config.get("layer_norm_epsilon", 1e-5)),
            activation=act,
            scale_attn_weights=bool(hf_config.get("scale_attn_weights", True)),
            scale_attn_by_inverse_layer_idx=bool(
                hf_config.get("scale_attn_by_inverse_layer_idx", False)
            ),
            tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", True)),
            dtype="float32",
        )
    )


class Spec:
    """Resolved GPT-2 sizes and options (``resolve``), hashable for the apply function."""

    def __init__(self, vocab_size: int, **fields: Any):
        self.vocab_size = int(vocab_size)
        self.__dict__.update(fields)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def __repr__(self) -> str:
        return f"gpt2.Spec({self.__dict__})"


def resolve(cfg_model: Mapping | Any, vocab_size: int) -> Spec:
    """Sizes from ``cfg_model`` (a field <= 0 or absent: ``trackstar.model.SIZES[size]``)."""
    get = cfg_model.get
    size = get("size", "small") or "small"
    if size not in model_lib.SIZES:
        raise ModelConfigError(
            f"unknown model size {size!r}; set model.size to one of {sorted(model_lib.SIZES)}"
        )
    fields: dict[str, Any] = {}
    for name in _SIZE_FIELDS:
        value = int(get(name, 0) or 0)
        if value < 0:
            raise ModelConfigError(f"model.{name} = {value} is negative; use > 0 (or 0 = preset)")
        fields[name] = value if value > 0 else model_lib.SIZES[size][name]
    for name, default in _DEFAULTS.items():
        value = get(name, None)
        fields[name] = default if value is None or value == "" else value
    if fields["d_model"] % fields["n_heads"]:
        raise ModelConfigError(
            f"model.d_model = {fields['d_model']} is not divisible by model.n_heads = "
            f"{fields['n_heads']}; pick n_heads dividing d_model"
        )
    if fields["dtype"] not in _DTYPES:
        raise ModelConfigError(f"model.dtype = {fields['dtype']!r}; use one of {sorted(_DTYPES)}")
    if fields["activation"] not in ACTIVATIONS:
        raise ModelConfigError(
            f"model.activation = {fields['activation']!r}; use one of {sorted(ACTIVATIONS)}"
        )
    if int(vocab_size) < 1:
        raise ModelConfigError(f"vocab_size = {vocab_size}; it must be positive")
    return Spec(vocab_size, **fields)


# ----------------------------------------------------------------------------- the model


def _normal(std: float):
    return nnx.initializers.normal(std)


class Attention(nnx.Module):
    """Causal multi-head self-attention with GPT-2's fused ``c_attn`` and ``c_proj``."""

    def __init__(self, spec: Spec, layer: int, *, rngs: nnx.Rngs):
        dt = _DTYPES[spec.dtype]
        d = spec.d_model
        self.n_heads = spec.n_heads
        scale = 1.0 / math.sqrt(spec.head_dim) if spec.scale_attn_weights else 1.0
        if spec.scale_attn_by_inverse_layer_idx:
            scale /= float(layer + 1)
        self.scale = scale
        proj_std = 0.02 / math.sqrt(2 * spec.n_layers)
        self.qkv = nnx.Linear(d, 3 * d, dtype=dt, kernel_init=_normal(0.02), rngs=rngs)
        self.out = nnx.Linear(d, d, dtype=dt, kernel_init=_normal(proj_std), rngs=rngs)

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        B, T, D = x_BxTxD.shape
        H = self.n_heads
        qkv_BxTx3xHxK = taps.dense(self.qkv, x_BxTxD).reshape(B, T, 3, H, D // H)
        q_BxTxHxK, k_BxTxHxK, v_BxTxHxK = (qkv_BxTx3xHxK[:, :, i] for i in range(3))
        scores_BxHxTxS = jnp.einsum(
            "bthk,bshk->bhts",
            q_BxTxHxK.astype(jnp.float32),
            k_BxTxHxK.astype(jnp.float32),
        )
        scores_BxHxTxS = scores_BxHxTxS * self.scale
        causal_TxS = jnp.tril(jnp.ones((T, T), dtype=bool))
        scores_BxHxTxS = jnp.where(causal_TxS, scores_BxHxTxS, -1e30)
        attn_BxHxTxS = jax.nn.softmax(scores_BxHxTxS, axis=-1).astype(v_BxTxHxK.dtype)
        y_BxTxHxK = jnp.einsum("bhts,bshk->bthk", attn_BxHxTxS, v_BxTxHxK)
        return taps.dense(self.out, y_BxTxHxK.reshape(B, T, D))


class MLP(nnx.Module):
    """``c_fc`` -> activation (``gelu_new``) -> ``c_proj``."""

    def __init__(self, spec: Spec, *, rngs: nnx.Rngs):
        dt = _DTYPES[spec.dtype]
        self.act = spec.activation
        proj_std = 0.02 / math.sqrt(2 * spec.n_layers)
        self.fc_in = nnx.Linear(
            spec.d_model, spec.d_ff, dtype=dt, kernel_init=_normal(0.02), rngs=rngs
        )
        self.fc_out = nnx.Linear(
            spec.d_ff, spec.d_model, dtype=dt, kernel_init=_normal(proj_std), rngs=rngs
        )

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        return taps.dense(self.fc_out, ACTIVATIONS[self.act](taps.dense(self.fc_in, x_BxTxD)))


def _layer_norm(spec: Spec, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # Two-pass variance, as torch's layer_norm computes it.
    return nnx.LayerNorm(
        spec.d_model,
        epsilon=spec.layer_norm_epsilon,
        dtype=_DTYPES[spec.dtype],
        use_fast_variance=False,
        rngs=rngs,
    )


class Block(nnx.Module):
    """Pre-LN block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, spec: Spec, layer: int, *, rngs: nnx.Rngs):
        self.attn_norm = _layer_norm(spec, rngs)
        self.attn = Attention(spec, layer, rngs=rngs)
        self.mlp_norm = _layer_norm(spec, rngs)
        self.mlp = MLP(spec, rngs=rngs)

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        x_BxTxD = x_BxTxD + self.attn(taps.norm(self.attn_norm, x_BxTxD))
        return x_BxTxD + self.mlp(taps.norm(self.mlp_norm, x_BxTxD))


class GPT2LM(nnx.Module):
    """``GPT2LMHeadModel``: embeddings, ``n_layers`` blocks, ``ln_f``, head tied to ``wte``."""

    def __init__(self, spec: Spec, *, rngs: nnx.Rngs):
        dt = _DTYPES[spec.dtype]
        self.spec = spec
        self.embed = nnx.Embed(
            spec.vocab_size, spec.d_model, dtype=dt, embedding_init=_normal(0.02), rngs=rngs
        )
        self.pos_embed = nnx.Embed(
            spec.max_len, spec.d_model, dtype=dt, embedding_init=_normal(0.01), rngs=rngs
        )
        self.blocks = nnx.List([Block(spec, i, rngs=rngs) for i in range(spec.n_layers)])
        self.final_norm = _layer_norm(spec, rngs)
        if not spec.tie_word_embeddings:
            self.unembed = nnx.Linear(
                spec.d_model,
                spec.vocab_size,
                use_bias=False,
                dtype=dt,
                kernel_init=_normal(0.02),
                rngs=rngs,
            )

    def __call__(self, tokens_BxT: jax.Array) -> jax.Array:
        """Float32 next-token logits; position t predicts token t + 1."""
        T = tokens_BxT.shape[-1]
        if T > self.spec.max_len:
            raise ValueError(
                f"sequence length {T} exceeds GPT-2's n_positions {self.spec.max_len}; "
                "truncate the examples"
            )
        x_BxTxD = taps.embed(self.embed, tokens_BxT) + taps.embed(self.pos_embed, jnp.arange(T))
        for block in self.blocks:
            x_BxTxD = block(x_BxTxD)
        h_BxTxD = taps.norm(self.final_norm, x_BxTxD)
        if self.spec.tie_word_embeddings:
            return taps.unembed(self.embed, h_BxTxD).astype(jnp.float32)
        return taps.dense(self.unembed, h_BxTxD).astype(jnp.float32)


class GPT2Apply(SpecApply):
    """The pure apply function of a ``GPT2LM`` (a ``trackstar.taps.NnxApply``: has ``tapped``)."""


def _module(cfg_model: Mapping | Any, vocab_size: int, seed: int) -> GPT2LM:
    return GPT2LM(resolve(cfg_model, vocab_size), rngs=nnx.Rngs(params=seed))


def build(cfg_model: Mapping | Any, vocab_size: int, seed: int) -> tuple[GPT2Apply, dict]:
    """``(apply_fn, params)`` of a randomly initialized GPT-2 (Hugging Face's init scheme)."""
    return nnx_build(lambda s: _module(cfg_model, vocab_size, s), GPT2Apply, seed)


def make_apply(cfg_model: Mapping | Any, vocab_size: int) -> GPT2Apply:
    """The apply function alone (no parameters initialized: the module is traced abstractly)."""
    return nnx_make_apply(lambda s: _module(cfg_model, vocab_size, s), GPT2Apply)


def abstract_params(cfg_model: Mapping | Any, vocab_size: int) -> dict:
    """``jax.ShapeDtypeStruct``s of ``build``'s params (nothing allocated)."""
    return nnx_abstract_params(lambda s: _module(cfg_model, vocab_size, s))


# ----------------------------------------------------------------------------- weights

# trackstar path -> Hugging Face tensor name (below the ``transformer.`` prefix); ``{i}`` is the
# block index. Conv1D weights are (in, out): kernels as stored.
TOP_TENSORS = {
    "embed/embedding": "wte.weight",
    "pos_embed/embedding": "wpe.weight",
    "final_norm/scale": "ln_f.weight",
    "final_norm/bias": "ln_f.bias",
}
BLOCK_TENSORS = {
    "attn_norm/scale": "h.{i}.ln_1.weight",
    "attn_norm/bias": "h.{i}.ln_1.bias",
    "attn/qkv/kernel": "h.{i}.attn.c_attn.weight",
    "attn/qkv/bias": "h.{i}.attn.c_attn.bias",
    "attn/out/kernel": "h.{i}.attn.c_proj.weight",
    "attn/out/bias": "h.{i}.attn.c_proj.bias",
    "mlp_norm/scale": "h.{i}.ln_2.weight",
    "mlp_norm/bias": "h.{i}.ln_2.bias",
    "mlp/fc_in/kernel": "h.{i}.mlp.c_fc.weight",
    "mlp/fc_in/bias": "h.{i}.mlp.c_fc.bias",
    "mlp/fc_out/kernel": "h.{i}.mlp.c_proj.weight",
    "mlp/fc_out/bias": "h.{i}.mlp.c_proj.bias",
}
HEAD_TENSOR = "lm_head.weight"  # (vocab, d): untied heads only; unembed/kernel is its transpose


def params_from_hf(tensors: Mapping[str, np.ndarray], cfg_model: Any) -> dict:
    """The params tree of ``GPT2LM`` from a checkpoint's tensors (shapes checked, dtypes kept).

    Tensor names may carry the ``transformer.`` prefix (``GPT2LMHeadModel``) or not
    (``GPT2Model``, the original hub files). A missing tensor or a wrong shape raises
    ``HFImportError`` naming the Hugging Face tensor.
    """
    spec = resolve(cfg_model, int(cfg_model.vocab_size))
    shapes = {p: s.shape for p, s in _flat(abstract_params(cfg_model, spec.vocab_size))}
    prefix = "transformer." if any(k.startswith("transformer.") for k in tensors) else ""

    def take(path: str, hf_name: str, transpose: bool = False) -> np.ndarray:
        value = np.asarray(require(tensors, hf_name))
        if transpose:
            value = value.T
        if tuple(value.shape) != tuple(shapes[path]):
            raise HFImportError(
                f"tensor {hf_name!r} has shape {tuple(np.shape(tensors[hf_name]))}; the config "
                f"makes {path!r} {tuple(shapes[path])}{' (transposed)' if transpose else ''}"
            )
        return value

    flat: dict[str, np.ndarray] = {
        path: take(path, prefix + name) for path, name in TOP_TENSORS.items()
    }
    for i in range(spec.n_layers):
        for path, name in BLOCK_TENSORS.items():
            flat[f"blocks/{i}/{path}"] = take(f"blocks/{i}/{path}", prefix + name.format(i=i))
    if not spec.tie_word_embeddings:
        flat["unembed/kernel"] = take("unembed/kernel", HEAD_TENSOR, transpose=True)
    return _nest(flat)


def _flat(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(tree, Mapping):
        out = []
        for key, value in tree.items():
            out += _flat(value, f"{prefix}{key}/")
        return out
    return [(prefix[:-1], tree)]


def _nest(flat: Mapping[str, Any]) -> dict:
    """``{"a/0/b": x}`` -> ``{"a": {0: {"b": x}}}`` (digit keys are ints, as nnx.List's)."""
    out: dict = {}
    for path, value in flat.items():
        node = out
        keys = [int(k) if k.isdigit() else k for k in path.split("/")]
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return out


MODEL_FAMILY = families.register_family(
    families.ModelFamily(
        name=FAMILY,
        build=build,
        tensor_rules=TENSOR_RULES,
        abstract=abstract_params,
        description="GPT-2 (Hugging Face GPT2LMHeadModel math, trackstar.hf.gpt2, flax.nnx)",
    )
)
