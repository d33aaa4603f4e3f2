"""The ``"llama"`` model family: Llama 2/3, Mistral and Qwen2 in ``flax.nnx``, with HF's math.

One decoder serves the three Hugging Face ``model_type``s (``trackstar.hf.loader.MODEL_TYPES``):
pre-norm blocks of RMSNorm -> grouped-query attention with rotary position embeddings -> RMSNorm
-> SwiGLU MLP, a final RMSNorm and an untied (``unembed``) or tied output head. The arithmetic
follows ``transformers``' ``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM``
(eager attention) step by step:

- RMSNorm ``weight * (h / sqrt(mean(h^2) + eps))``, the normalization in float32 and cast back
  to the compute dtype before the weight multiplies (HF's ``LlamaRMSNorm``);
- RoPE in the rotate-half convention: ``inv_freq = 1 / theta^(arange(0, d, 2) / d)``,
  ``cos``/``sin`` of the frequencies concatenated with themselves, ``q cos + rotate_half(q) sin``;
  ``rope_scaling`` of type ``"llama3"`` (Llama 3.1+) rescales ``inv_freq`` as HF's
  ``_compute_llama3_parameters`` does; other scaling types are refused by name;
- grouped-query attention: query head ``h`` reads key/value head ``h // (heads / kv_heads)``
  (HF's ``repeat_kv``), scores ``q k^T / sqrt(head_dim)``, a causal mask, softmax in float32;
  Mistral's / Qwen2's sliding window is the band ``0 <= t - s < sliding_window`` of HF's
  ``create_sliding_window_causal_mask``, implemented exactly for every sequence length (layers
  ``sliding_layers``, all by default);
- SwiGLU ``down(silu(gate(x)) * up(x))``.

Attention biases: ``attention_bias`` puts a bias on the q, k and v projections and ``o_bias``
(default: ``attention_bias``) on o; Llama's ``attention_bias`` sets both, Qwen2 has q/k/v biases
and no o bias (``config_from_hf`` writes the two fields), Mistral none.

Tokens are right-padded and the model takes no attention mask: with causal attention a real
position never sees the padding after it, so its logits equal HF's with an attention mask.
Sequences longer than ``max_position_embeddings`` are refused.

Parameter paths (``params_from_hf``'s table, ``HF_NAMES``): ``embed/embedding``,
``blocks/{i}/attn_norm/scale``, ``blocks/{i}/attn/{q,k,v,o}/{kernel,bias}``,
``blocks/{i}/mlp_norm/scale``, ``blocks/{i}/mlp/{gate,up,down}/{kernel,bias}``,
``final_norm/scale``, ``unembed/kernel`` (untied heads only). Kernels are ``(in, out)``: HF's
``nn.Linear`` weights transposed.

The fast path (``trackstar.taps``): every dense layer, the embedding, every RMSNorm (a
``"scale_shift"`` without bias on the normalized input) and a tied head (``tie_word_embeddings``:
``logits = h @ embedding^T``, the ``"unembed"`` kind) go through the tap helpers, so
``trackstar.gradients.activation_features`` covers every parameter and every use of it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from trackstar import families, taps
from trackstar.hf.common import (
    SpecApply,
    nnx_abstract_params,
    nnx_build,
    nnx_make_apply,
    rotate_half,
)
from trackstar.hf.loader import HFImportError, require
from trackstar.model import MODEL, ModelConfigError

Params = dict[str, Any]

FAMILY = "llama"
HF_MODEL_TYPES = ("llama", "mistral", "qwen2")  # the model_types this module maps
ROPE_TYPES = ("default", "llama3")  # rope_scaling types supported (HF's "rope_type")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# The ``model`` config fields of this family, with the values ``build`` uses when one is absent
# (a small random Llama). ``config_from_hf`` writes every one of them.
DEFAULTS: dict[str, Any] = dict(
    vocab_size=0,  # 0: build's vocab_size argument
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=0,  # 0: num_attention_heads (no grouping)
    head_dim=0,  # 0: hidden_size // num_attention_heads
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    rope_scaling=None,  # None, or dict(rope_type="llama3", factor, low_freq_factor, ...)
    max_position_embeddings=2048,
    tie_word_embeddings=False,
    attention_bias=False,  # biases on q, k, v
    o_bias=None,  # bias on o; None: attention_bias (Llama's convention)
    mlp_bias=False,
    sliding_window=0,  # 0: none
    sliding_layers=None,  # layer indices using the window; None: all (when sliding_window > 0)
    initializer_range=0.02,
    dtype="float32",
)

# Megatron-style tensor-parallel rules over these paths (trackstar.sharding's "tensor" preset
# for this family): q/k/v/gate/up column-parallel, o/down row-parallel, the embedding and the
# untied head split over the model axis along the hidden/vocab width; norms replicated.
TENSOR_RULES: tuple[tuple[str, Any], ...] = (
    (r"(^|/)embed/embedding$", (None, MODEL)),
    (r"(^|/)(q|k|v|gate|up)/kernel$", (None, MODEL)),
    (r"(^|/)(q|k|v|gate|up)/bias$", (MODEL,)),
    (r"(^|/)(o|down)/kernel$", (MODEL, None)),
    (r"(^|/)unembed/kernel$", (None, MODEL)),
    (r".*", ()),  # norm scales, o/down biases: replicated
)


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class LlamaSpec:
    """Resolved, validated sizes of one model (``resolve_spec``); hashable (nnx static)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: tuple[tuple[str, Any], ...] | None  # sorted items, or None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    o_bias: bool
    mlp_bias: bool
    sliding_window: int
    sliding_layers: tuple[int, ...]
    initializer_range: float
    dtype: str

    def window(self, layer: int) -> int:
        """Layer ``layer``'s sliding window (0: full causal attention)."""
        return self.sliding_window if layer in self.sliding_layers else 0


