"""GPT-NeoX / Pythia as a trackstar model family (``"neox"``), in ``flax.nnx``.

The math is Hugging Face's ``GPTNeoXForCausalLM`` (transformers 5, eval mode):

- token embedding ``embed_in``, no position table: rotary embeddings on the first
  ``rotary_ndims = int(head_dim * rotary_pct)`` dims of every query and key head
  (rotate-half layout, ``inv_freq = 1 / base ** (arange(0, rotary_ndims, 2) / rotary_ndims)``,
  positions ``0 .. T-1``), the remaining dims passed through;
- one fused ``query_key_value`` projection whose ``3 * hidden`` outputs are laid out per head as
  ``(heads, 3, head_dim)``; kept fused here as the dense kernel ``blocks/N/attn/qkv/kernel``
  (``hidden x 3*hidden``) and split per head in the forward pass exactly as HF does;
- attention scores scaled by ``head_dim ** -0.5``, causal mask, float32 softmax;
- parallel residual ``x + attn(ln1(x)) + mlp(ln2(x))`` (``use_parallel_residual``, Pythia's
  choice), or sequential ``h = x + attn(ln1(x)); h + mlp(ln2(h))``;
- MLP ``dense_4h_to_h(act(dense_h_to_4h(x)))`` with ``hidden_act`` ``"gelu"`` (exact, erf),
  also the tanh approximations, ``relu`` and ``silu`` HF names (``ACTIVATIONS``);
- final LayerNorm and an untied bias-free head ``embed_out`` (Pythia), or the tied head
  ``h @ embed_in.T`` when ``tie_word_embeddings``.

Every parameterized op goes through ``trackstar.taps`` (``dense``, ``embed``, ``norm``, and
``unembed`` for a tied head), so the apply function has the fast path
(``trackstar.gradients.activation_features``), tied or not.

Interface (``trackstar.hf``): ``FAMILY``, ``config_from_hf``, ``params_from_hf`` (the mapping
table ``hf_tensor_names``), ``build``, ``make_apply``, ``abstract_params``, ``TENSOR_RULES``, and
``MODEL_FAMILY``, registered with ``trackstar.families`` at import.

Parameter paths (``trackstar.tree.path_name``)::

    embed_in/embedding                        gpt_neox.embed_in.weight
    blocks/N/input_layernorm/{scale,bias}     gpt_neox.layers.N.input_layernorm.{weight,bias}
    blocks/N/post_attention_layernorm/...     gpt_neox.layers.N.post_attention_layernorm....
    blocks/N/attn/qkv/{kernel,bias}           gpt_neox.layers.N.attention.query_key_value....
    blocks/N/attn/dense/{kernel,bias}         gpt_neox.layers.N.attention.dense....
    blocks/N/mlp/dense_h_to_4h/{kernel,bias}  gpt_neox.layers.N.mlp.dense_h_to_4h....
    blocks/N/mlp/dense_4h_to_h/{kernel,bias}  gpt_neox.layers.N.mlp.dense_4h_to_h....
    final_layer_norm/{scale,bias}             gpt_neox.final_layer_norm.{weight,bias}
    embed_out/kernel                          embed_out.weight (untied only)

Kernels are ``(in, out)``: the transpose of torch's ``Linear.weight``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from trackstar import families
from trackstar.hf.common import (
    GELU_ACTIVATIONS,
    SpecApply,
    nnx_abstract_params,
    nnx_build,
    nnx_make_apply,
    rotate_half,
)
from trackstar.hf.loader import HFImportError
from trackstar.model import MODEL, ModelConfigError
from trackstar.taps import dense, embed, norm, unembed

Params = dict[str, Any]

FAMILY = "neox"  # this model's name in trackstar.families.MODEL_FAMILIES
MODEL_TYPE = "gpt_neox"  # Hugging Face's model_type

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# Hugging Face hidden_act names this family computes exactly as transformers' ACT2FN does.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    **GELU_ACTIVATIONS,
    "gelu_python": lambda x: jax.nn.gelu(x, approximate=False),
}

# Megatron-style tensor-parallel rules (the "tensor" preset of trackstar.sharding for this
# family): column-parallel qkv and h_to_4h (their output dims split, so each device holds whole
# heads: the fused qkv outputs are grouped per head), row-parallel attn/dense and 4h_to_h.
TENSOR_RULES: tuple[tuple[str, Any], ...] = (
    (r"(^|/)embed_in/embedding$", (None, MODEL)),
    (r"(^|/)attn/qkv/kernel$", (None, MODEL)),
    (r"(^|/)attn/qkv/bias$", (MODEL,)),
    (r"(^|/)mlp/dense_h_to_4h/kernel$", (None, MODEL)),
    (r"(^|/)mlp/dense_h_to_4h/bias$", (MODEL,)),
    (r"(^|/)attn/dense/kernel$", (MODEL, None)),
    (r"(^|/)mlp/dense_4h_to_h/kernel$", (MODEL, None)),
    (r"(^|/)embed_out/kernel$", (None, MODEL)),
    (r".*", ()),  # norms, row-parallel biases: replicated
)

# Hugging Face's defaults for config.json fields a checkpoint may leave out (GPTNeoXConfig).
_HF_DEFAULTS = dict(
    rotary_pct=0.25,
    rotary_emb_base=10000.0,
    layer_norm_eps=1e-5,
    use_parallel_residual=True,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
    hidden_act="gelu",
    attention_bias=True,
)
_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
)
# Buffers older checkpoints carry that are no parameters (HF ignores them too).
_IGNORED_TENSORS = re.compile(r"(^|\.)attention\.(bias|masked_bias)$|(^|\.)rotary_emb\.inv_freq$")


# ----------------------------------------------------------------------------- config


def config_from_hf(hf_config: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """The ``model`` config section of a GPT-NeoX ``config.json`` (``family = "neox"``).

    Reads both rotary spellings: ``rotary_pct``/``rotary_emb_base`` (Pythia's files) and
    transformers 5's ``rope_parameters`` (``partial_rotary_factor``, ``rope_theta``). Refuses,
    with ``HFImportError`` naming the field, what this family does not compute: another
    ``model_type``, rotary scaling other than ``"default"``, an unsupported ``hidden_act``, a
    missing size field.
    """
    hf = dict(hf_config)
    model_type = hf.get("model_type", MODEL_TYPE)
    if model_type != MODEL_TYPE:
        raise HFImportError(f"config.json has model_type {model_type!r}, not {MODEL_TYPE!r}")
    missing = [name for name in _REQUIRED if hf.get(name) is None]
    if missing:
        raise HFImportError(f"config.json lacks {', '.join(missing)} (GPT-NeoX sizes)")

    rotary_pct = hf.get("rotary_pct", _HF_DEFAULTS["rotary_pct"])
    rotary_base = hf.get("rotary_emb_base", _HF_DEFAULTS["rotary_emb_base"])
    rope = hf.get("rope_parameters") or hf.get("rope_scaling")
    if rope:
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise HFImportError(
                f"config.json asks for rotary scaling {rope_type!r} (rope_parameters); this "
                "family computes the default rotary embedding only"
            )
        rotary_pct = rope.get("partial_rotary_factor", rotary_pct)
        rotary_base = rope.get("rope_theta", rotary_base)

    act = hf.get("hidden_act", _HF_DEFAULTS["hidden_act"])
    if act not in ACTIVATIONS:
        raise HFImportError(
            f"config.json has hidden_act {act!r}, which this family does not compute; "
            f"supported: {', '.join(sorted(ACTIVATIONS))}"
        )

    def get(name: str) -> Any:
        value = hf.get(name)
        return _HF_DEFAULTS[name] if value is None else value

    cfg = ml_collections.ConfigDict()
    cfg.family = FAMILY
    cfg.vocab_size = int(hf["vocab_size"])
    cfg.hidden_size = int(hf["hidden_size"])
    cfg.num_hidden_layers = int(hf["num_hidden_layers"])
    cfg.num_attention_heads = int(hf["num_attention_heads"])
    cfg.intermediate_size = int(hf["intermediate_size"])
    cfg.rotary_pct = float(rotary_pct)
    cfg.rotary_emb_base = float(rotary_base)
    cfg.layer_norm_eps = float(get("layer_norm_eps"))
    cfg.use_parallel_residual = bool(get("use_parallel_residual"))
    cfg.max_position_embeddings = int(get("max_position_embeddings"))
    cfg.tie_word_embeddings = bool(get("tie_word_embeddings"))
    cfg.hidden_act = str(act)
    cfg.attention_bias = bool(get("attention_bias"))
    cfg.dtype = "float32"
    # Checks the sizes now, so a bad file is refused before any tensor is read.
    try:
        resolve_spec(cfg, cfg.vocab_size)
    except ModelConfigError as e:
        raise HFImportError(f"config.json: {e}") from e
    return cfg


@dataclasses.dataclass(frozen=True)
class NeoxSpec:
    """The validated sizes and options of a GPT-NeoX model (``resolve_spec``)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    rotary_pct: float = 0.25
    rotary_emb_base: float = 10000.0
    layer_norm_eps: float = 1e-5
    use_parallel_residual: bool = True
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    hidden_act: str = "gelu"
    attention_bias: bool = True
    dtype: str = "float32"
    initializer_range: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_ndims(self) -> int:
        """HF's ``int(head_dim * rotary_pct)``: the rotary frequencies' ``dim``."""
        return int(self.head_dim * self.rotary_pct)

    @property
    def rotary_width(self) -> int:
        """Dims actually rotated: twice the number of frequencies (HF's ``cos.shape[-1]``)."""
        return 2 * len(range(0, self.rotary_ndims, 2))


def resolve_spec(cfg_model: Mapping | Any, vocab_size: int | None = None) -> NeoxSpec:
    """The ``NeoxSpec`` of a ``model`` config section; ``ModelConfigError`` names a bad field.

    The embedding table has ``cfg_model.vocab_size`` rows when that is set (> 0; a checkpoint's
    table may be padded beyond its tokenizer), else ``vocab_size``; a ``vocab_size`` above the
    table's rows is refused (the tokenizer would emit ids the model cannot embed).
    """
    get = cfg_model.get
    family = get("family", FAMILY) or FAMILY
    if family != FAMILY:
        raise ModelConfigError(
            f"model.family = {family!r} is not {FAMILY!r}; build it with "
            "trackstar.families.make_model"
        )
    table = int(get("vocab_size", 0) or 0)
    if table <= 0:
        if vocab_size is None or int(vocab_size) <= 0:
            raise ModelConfigError("model.vocab_size is not set; give the embedding table size")
        table = int(vocab_size)
    elif vocab_size is not None and int(vocab_size) > table:
        raise ModelConfigError(
            f"the tokenizer's vocab_size {vocab_size} exceeds model.vocab_size = {table} "
            "(the embedding table's rows); raise model.vocab_size or use the model's tokenizer"
        )
    sizes = {}
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        value = get(name, None)
        if value is None or int(value) <= 0:
            raise ModelConfigError(f"model.{name} = {value!r}; set it to a positive integer")
        sizes[name] = int(value)
    if sizes["hidden_size"] % sizes["num_attention_heads"]:
        raise ModelConfigError(
            f"model.hidden_size = {sizes['hidden_size']} is not divisible by "
            f"model.num_attention_heads = {sizes['num_attention_heads']}"
        )
    act = get("hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise ModelConfigError(
            f"model.hidden_act = {act!r}; use one of {', '.join(sorted(ACTIVATIONS))}"
        )
    dtype = get("dtype", "float32") or "float32"
    if dtype not in _DTYPES:
        raise ModelConfigError(f"model.dtype = {dtype!r}; use one of {sorted(_DTYPES)}")
    spec = NeoxSpec(
        vocab_size=table,
        rotary_pct=float(get("rotary_pct", 0.25)),
        rotary_emb_base=float(get("rotary_emb_base", 10000.0)),
        layer_norm_eps=float(get("layer_norm_eps", 1e-5)),
        use_parallel_residual=bool(get("use_parallel_residual", True)),
        max_position_embeddings=int(get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(get("tie_word_embeddings", False)),
        hidden_act=str(act),
        attention_bias=bool(get("attention_bias", True)),
        dtype=dtype,
        initializer_range=float(get("initializer_range", 0.02)),
        **sizes,
    )
    if not 0.0 <= spec.rotary_pct <= 1.0 or spec.rotary_width > spec.head_dim:
        raise ModelConfigError(
            f"model.rotary_pct = {spec.rotary_pct} rotates {spec.rotary_width} dims of a "
            f"{spec.head_dim}-dim head; use a fraction in [0, 1]"
        )
    if spec.rotary_emb_base <= 0:
        raise ModelConfigError(f"model.rotary_emb_base = {spec.rotary_emb_base}; use > 0")
    return spec


# ----------------------------------------------------------------------------- model


def rotary_cos_sin(spec: NeoxSpec, seq_len: int) -> tuple[jax.Array, jax.Array]:
    """HF's ``cos, sin`` (``T x rotary_width``, float32) for positions ``0 .. seq_len-1``."""
    dim = spec.rotary_ndims
    inv_freq = 1.0 / (spec.rotary_emb_base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    freqs_TxF = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * inv_freq[None, :]
    emb_TxR = jnp.concatenate([freqs_TxF, freqs_TxF], axis=-1)
    return jnp.cos(emb_TxR), jnp.sin(emb_TxR)


def apply_rotary(x_BxTxHxK: jax.Array, cos_TxR: jax.Array, sin_TxR: jax.Array) -> jax.Array:
    """Rotate-half rotary embedding on the first ``R`` dims of every head, the rest unchanged."""
    r = cos_TxR.shape[-1]
    if r == 0:
        return x_BxTxHxK
    cos, sin = (c[:, None, :].astype(x_BxTxHxK.dtype) for c in (cos_TxR, sin_TxR))
    rot, rest = x_BxTxHxK[..., :r], x_BxTxHxK[..., r:]
    return jnp.concatenate([rot * cos + rotate_half(rot) * sin, rest], axis=-1)


def _linear(n_in: int, n_out: int, bias: bool, spec: NeoxSpec, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        n_in,
        n_out,
        use_bias=bias,
        dtype=_DTYPES[spec.dtype],
        kernel_init=nnx.initializers.normal(spec.initializer_range),
        rngs=rngs,
    )


def _layer_norm(spec: NeoxSpec, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # Two-pass variance, as torch's LayerNorm computes it.
    return nnx.LayerNorm(
        spec.hidden_size,
        epsilon=spec.layer_norm_eps,
        use_fast_variance=False,
        dtype=_DTYPES[spec.dtype],
        rngs=rngs,
    )


class Attention(nnx.Module):
    """GPT-NeoX self-attention: fused per-head qkv, partial rotary, causal softmax, dense."""

    def __init__(self, spec: NeoxSpec, *, rngs: nnx.Rngs):
        self.spec = spec
        d = spec.hidden_size
        self.qkv = _linear(d, 3 * d, spec.attention_bias, spec, rngs)
        self.dense = _linear(d, d, spec.attention_bias, spec, rngs)

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        B, T, D = x_BxTxD.shape
        H, K = self.spec.num_attention_heads, self.spec.head_dim
        # HF: view(B, T, H, 3K), then chunk the last axis: q, k, v of head h are adjacent.
        qkv_BxTxHx3K = dense(self.qkv, x_BxTxD).reshape(B, T, H, 3 * K)
        q_BxTxHxK, k_BxTxHxK, v_BxTxHxK = jnp.split(qkv_BxTxHx3K, 3, axis=-1)
        cos_TxR, sin_TxR = rotary_cos_sin(self.spec, T)
        q_BxTxHxK = apply_rotary(q_BxTxHxK, cos_TxR, sin_TxR)
        k_BxTxHxK = apply_rotary(k_BxTxHxK, cos_TxR, sin_TxR)
        scores_BxHxTxS = jnp.einsum("bthk,bshk->bhts", q_BxTxHxK, k_BxTxHxK) * (K**-0.5)
        causal_TxS = jnp.tril(jnp.ones((T, T), dtype=bool))
        scores_BxHxTxS = jnp.where(
            causal_TxS, scores_BxHxTxS.astype(jnp.float32), jnp.finfo(jnp.float32).min
        )
        attn_BxHxTxS = jax.nn.softmax(scores_BxHxTxS, axis=-1).astype(v_BxTxHxK.dtype)
        y_BxTxHxK = jnp.einsum("bhts,bshk->bthk", attn_BxHxTxS, v_BxTxHxK)
        return dense(self.dense, y_BxTxHxK.reshape(B, T, D))


class MLP(nnx.Module):
    """``dense_4h_to_h(act(dense_h_to_4h(x)))``."""

    def __init__(self, spec: NeoxSpec, *, rngs: nnx.Rngs):
        self.act = ACTIVATIONS[spec.hidden_act]
        self.dense_h_to_4h = _linear(spec.hidden_size, spec.intermediate_size, True, spec, rngs)
        self.dense_4h_to_h = _linear(spec.intermediate_size, spec.hidden_size, True, spec, rngs)

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        return dense(self.dense_4h_to_h, self.act(dense(self.dense_h_to_4h, x_BxTxD)))


class Layer(nnx.Module):
    """One GPT-NeoX layer, parallel or sequential residual."""

    def __init__(self, spec: NeoxSpec, *, rngs: nnx.Rngs):
        self.parallel = spec.use_parallel_residual
        self.input_layernorm = _layer_norm(spec, rngs)
        self.post_attention_layernorm = _layer_norm(spec, rngs)
        self.attn = Attention(spec, rngs=rngs)
        self.mlp = MLP(spec, rngs=rngs)

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        attn_BxTxD = self.attn(norm(self.input_layernorm, x_BxTxD))
        if self.parallel:
            mlp_BxTxD = self.mlp(norm(self.post_attention_layernorm, x_BxTxD))
            return mlp_BxTxD + attn_BxTxD + x_BxTxD  # HF's order of the sum
        h_BxTxD = attn_BxTxD + x_BxTxD
        return self.mlp(norm(self.post_attention_layernorm, h_BxTxD)) + h_BxTxD


class NeoxLM(nnx.Module):
    """``GPTNeoXForCausalLM``: embed_in, layers, final_layer_norm, embed_out (or tied)."""

    def __init__(self, spec: NeoxSpec, *, rngs: nnx.Rngs):
        self.spec = spec
        self.embed_in = nnx.Embed(
            spec.vocab_size,
            spec.hidden_size,
            dtype=_DTYPES[spec.dtype],
            embedding_init=nnx.initializers.normal(spec.initializer_range),
            rngs=rngs,
        )
        self.blocks = nnx.List([Layer(spec, rngs=rngs) for _ in range(spec.num_hidden_layers)])
        self.final_layer_norm = _layer_norm(spec, rngs)
        if not spec.tie_word_embeddings:
            self.embed_out = _linear(spec.hidden_size, spec.vocab_size, False, spec, rngs)

    def __call__(self, tokens_BxT: jax.Array) -> jax.Array:
        """float32 next-token logits, ``B x T x vocab_size``; position t predicts token t + 1."""
        x_BxTxD = embed(self.embed_in, tokens_BxT)
        for block in self.blocks:
            x_BxTxD = block(x_BxTxD)
        h_BxTxD = norm(self.final_layer_norm, x_BxTxD)
        if self.spec.tie_word_embeddings:
            logits_BxTxV = unembed(self.embed_in, h_BxTxD)  # h @ embed_in.T
        else:
            logits_BxTxV = dense(self.embed_out, h_BxTxD)
        return logits_BxTxV.astype(jnp.float32)


class NeoxApply(SpecApply):
    """The pure apply function of a ``NeoxLM``: ``(params, tokens_BxT) -> logits_BxTxV``.

    A ``trackstar.taps.NnxApply``: ``module(params)`` gives the nnx module, ``tapped`` the fast
    path (paths such as ``"blocks/0/attn/qkv"``).
    """


def _module(spec: NeoxSpec, seed: int) -> NeoxLM:
    return NeoxLM(spec, rngs=nnx.Rngs(params=seed))


def build(cfg_model: Mapping | Any, vocab_size: int, seed: int) -> tuple[NeoxApply, Params]:
    """``(apply_fn, params)`` of a randomly initialized model (HF's init: normal(0.02) weights,
    zero biases, unit norm scales); ``params`` is ``nnx.to_pure_dict`` (int block keys)."""
    spec = resolve_spec(cfg_model, vocab_size)
    return nnx_build(lambda s: _module(spec, s), NeoxApply, seed)


def make_apply(cfg_model: Mapping | Any, vocab_size: int | None = None) -> NeoxApply:
    """The apply function alone (shapes traced abstractly; no parameter is initialized)."""
    spec = resolve_spec(cfg_model, vocab_size)
    return nnx_make_apply(lambda s: _module(spec, s), NeoxApply)


def abstract_params(cfg_model: Mapping | Any, vocab_size: int | None = None) -> Params:
    """``jax.ShapeDtypeStruct``s of ``build``'s params (nothing allocated)."""
    spec = resolve_spec(cfg_model, vocab_size)
    return nnx_abstract_params(lambda s: _module(spec, s))


# ----------------------------------------------------------------------------- checkpoint


def hf_tensor_names(spec: NeoxSpec) -> list[tuple[tuple[Any, ...], str, bool]]:
    """The mapping table: ``(params key path, HF tensor name, transpose)`` for every leaf."""
    table: list[tuple[tuple[Any, ...], str, bool]] = [
        (("embed_in", "embedding"), "gpt_neox.embed_in.weight", False)
    ]

    def norm_rows(path: tuple[Any, ...], hf: str) -> None:
        table.append(((*path, "scale"), f"{hf}.weight", False))
        table.append(((*path, "bias"), f"{hf}.bias", False))

    def linear_rows(path: tuple[Any, ...], hf: str, bias: bool) -> None:
        table.append(((*path, "kernel"), f"{hf}.weight", True))
        if bias:
            table.append(((*path, "bias"), f"{hf}.bias", False))

    for n in range(spec.num_hidden_layers):
        hf = f"gpt_neox.layers.{n}"
        norm_rows(("blocks", n, "input_layernorm"), f"{hf}.input_layernorm")
        norm_rows(("blocks", n, "post_attention_layernorm"), f"{hf}.post_attention_layernorm")
        bias = spec.attention_bias
        linear_rows(("blocks", n, "attn", "qkv"), f"{hf}.attention.query_key_value", bias)
        linear_rows(("blocks", n, "attn", "dense"), f"{hf}.attention.dense", bias)
        linear_rows(("blocks", n, "mlp", "dense_h_to_4h"), f"{hf}.mlp.dense_h_to_4h", True)
        linear_rows(("blocks", n, "mlp", "dense_4h_to_h"), f"{hf}.mlp.dense_4h_to_h", True)
    norm_rows(("final_layer_norm",), "gpt_neox.final_layer_norm")
    if not spec.tie_word_embeddings:
        table.append((("embed_out", "kernel"), "embed_out.weight", True))
    return table


# transformers 5 names the head ``lm_head`` in the module (``state_dict()``) and renames it to
# ``embed_out`` in the files it writes; either spelling is accepted.
_ALIASES = {"embed_out.weight": "lm_head.weight"}


def params_from_hf(
    tensors: Mapping[str, Any], cfg_model: Mapping | Any, *, strict: bool = True
) -> Params:
    """The nested-dict params of a checkpoint's tensors, through ``hf_tensor_names``' table.

    ``tensors`` maps HF names to arrays (numpy, or anything ``np.asarray`` takes); values keep
    their dtype (the loader casts). A missing tensor, or one of the wrong shape, raises
    ``HFImportError`` naming it; with ``strict`` so does a tensor the table does not use (apart
    from the attention-mask and rotary buffers old checkpoints carry).
    """
    spec = resolve_spec(cfg_model)
    expected = {_path_name(p): s.shape for p, s in _flat_abstract(spec)}
    params: Params = {}
    used: set[str] = set()
    for path, hf_name, transpose in hf_tensor_names(spec):
        name = hf_name
        if name not in tensors and _ALIASES.get(name) in tensors:
            name = _ALIASES[name]
        if name not in tensors:
            raise HFImportError(
                f"the checkpoint has no tensor {hf_name!r} (for {_path_name(path)}; it has "
                f"{len(tensors)} tensors, e.g. {sorted(tensors)[:4]}); is it a complete "
                "GPT-NeoX checkpoint of the config's sizes?"
            )
        used.add(name)
        value = np.asarray(tensors[name])
        if transpose:
            value = value.T
        want = expected[_path_name(path)]
        if value.shape != tuple(want):
            shape = value.T.shape if transpose else value.shape
            raise HFImportError(
                f"tensor {hf_name!r} has shape {tuple(shape)}; the config's sizes need "
                f"{tuple(want[::-1]) if transpose else tuple(want)}"
            )
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    if strict:
        unused = sorted(n for n in tensors if n not in used and not _IGNORED_TENSORS.search(n))
        if spec.tie_word_embeddings:  # a tied checkpoint may still store the head
            unused = [n for n in unused if n not in ("embed_out.weight", "lm_head.weight")]
        if unused:
            raise HFImportError(
                f"the checkpoint has {len(unused)} tensors this GPT-NeoX mapping does not use, "
                f"e.g. {unused[:4]}; is it of another architecture or more layers than "
                f"num_hidden_layers = {spec.num_hidden_layers}?"
            )
    return params


def _path_name(path: tuple[Any, ...]) -> str:
    """A key path as trackstar.tree.path_name writes it (keys joined by "/")."""
    return "/".join(str(k) for k in path)


def _flat_abstract(spec: NeoxSpec) -> list[tuple[tuple[Any, ...], Any]]:
    state = nnx.split(nnx.eval_shape(lambda: _module(spec, 0)), nnx.Param)[1]
    leaves = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))[0]
    return [(tuple(getattr(k, "key", k) for k in p), leaf) for p, leaf in leaves]


MODEL_FAMILY = families.register_family(
    families.ModelFamily(
        name=FAMILY,
        build=build,
        tensor_rules=TENSOR_RULES,
        abstract=abstract_params,
        description="GPT-NeoX / Pythia (Hugging Face GPTNeoXForCausalLM), flax.nnx",
    )
)
