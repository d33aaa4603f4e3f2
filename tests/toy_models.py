"""Tiny models for tests, each returned as ``(apply_fn, params)``.

``apply_fn(params, tokens_BxT) -> logits_BxTxV`` is pure over a nested-dict params pytree, the
same contract the project's own model follows. Two structurally different models prove the
attribution kernels are model-agnostic:

- ``make_toy_transformer``: a causal pre-norm Transformer LM written with flax.nnx (embeddings,
  attention, MLP, LayerNorm scales and biases, untied output head).
- ``make_toy_gru``: a plain-dict GRU LM (no flax) with a 3-D gate tensor, a scalar parameter and
  a bias vector, run with ``lax.scan``.

``demo_lm(**sizes)`` is the ``model`` config of the project's demo LM (the gpt2 family, untied
head) at test sizes; ``padded_batch`` a right-padded token batch with its attention mask.

``TOY_FAMILY`` is a second model family (``trackstar.families``) written as plain functions that
follows the tap contract of ``trackstar.taps``, so it takes the fast path: a Llama-like
residual LM with RMSNorms (scale only), bias-free dense layers, a causal running-mean token
mixer, a position table shared by all rows, a tied second use of the token embedding and a final
LayerNorm (scale and bias). ``build_toy_family`` is its ``build``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from trackstar import correction, taps
from trackstar.families import ModelFamily
from trackstar.tree import path_name


def demo_lm(**sizes) -> dict:
    """The demo LM's ``model`` config section (configs/demo.py: gpt2, untied head) at ``sizes``."""
    return dict(family="gpt2", tie_word_embeddings=False, size="tiny", **sizes)