def _get(cfg_model: Mapping | Any, name: str) -> Any:
    value = cfg_model.get(name, None) if cfg_model is not None else None
    return DEFAULTS[name] if value is None else value


def resolve_spec(cfg_model: Mapping | Any, vocab_size: int) -> LlamaSpec:
    """The model ``cfg_model`` (a ``model`` config section) describes, checked.

    ``cfg_model.vocab_size`` (when > 0, as ``config_from_hf`` writes it) is the embedding's
    size; otherwise ``vocab_size``. Raises ``ModelConfigError`` naming the field to change.
    """
    family = cfg_model.get("family", FAMILY) or FAMILY
    if family != FAMILY:
        raise ModelConfigError(
            f"model.family = {family!r} is not this module's {FAMILY!r}; build it with "
            "trackstar.families.make_model"
        )
    vocab = int(_get(cfg_model, "vocab_size")) or int(vocab_size)
    if int(vocab_size) > vocab:
        raise ModelConfigError(
            f"the tokenizer's vocab_size {vocab_size} exceeds the model's model.vocab_size = "
            f"{vocab}; ids past the embedding table cannot be embedded"
        )
    ints = {
        name: int(_get(cfg_model, name))
        for name in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
        )
    }
    for name, value in ints.items():
        if value <= 0:
            raise ModelConfigError(f"model.{name} = {value}; use a positive size")
    heads = ints["num_attention_heads"]
    kv_heads = int(_get(cfg_model, "num_key_value_heads")) or heads
    if kv_heads <= 0 or heads % kv_heads:
        raise ModelConfigError(
            f"model.num_key_value_heads = {kv_heads} does not divide model.num_attention_heads "
            f"= {heads}; grouped-query attention needs a divisor"
        )
    head_dim = int(_get(cfg_model, "head_dim"))
    if head_dim == 0:
        if ints["hidden_size"] % heads:
            raise ModelConfigError(
                f"model.hidden_size = {ints['hidden_size']} is not divisible by "
                f"model.num_attention_heads = {heads}; set model.head_dim"
            )
        head_dim = ints["hidden_size"] // heads
    if head_dim <= 0 or head_dim % 2:
        raise ModelConfigError(f"model.head_dim = {head_dim}; rotary embeddings need it even > 0")
    dtype = str(_get(cfg_model, "dtype"))
    if dtype not in _DTYPES:
        raise ModelConfigError(f"model.dtype = {dtype!r}; use one of {sorted(_DTYPES)}")
    scaling = _get(cfg_model, "rope_scaling")
    if scaling is not None:
        scaling = dict(scaling)
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "default":
            scaling = None
        elif kind != "llama3":
            raise ModelConfigError(
                f"model.rope_scaling type {kind!r} is not supported; supported: {ROPE_TYPES}"
            )
        else:
            keys = ("factor", "low_freq_factor", "high_freq_factor")
            missing = [k for k in keys if k not in scaling]
            if missing:
                raise ModelConfigError(f"model.rope_scaling (llama3) lacks {missing}")
            scaling = (
                ("factor", float(scaling["factor"])),
                ("high_freq_factor", float(scaling["high_freq_factor"])),
                ("low_freq_factor", float(scaling["low_freq_factor"])),
                (
                    "original_max_position_embeddings",
                    int(
                        scaling.get("original_max_position_embeddings")
                        or ints["max_position_embeddings"]
                    ),
                ),
                ("rope_type", "llama3"),
            )
            if dict(scaling)["high_freq_factor"] == dict(scaling)["low_freq_factor"]:
                raise ModelConfigError(
                    "model.rope_scaling: high_freq_factor equals low_freq_factor"
                )
    layers = ints["num_hidden_layers"]
    window = int(_get(cfg_model, "sliding_window") or 0)
    if window < 0:
        raise ModelConfigError(f"model.sliding_window = {window}; use >= 0 (0: no window)")
    sliding = _get(cfg_model, "sliding_layers")
    sliding = tuple(range(layers)) if sliding is None else tuple(int(i) for i in sliding)
    if any(not 0 <= i < layers for i in sliding):
        raise ModelConfigError(
            f"model.sliding_layers = {sliding} names layers outside 0..{layers - 1}"
        )
    attention_bias = bool(_get(cfg_model, "attention_bias"))
    o_bias = _get(cfg_model, "o_bias")
    return LlamaSpec(
        vocab_size=vocab,
        hidden_size=ints["hidden_size"],
        intermediate_size=ints["intermediate_size"],
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(_get(cfg_model, "rms_norm_eps")),
        rope_theta=float(_get(cfg_model, "rope_theta")),
        rope_scaling=scaling,
        max_position_embeddings=ints["max_position_embeddings"],
        tie_word_embeddings=bool(_get(cfg_model, "tie_word_embeddings")),
        attention_bias=attention_bias,
        o_bias=attention_bias if o_bias is None else bool(o_bias),
        mlp_bias=bool(_get(cfg_model, "mlp_bias")),
        sliding_window=window,
        sliding_layers=sliding if window else (),
        initializer_range=float(_get(cfg_model, "initializer_range")),
        dtype=dtype,
    )


