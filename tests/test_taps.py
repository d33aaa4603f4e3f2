"""The tap contract (trackstar.taps): documented kinds, what the models emit, the helpers."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tolerances import assert_close
from toy_models import build_toy_family

from trackstar import families, taps
from trackstar.tree import named_leaves

VOCAB = 23
TOKENS = jnp.asarray([[1, 5, 7, 2, 9, 4], [3, 3, 8, 0, 0, 0]], jnp.int32)


def _models():
    cfg = dict(size="tiny", d_model=16, n_layers=2, n_heads=2, d_ff=24, max_len=8)
    return {
        "gpt2_untied": families.make_model(
            dict(cfg, family="gpt2", tie_word_embeddings=False), VOCAB, seed=0
        ),
        "toy_rms": build_toy_family(dict(d_model=8, d_ff=12, n_layers=2), VOCAB, seed=0),
        "gpt2": families.make_model(dict(cfg, family="gpt2"), VOCAB, seed=0),
    }


def _record(apply_fn, params):
    calls = []

    def tap(kind, path, x, y):
        calls.append((kind, path, x, y))
        return y

    logits = apply_fn.tapped(params, TOKENS, tap)
    return calls, logits


def _node(params, path):
    for key in path.split("/"):
        params = params[int(key)] if isinstance(params, list) else params[_key(params, key)]
    return params


def _key(d, key):
    return int(key) if key not in d and key.isdigit() else key


def test_documented_kinds_are_the_kinds_handled():
    # The bullet list of the module docstring names exactly TAP_KINDS, in order.
    documented = re.findall(r'^- ``"(\w+)"``:', taps.__doc__, flags=re.M)
    assert tuple(documented) == taps.TAP_KINDS == ("dense", "embed", "scale_shift", "unembed")
    with pytest.raises(ValueError, match="unknown tap kind 'conv'"):
        taps.emit("conv", "x", jnp.ones(2), jnp.ones(2))


@pytest.mark.parametrize("name", ["gpt2_untied", "toy_rms", "gpt2"])
def test_models_emit_the_documented_kinds_with_their_meaning(name):
    apply_fn, params = _models()[name]
    calls, logits = _record(apply_fn, params)
    # The tapped forward is the plain forward.
    assert_close(logits, apply_fn(params, TOKENS), rtol=1e-6, peak_rtol=1e-6)
    if name == "gpt2_untied":  # the demo model's configuration: every kind but the tied head's
        assert {k for k, *_ in calls} == set(taps.TAP_KINDS) - {"unembed"}
    if name == "gpt2":  # GPT-2's head is its token embedding: every kind
        assert {k for k, *_ in calls} == set(taps.TAP_KINDS)
    covered = set()
    B, T = TOKENS.shape
    for kind, path, x, y in calls:
        node = _node(params, path)
        assert jnp.broadcast_shapes(y.shape[:-1], (B, T)) == (B, T), (path, y.shape)
        bias = node["bias"] if "bias" in node else 0.0
        if kind == "dense":
            want = x @ node["kernel"] + bias
            covered |= {f"{path}/kernel", f"{path}/bias"}
        elif kind == "embed":
            assert jnp.issubdtype(x.dtype, jnp.integer)
            want = node["embedding"][x]
            covered.add(f"{path}/embedding")
        elif kind == "unembed":
            want = x @ node["embedding"].T
            covered.add(f"{path}/embedding")
        else:
            want = x * node["scale"] + bias
            covered |= {f"{path}/scale", f"{path}/bias"}
        np.testing.assert_allclose(y, want, rtol=2e-5, atol=2e-5, err_msg=f"{kind} {path}")
    # Every parameter is covered by some tap (rule 2 of the contract).
    assert {p for p, _ in named_leaves(params)} <= covered


def test_models_follow_the_protocols():
    for apply_fn, _ in _models().values():
        assert isinstance(apply_fn, taps.TappedApplyFn) and taps.has_taps(apply_fn)

    def plain(params, tokens):
        return params * tokens

    assert isinstance(plain, taps.ApplyFn)
    assert not isinstance(plain, taps.TappedApplyFn) and not taps.has_taps(plain)


def test_helpers_are_the_plain_ops_without_a_tap_and_report_with_one():
    rngs = nnx.Rngs(0)
    lin, emb = nnx.Linear(4, 3, rngs=rngs), nnx.Embed(7, 4, rngs=rngs)
    ln = nnx.LayerNorm(4, rngs=rngs)
    rms = nnx.RMSNorm(4, rngs=rngs)
    ln.scale[...] = jnp.asarray([0.5, 1.0, 1.5, 2.0])
    ln.bias[...] = jnp.asarray([0.1, -0.2, 0.3, 0.0])
    rms.scale[...] = jnp.asarray([2.0, 1.0, 0.5, 1.5])
    h = jax.random.normal(jax.random.key(1), (2, 3, 4)) * 3 + 1
    ids = jnp.asarray([[1, 2, 6]])
    assert not taps.active()
    np.testing.assert_array_equal(taps.dense(lin, h), lin(h))
    np.testing.assert_array_equal(taps.embed(emb, ids), emb(ids))
    np.testing.assert_array_equal(taps.norm(ln, h), ln(h))
    np.testing.assert_array_equal(taps.norm(rms, h), rms(h))
    np.testing.assert_allclose(taps.unembed(emb, h), h @ emb.embedding[...].T, rtol=1e-6)

    seen = {}

    def tap(kind, path, x, y):
        seen[path] = (kind, x, y)
        return y + 1.0

    root = nnx.Dict(lin=lin, emb=emb, ln=ln, rms=rms)
    with taps.tapping(tap, root):
        assert taps.active()
        np.testing.assert_allclose(taps.dense(lin, h), lin(h) + 1.0)
        taps.embed(emb, ids)
        taps.norm(ln, h)
        taps.norm(rms, h)
        assert taps.emit("dense", "by/path", h, h) is not None
        stray = nnx.Linear(4, 3, rngs=rngs)
        with pytest.raises(ValueError, match="not part of the tapped module"):
            taps.dense(stray, h)
    assert not taps.active()
    assert {k: v[0] for k, v in seen.items()} == {
        "lin": "dense",
        "emb": "embed",
        "ln": "scale_shift",
        "rms": "scale_shift",
        "by/path": "dense",
    }
    # A norm's x is its normalized input: y = x * scale (+ bias).
    _, x, y = seen["ln"]
    np.testing.assert_allclose(x * ln.scale[...] + ln.bias[...], y, rtol=1e-5, atol=1e-5)
    _, x, y = seen["rms"]
    np.testing.assert_allclose(x * rms.scale[...], y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jnp.mean(x * x, -1), 1.0, rtol=1e-4)

    # The tied head: the embedding table transposed, offered as "unembed" with x = h.
    heads = []
    with taps.tapping(lambda *a: heads.append(a) or a[3], root):
        taps.unembed(emb, h)
    ((kind, path, x, y),) = heads
    assert (kind, path) == ("unembed", "emb") and x is h
    np.testing.assert_allclose(y, h @ emb.embedding[...].T, rtol=1e-6)