def padded_batch(
    lengths: tuple[int, ...], vocab: int, seed: int, low: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Random ids in ``[low, vocab)``, right-padded with 0 to the longest length, and its mask."""
    rng = np.random.default_rng(seed)
    tokens = np.zeros((len(lengths), max(lengths)), np.int64)
    mask = np.zeros((len(lengths), max(lengths)), np.int64)
    for i, n in enumerate(lengths):
        tokens[i, :n] = rng.integers(low, vocab, n)
        mask[i, :n] = 1
    return tokens, mask


class _Block(nnx.Module):
    def __init__(self, d_model: int, n_heads: int, d_ff: int, rngs: nnx.Rngs):
        self.n_heads = n_heads
        self.ln1 = nnx.LayerNorm(d_model, rngs=rngs)
        self.qkv = nnx.Linear(d_model, 3 * d_model, rngs=rngs)
        self.proj = nnx.Linear(d_model, d_model, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d_model, rngs=rngs)
        self.up = nnx.Linear(d_model, d_ff, rngs=rngs)
        self.down = nnx.Linear(d_ff, d_model, rngs=rngs)

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        b, t, d = x_BxTxD.shape
        h = self.n_heads
        q, k, v = jnp.split(self.qkv(self.ln1(x_BxTxD)), 3, axis=-1)
        q, k, v = (y.reshape(b, t, h, d // h) for y in (q, k, v))
        logits_BxHxTxT = jnp.einsum("bqhc,bkhc->bhqk", q, k) / math.sqrt(d // h)
        causal_TxT = jnp.tril(jnp.ones((t, t), dtype=jnp.bool_))
        logits_BxHxTxT = jnp.where(causal_TxT, logits_BxHxTxT, -1e9)
        attn = jnp.einsum("bhqk,bkhc->bqhc", jax.nn.softmax(logits_BxHxTxT, -1), v)
        x_BxTxD = x_BxTxD + self.proj(attn.reshape(b, t, d))
        return x_BxTxD + self.down(jax.nn.gelu(self.up(self.ln2(x_BxTxD))))


class _ToyLM(nnx.Module):
    def __init__(self, vocab: int, d_model: int, n_layers: int, n_heads: int, d_ff: int, max_len,
                 rngs: nnx.Rngs):  # fmt: skip
        self.embed = nnx.Embed(vocab, d_model, rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (max_len, d_model)))
        self.blocks = nnx.List([_Block(d_model, n_heads, d_ff, rngs) for _ in range(n_layers)])
        self.ln_f = nnx.LayerNorm(d_model, rngs=rngs)
        self.head = nnx.Linear(d_model, vocab, rngs=rngs)

    def __call__(self, tokens_BxT: jax.Array) -> jax.Array:
        x = self.embed(tokens_BxT) + self.pos[...][: tokens_BxT.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def make_toy_transformer(
    vocab: int = 29,
    d_model: int = 16,
    n_layers: int = 1,
    n_heads: int = 2,
    d_ff: int = 32,
    max_len: int = 16,
    seed: int = 0,
):
    """A causal nnx Transformer LM as ``(apply_fn, params)`` (params: a nested dict)."""
    # Shapes only, then numpy values: eager jax init would compile dozens of tiny ops.
    abstract = nnx.eval_shape(
        lambda: _ToyLM(vocab, d_model, n_layers, n_heads, d_ff, max_len, nnx.Rngs(seed))
    )
    graphdef, state = nnx.split(abstract, nnx.Param)
    rng = np.random.default_rng(seed)

    def init(path, leaf):
        name = path_name(path)
        if name.endswith("scale"):
            return jnp.ones(leaf.shape, leaf.dtype)
        if name.endswith("bias"):  # small nonzero so bias gradients are not trivial
            return jnp.asarray(0.02 * rng.standard_normal(leaf.shape), leaf.dtype)
        std = 0.02 if name == "pos" else 1.0 / math.sqrt(leaf.shape[0])
        return jnp.asarray(std * rng.standard_normal(leaf.shape), leaf.dtype)

    params = jax.tree_util.tree_map_with_path(init, nnx.to_pure_dict(state))

    def apply_fn(p, tokens_BxT: jax.Array) -> jax.Array:
        st = jax.tree.map(lambda x: x, state)  # fresh container: replace_by_pure_dict mutates
        nnx.replace_by_pure_dict(st, p)
        return nnx.merge(graphdef, st)(tokens_BxT)

    return apply_fn, params


def make_toy_gru(vocab: int = 23, hidden: int = 8, seed: int = 0):
    """A plain-dict GRU LM as ``(apply_fn, params)``.

    The three gates share one 3-D tensor ``gates/w`` (3 x H x H) and ``gates/u``; ``temp`` is a
    scalar logit temperature, so every tensor rank from 0 to 3 is present.
    """
    rng = np.random.default_rng(seed)
    s = 1.0 / math.sqrt(hidden)

    def normal(shape, std):
        return jnp.asarray(std * rng.standard_normal(shape), jnp.float32)

    params = {
        "embed": normal((vocab, hidden), s),
        "gates": {
            "w": normal((3, hidden, hidden), s),
            "u": normal((3, hidden, hidden), s),
            "b": normal((3, hidden), 0.1),
        },
        "out": {"w": normal((hidden, vocab), s), "b": normal((vocab,), 0.02)},
        "temp": jnp.asarray(1.0, jnp.float32),
    }

    def apply_fn(p, tokens_BxT: jax.Array) -> jax.Array:
        x_TxBxH = jnp.swapaxes(p["embed"][tokens_BxT], 0, 1)

        def step(h_BxH, x_BxH):
            gx = jnp.einsum("bh,ghk->gbk", x_BxH, p["gates"]["w"]) + p["gates"]["b"][:, None]
            gh = jnp.einsum("bh,ghk->gbk", h_BxH, p["gates"]["u"])
            r = jax.nn.sigmoid(gx[0] + gh[0])
            z = jax.nn.sigmoid(gx[1] + gh[1])
            n = jnp.tanh(gx[2] + r * gh[2])
            h_BxH = (1 - z) * n + z * h_BxH
            return h_BxH, h_BxH

        h0 = jnp.zeros((tokens_BxT.shape[0], p["embed"].shape[1]), x_TxBxH.dtype)
        _, hs_TxBxH = jax.lax.scan(step, h0, x_TxBxH)
        logits = jnp.swapaxes(hs_TxBxH, 0, 1) @ p["out"]["w"] + p["out"]["b"]
        return logits * p["temp"]

    return apply_fn, params


class ToyTappedLM:
    """The apply function of ``TOY_FAMILY``: plain functions over a nested dict, with taps."""

    def __init__(self, n_layers: int, eps: float = 1e-6):
        self.n_layers = n_layers
        self.eps = eps

    def __call__(self, p, tokens_BxT: jax.Array) -> jax.Array:
        return self._forward(p, tokens_BxT)

    def tapped(self, p, tokens_BxT: jax.Array, tap) -> jax.Array:
        with taps.tapping(tap):
            return self._forward(p, tokens_BxT)

    def _forward(self, p, tokens_BxT: jax.Array) -> jax.Array:
        emit = taps.emit
        T = tokens_BxT.shape[1]

        def dense(path, x):
            node = p
            for key in path.split("/"):
                node = node[key]
            y = x @ node["kernel"]
            return emit("dense", path, x, y + node["bias"] if "bias" in node else y)

        table = p["embed"]["embedding"]
        pos_T = jnp.arange(T)
        # The token embedding is used twice (current and previous token): a tied parameter.
        prev_BxT = jnp.concatenate([tokens_BxT[:, :1], tokens_BxT[:, :-1]], axis=1)
        x = emit("embed", "embed", tokens_BxT, table[tokens_BxT])
        x = x + 0.5 * emit("embed", "embed", prev_BxT, table[prev_BxT])
        x = x + emit("embed", "pos", pos_T, p["pos"]["embedding"][pos_T])  # (T, D), shared
        for i in range(self.n_layers):
            layer = p["layers"][str(i)]
            xhat = taps.rms_norm_input(x, self.eps)
            h = emit("scale_shift", f"layers/{i}/norm", xhat, xhat * layer["norm"]["scale"])
            # Causal running mean over positions: rows never mix, position t sees <= t.
            m = dense(f"layers/{i}/mix", h)
            m = jnp.cumsum(m, axis=1) / jnp.arange(1, T + 1, dtype=m.dtype)[:, None]
            x = x + m
            up = jax.nn.gelu(dense(f"layers/{i}/up", x))
            x = x + dense(f"layers/{i}/down", up)
        xhat = taps.layer_norm_input(x, self.eps)
        norm = p["final_norm"]
        x = emit("scale_shift", "final_norm", xhat, xhat * norm["scale"] + norm["bias"])
        return dense("head", x).astype(jnp.float32)


# Tensor-parallel rules of TOY_FAMILY: column-parallel mix/up, row-parallel down.
TOY_TENSOR_RULES = (
    (r"(^|/)(mix|up)/kernel$", (None, "model")),
    (r"(^|/)up/bias$", ("model",)),
    (r"(^|/)down/kernel$", ("model", None)),
    (r".*", ()),
)


def build_toy_family(cfg_model, vocab_size: int, seed: int):
    """``TOY_FAMILY.build``: ``(ToyTappedLM, params)``, sized by d_model, d_ff, n_layers."""
    get = cfg_model.get
    d, f, n = int(get("d_model", 8) or 8), int(get("d_ff", 12) or 12), int(get("n_layers", 2) or 2)
    max_len = int(get("max_len", 16) or 16)
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape) / math.sqrt(shape[0]), jnp.float32)

    def near_one(n_):
        return jnp.asarray(1 + 0.1 * rng.standard_normal(n_), jnp.float32)

    params = {
        "embed": {"embedding": normal(vocab_size, d)},
        "pos": {"embedding": 0.1 * normal(max_len, d)},
        "layers": {
            str(i): {
                "norm": {"scale": near_one(d)},
                "mix": {"kernel": normal(d, d)},
                "up": {"kernel": normal(d, f), "bias": 0.1 * normal(f)},
                "down": {"kernel": normal(f, d)},
            }
            for i in range(n)
        },
        "final_norm": {"scale": near_one(d), "bias": 0.1 * normal(d)},
        "head": {"kernel": normal(d, vocab_size), "bias": 0.1 * normal(vocab_size)},
    }
    return ToyTappedLM(n), params


TOY_FAMILY = ModelFamily(
    name="toy_rms",
    build=build_toy_family,
    tensor_rules=TOY_TENSOR_RULES,
    description="tests: a plain-function Llama-like LM with taps (tests/toy_models.py)",
)


def random_preconditioner(kind: str, params):
    """A preconditioner for ``params``: ``None`` (``kind="none"``); ``"adam"``, an elementwise
    V (random positive, shaped like the params); otherwise (``"factored"``) Adafactor's, after
    two real steps (every matrix with both dims >= 4 factored)."""
    if kind == "none":
        return None
    if kind == "adam":
        rng = np.random.default_rng(1)
        return jax.tree.map(
            lambda x: jnp.asarray(rng.uniform(0.3, 3.0, x.shape), jnp.float32), params
        )
    opt = optax.adafactor(1e-2, min_dim_size_to_factor=4, multiply_by_parameter_scale=False)
    state = opt.init(params)
    rng = np.random.default_rng(2)
    for _ in range(2):
        grads = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), params)
        _, state = opt.update(grads, state, params)
    return correction.preconditioner(state, params)