def _rope_from_hf(hf: Mapping) -> tuple[float, dict | None]:
    """``(rope_theta, rope_scaling)`` from either config.json format.

    transformers >= 5 writes ``rope_parameters`` (``rope_type``, ``rope_theta``, scaling
    fields); older files write ``rope_theta`` and ``rope_scaling`` (``type`` or ``rope_type``).
    """
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if any(isinstance(v, Mapping) for v in params.values()):
        raise HFImportError(
            f"per-layer-type rope parameters {sorted(params)} are not supported by the "
            f"{FAMILY!r} family"
        )
    theta = float(params.get("rope_theta") or hf.get("rope_theta") or 10000.0)
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor")) or 1.0
    if float(partial) != 1.0:
        raise HFImportError(
            f"partial_rotary_factor = {partial} is not supported (rotary over the whole head only)"
        )
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise HFImportError(
            f"rope scaling type {kind!r} is not supported; supported: {', '.join(ROPE_TYPES)}"
        )
    missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor") if k not in params]
    if missing:
        raise HFImportError(f"llama3 rope scaling without {missing} in config.json")
    original = (
        params.get("original_max_position_embeddings")
        or hf.get("original_max_position_embeddings")
        or hf.get("max_position_embeddings")
    )
    return theta, dict(
        rope_type="llama3",
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(original),
    )


def config_from_hf(hf_config: Mapping) -> ml_collections.ConfigDict:
    """The ``model`` config section (``family = "llama"``) of a Llama/Mistral/Qwen2 config.json.

    Refuses (``HFImportError``, naming the field) what the family does not compute: rope
    scaling other than Llama 3's, partial rotary embeddings, activations other than SiLU.
    """
    hf = dict(hf_config)
    model_type = hf.get("model_type", "llama")
    if model_type not in HF_MODEL_TYPES:
        raise HFImportError(
            f"model_type {model_type!r} is not mapped by trackstar.hf.llama "
            f"(it maps {', '.join(HF_MODEL_TYPES)})"
        )

    def need(name: str) -> Any:
        if hf.get(name) is None:
            raise HFImportError(f"config.json of a {model_type!r} model has no {name!r}")
        return hf[name]

    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise HFImportError(f"hidden_act {act!r} is not supported; the family computes SiLU")
    layers = int(need("num_hidden_layers"))
    heads = int(need("num_attention_heads"))
    hidden = int(need("hidden_size"))
    theta, scaling = _rope_from_hf(hf)

    if model_type == "qwen2":  # q/k/v biases, no o bias (Qwen2Attention), no MLP biases
        attention_bias, o_bias, mlp_bias = True, False, False
    elif model_type == "mistral":  # no biases at all (MistralAttention ignores attention_bias)
        attention_bias, o_bias, mlp_bias = False, False, False
    else:
        attention_bias = o_bias = bool(hf.get("attention_bias", False))
        mlp_bias = bool(hf.get("mlp_bias", False))

    window, sliding_layers = 0, None
    if model_type == "mistral" and hf.get("sliding_window"):
        window = int(hf["sliding_window"])
    elif model_type == "qwen2" and hf.get("use_sliding_window") and hf.get("sliding_window"):
        window = int(hf["sliding_window"])
        types = hf.get("layer_types") or [
            "sliding_attention" if i >= int(hf.get("max_window_layers", 28)) else "full_attention"
            for i in range(layers)
        ]
        sliding_layers = tuple(i for i, t in enumerate(types) if t == "sliding_attention")

    return ml_collections.ConfigDict(
        dict(
            family=FAMILY,
            model_type=str(model_type),
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hidden // heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            sliding_window=window,
            sliding_layers=sliding_layers,
            initializer_range=float(hf.get("initializer_range", 0.02)),
            dtype="float32",
        )
    )


# ----------------------------------------------------------------------------- the model


@functools.lru_cache(maxsize=32)
def inv_freq(spec: LlamaSpec) -> np.ndarray:
    """RoPE inverse frequencies (float32, ``head_dim / 2``), Llama 3 scaling applied.

    Float32 throughout, as HF's ``compute_default_rope_parameters`` /
    ``_compute_llama3_parameters`` compute them.
    """
    dim = spec.head_dim
    f32 = np.float32
    exponent = np.arange(0, dim, 2).astype(f32) / f32(dim)
    freq = (f32(1.0) / (f32(spec.rope_theta) ** exponent)).astype(f32)
    if spec.rope_scaling is None:
        return freq
    s = dict(spec.rope_scaling)
    factor, low, high = f32(s["factor"]), f32(s["low_freq_factor"]), f32(s["high_freq_factor"])
    old_len = f32(s["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = (f32(2 * math.pi) / freq).astype(f32)
    scaled = np.where(wavelen > low_wavelen, freq / factor, freq).astype(f32)
    smooth = ((old_len / wavelen - low) / (high - low)).astype(f32)
    smoothed = ((f32(1) - smooth) * scaled / factor + smooth * scaled).astype(f32)
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(f32)


def rotary(spec: LlamaSpec, seq: int, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """``(cos_TxK, sin_TxK)`` at positions ``0..seq-1`` (HF's ``LlamaRotaryEmbedding``)."""
    freqs_TxK2 = jnp.arange(seq, dtype=jnp.float32)[:, None] * jnp.asarray(inv_freq(spec))[None]
    emb_TxK = jnp.concatenate([freqs_TxK2, freqs_TxK2], axis=-1)
    return jnp.cos(emb_TxK).astype(dtype), jnp.sin(emb_TxK).astype(dtype)


def _linear(spec: LlamaSpec, n_in: int, n_out: int, bias: bool, rngs: nnx.Rngs) -> nnx.Linear:
    dt = _DTYPES[spec.dtype]
    return nnx.Linear(
        n_in,
        n_out,
        use_bias=bias,
        dtype=dt,
        param_dtype=dt,
        kernel_init=nnx.initializers.normal(spec.initializer_range),
        rngs=rngs,
    )


class RMSNorm(nnx.Module):
    """HF's ``LlamaRMSNorm``: ``scale * (h / sqrt(mean(h^2) + eps))``, normalized in float32.

    Tapped as ``"scale_shift"`` (no bias) of the normalized input.
    """

    def __init__(self, spec: LlamaSpec):
        self.scale = nnx.Param(jnp.ones((spec.hidden_size,), _DTYPES[spec.dtype]))
        self.epsilon = spec.rms_norm_eps

    def __call__(self, h: jax.Array) -> jax.Array:
        x = taps.rms_norm_input(h, self.epsilon)
        y = self.scale[...] * x.astype(h.dtype)
        return taps.emit("scale_shift", self, x, y)


class Attention(nnx.Module):
    """Grouped-query causal self-attention with rotary embeddings (optionally a sliding window)."""

    def __init__(self, spec: LlamaSpec, layer: int, *, rngs: nnx.Rngs):
        self.spec = spec
        self.window = spec.window(layer)
        d, hd = spec.hidden_size, spec.head_dim
        self.q = _linear(spec, d, spec.num_heads * hd, spec.attention_bias, rngs)
        self.k = _linear(spec, d, spec.num_kv_heads * hd, spec.attention_bias, rngs)
        self.v = _linear(spec, d, spec.num_kv_heads * hd, spec.attention_bias, rngs)
        self.o = _linear(spec, spec.num_heads * hd, d, spec.o_bias, rngs)

    def __call__(self, x_BxTxD: jax.Array, cos_TxK: jax.Array, sin_TxK: jax.Array) -> jax.Array:
        spec = self.spec
        B, T, _ = x_BxTxD.shape
        N, G, K = spec.num_kv_heads, spec.num_heads // spec.num_kv_heads, spec.head_dim
        q_BxTxHxK = taps.dense(self.q, x_BxTxD).reshape(B, T, N * G, K)
        k_BxTxNxK = taps.dense(self.k, x_BxTxD).reshape(B, T, N, K)
        v_BxTxNxK = taps.dense(self.v, x_BxTxD).reshape(B, T, N, K)
        cos, sin = cos_TxK[:, None, :], sin_TxK[:, None, :]
        q_BxTxHxK = q_BxTxHxK * cos + rotate_half(q_BxTxHxK) * sin
        k_BxTxNxK = k_BxTxNxK * cos + rotate_half(k_BxTxNxK) * sin
        # Query head n * G + g reads key/value head n (HF's repeat_kv).
        q_BxTxNxGxK = q_BxTxHxK.reshape(B, T, N, G, K)
        scores = jnp.einsum("btngk,bsnk->bngts", q_BxTxNxGxK, k_BxTxNxK) * (K**-0.5)
        t_T1, s_1S = jnp.arange(T)[:, None], jnp.arange(T)[None, :]
        allowed_TxS = s_1S <= t_T1
        if self.window:
            allowed_TxS &= t_T1 - s_1S < self.window
        # Softmax in float32 with a finite mask value (HF adds finfo.min): no row can be NaN.
        scores = jnp.where(allowed_TxS, scores.astype(jnp.float32), -1e30)
        attn = jax.nn.softmax(scores, axis=-1).astype(v_BxTxNxK.dtype)
        y_BxTxNxGxK = jnp.einsum("bngts,bsnk->btngk", attn, v_BxTxNxK)
        return taps.dense(self.o, y_BxTxNxGxK.reshape(B, T, N * G * K))


class MLP(nnx.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, spec: LlamaSpec, *, rngs: nnx.Rngs):
        d, f = spec.hidden_size, spec.intermediate_size
        self.gate = _linear(spec, d, f, spec.mlp_bias, rngs)
        self.up = _linear(spec, d, f, spec.mlp_bias, rngs)
        self.down = _linear(spec, f, d, spec.mlp_bias, rngs)

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        hidden = jax.nn.silu(taps.dense(self.gate, x_BxTxD)) * taps.dense(self.up, x_BxTxD)
        return taps.dense(self.down, hidden)


class Block(nnx.Module):
    """``x + attn(norm(x))``, then ``x + mlp(norm(x))`` (HF's decoder layer)."""

    def __init__(self, spec: LlamaSpec, layer: int, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(spec)
        self.attn = Attention(spec, layer, rngs=rngs)
        self.mlp_norm = RMSNorm(spec)
        self.mlp = MLP(spec, rngs=rngs)

    def __call__(self, x_BxTxD: jax.Array, cos_TxK: jax.Array, sin_TxK: jax.Array) -> jax.Array:
        x_BxTxD = x_BxTxD + self.attn(self.attn_norm(x_BxTxD), cos_TxK, sin_TxK)
        return x_BxTxD + self.mlp(self.mlp_norm(x_BxTxD))


class LlamaLM(nnx.Module):
    """Token embedding, ``num_layers`` blocks, final RMSNorm, untied or tied output head."""

    def __init__(self, spec: LlamaSpec, *, rngs: nnx.Rngs):
        dt = _DTYPES[spec.dtype]
        self.spec = spec
        self.embed = nnx.Embed(
            spec.vocab_size,
            spec.hidden_size,
            dtype=dt,
            param_dtype=dt,
            embedding_init=nnx.initializers.normal(spec.initializer_range),
            rngs=rngs,
        )
        self.blocks = nnx.List([Block(spec, i, rngs=rngs) for i in range(spec.num_layers)])
        self.final_norm = RMSNorm(spec)
        if not spec.tie_word_embeddings:
            self.unembed = _linear(spec, spec.hidden_size, spec.vocab_size, False, rngs)

    def __call__(self, tokens_BxT: jax.Array) -> jax.Array:
        """Float32 next-token logits; position t predicts token t + 1."""
        spec = self.spec
        T = tokens_BxT.shape[-1]
        if T > spec.max_position_embeddings:
            raise ValueError(
                f"sequence length {T} exceeds the model's max_position_embeddings "
                f"{spec.max_position_embeddings}; truncate the examples"
            )
        x_BxTxD = taps.embed(self.embed, tokens_BxT)
        cos_TxK, sin_TxK = rotary(spec, T, x_BxTxD.dtype)
        for block in self.blocks:
            x_BxTxD = block(x_BxTxD, cos_TxK, sin_TxK)
        h_BxTxD = self.final_norm(x_BxTxD)
        if not spec.tie_word_embeddings:
            return taps.dense(self.unembed, h_BxTxD).astype(jnp.float32)
        return taps.unembed(self.embed, h_BxTxD).astype(jnp.float32)


class LlamaApply(SpecApply):
    """The pure apply function of a ``LlamaLM``, with ``tapped`` (the fast path)."""

    def module(self, params: Params) -> LlamaLM:
        """Rebuilds the ``LlamaLM`` holding ``params``."""
        return super().module(params)


def build_module(cfg_model: Mapping | Any, vocab_size: int, seed: int) -> LlamaLM:
    """The nnx ``LlamaLM``, randomly initialized (normal(initializer_range), norms at 1)."""
    return LlamaLM(resolve_spec(cfg_model, vocab_size), rngs=nnx.Rngs(params=seed))


def build(cfg_model: Mapping | Any, vocab_size: int, seed: int) -> tuple[LlamaApply, Params]:
    """``(apply_fn, params)`` of a randomly initialized model (the family's ``build``)."""
    return nnx_build(lambda s: build_module(cfg_model, vocab_size, s), LlamaApply, seed)


def make_apply(cfg_model: Mapping | Any, vocab_size: int) -> LlamaApply:
    """The apply function alone (no parameter is initialized): for imported checkpoints."""
    return nnx_make_apply(lambda s: build_module(cfg_model, vocab_size, s), LlamaApply)


def abstract_params(cfg_model: Mapping | Any, vocab_size: int) -> Params:
    """``jax.ShapeDtypeStruct``s of ``build``'s params (nothing allocated)."""
    return nnx_abstract_params(lambda s: build_module(cfg_model, vocab_size, s))


# ----------------------------------------------------------------------------- HF tensors


def hf_names(spec: LlamaSpec) -> list[tuple[str, tuple, bool]]:
    """The mapping table: ``[(hf_name, our_path, transposed), ...]`` for one model.

    ``our_path`` is the key tuple into the params tree; ``transposed``: HF stores the
    ``nn.Linear`` weight ``(out, in)``, the params the kernel ``(in, out)``.
    """
    rows: list[tuple[str, tuple, bool]] = [
        ("model.embed_tokens.weight", ("embed", "embedding"), False)
    ]
    linears = [
        ("self_attn.q_proj", ("attn", "q"), spec.attention_bias),
        ("self_attn.k_proj", ("attn", "k"), spec.attention_bias),
        ("self_attn.v_proj", ("attn", "v"), spec.attention_bias),
        ("self_attn.o_proj", ("attn", "o"), spec.o_bias),
        ("mlp.gate_proj", ("mlp", "gate"), spec.mlp_bias),
        ("mlp.up_proj", ("mlp", "up"), spec.mlp_bias),
        ("mlp.down_proj", ("mlp", "down"), spec.mlp_bias),
    ]
    for i in range(spec.num_layers):
        hf, ours = f"model.layers.{i}", ("blocks", i)
        rows.append((f"{hf}.input_layernorm.weight", (*ours, "attn_norm", "scale"), False))
        for name, path, bias in linears:
            rows.append((f"{hf}.{name}.weight", (*ours, *path, "kernel"), True))
            if bias:
                rows.append((f"{hf}.{name}.bias", (*ours, *path, "bias"), False))
        rows.append((f"{hf}.post_attention_layernorm.weight", (*ours, "mlp_norm", "scale"), False))
    rows.append(("model.norm.weight", ("final_norm", "scale"), False))
    if not spec.tie_word_embeddings:
        rows.append(("lm_head.weight", ("unembed", "kernel"), True))
    return rows


def _ignorable(name: str, spec: LlamaSpec) -> bool:
    """Checkpoint tensors that carry nothing the model needs."""
    if name.endswith(".rotary_emb.inv_freq"):  # a buffer old checkpoints saved
        return True
    return spec.tie_word_embeddings and name == "lm_head.weight"  # a copy of the embedding


def params_from_hf(tensors: Mapping[str, np.ndarray], cfg_model: Mapping | Any) -> Params:
    """The params tree of a checkpoint's tensors (by HF name), through ``hf_names``' table.

    Arrays come back as jax arrays in ``cfg_model.dtype``. A tensor the table needs but
    ``tensors`` lacks, one of the wrong shape, or one the table does not know raises
    ``HFImportError`` naming the Hugging Face tensor.
    """
    vocab = int(cfg_model.get("vocab_size", 0) or 0)
    if vocab <= 0:
        raise HFImportError("cfg_model.vocab_size is not set; build it with config_from_hf")
    spec = resolve_spec(cfg_model, vocab)
    dt = _DTYPES[spec.dtype]
    shapes = dict(
        jax.tree_util.tree_flatten_with_path(
            abstract_params(cfg_model, vocab), is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct)
        )[0]
    )
    shapes = {tuple(_key(k) for k in path): leaf.shape for path, leaf in shapes.items()}
    params: Params = {}
    used = set()
    for hf_name, path, transposed in hf_names(spec):
        array = np.asarray(require(tensors, hf_name))
        if transposed:
            array = array.T
        want = shapes[path]
        if array.shape != tuple(want):
            shown = array.T.shape if transposed else array.shape
            raise HFImportError(
                f"tensor {hf_name!r} has shape {tuple(shown)}, the config implies "
                f"{tuple(want[::-1]) if transposed else tuple(want)}"
            )
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = jnp.asarray(array, dt)
        used.add(hf_name)
    extra = sorted(n for n in tensors if n not in used and not _ignorable(n, spec))
    if extra:
        raise HFImportError(
            f"the checkpoint has tensors the {FAMILY!r} family does not map: {extra[:5]}"
            f"{' ...' if len(extra) > 5 else ''}; does config.json (biases, tie_word_embeddings,"
            " num_hidden_layers) describe this checkpoint?"
        )
    return params


def _key(k: Any) -> Any:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return getattr(k, attr)
    return k


MODEL_FAMILY = families.register_family(
    families.ModelFamily(
        name=FAMILY,
        build=build,
        tensor_rules=TENSOR_RULES,
        abstract=abstract_params,
        description="Llama 2/3, Mistral, Qwen2 decoder (trackstar.hf.llama, flax.nnx)",
    ),
    replace=True,
)
