"""The demo LM (a small GPT-2, untied head) against an explicit numpy forward pass, causality,
greedy decoding and target log-probabilities (trackstar.model), size errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from toy_models import demo_lm

from trackstar import families
from trackstar import model as M
from trackstar.hf import gpt2
from trackstar.tree import named_leaves

V = 23
CFG = demo_lm(d_model=16, n_layers=2, n_heads=2, d_ff=24, max_len=12, dtype="float32")


@pytest.fixture(scope="module")
def lm():
    return families.make_model(CFG, V, seed=0)


def _layernorm(x, p, eps=1e-5):  # GPT-2's layer_norm_epsilon
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _gelu(x):  # tanh approximation: GPT-2's gelu_new
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _reference_logits(params, tokens_T, n_heads):
    """One example, written out with explicit loops over heads and positions."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    T = len(tokens_T)
    x = p["embed"]["embedding"][tokens_T] + p["pos_embed"]["embedding"][:T]
    for i in range(len(p["blocks"])):
        b = p["blocks"][i]
        h = _layernorm(x, b["attn_norm"])
        qkv = h @ b["attn"]["qkv"]["kernel"] + b["attn"]["qkv"]["bias"]
        D = x.shape[-1]
        K = D // n_heads
        q, k, v = qkv[:, :D], qkv[:, D : 2 * D], qkv[:, 2 * D :]
        heads = []
        for hd in range(n_heads):
            sl = slice(hd * K, (hd + 1) * K)
            out = np.zeros((T, K))
            for t in range(T):
                s = np.array([q[t, sl] @ k[u, sl] / np.sqrt(K) for u in range(t + 1)])
                a = np.exp(s - s.max())
                a /= a.sum()
                out[t] = a @ v[: t + 1, sl]
            heads.append(out)
        x = x + np.concatenate(heads, -1) @ b["attn"]["out"]["kernel"] + b["attn"]["out"]["bias"]
        h = _layernorm(x, b["mlp_norm"])
        h = _gelu(h @ b["mlp"]["fc_in"]["kernel"] + b["mlp"]["fc_in"]["bias"])
        x = x + h @ b["mlp"]["fc_out"]["kernel"] + b["mlp"]["fc_out"]["bias"]
    x = _layernorm(x, p["final_norm"])
    return x @ p["unembed"]["kernel"]  # an untied head without bias, as GPT-2's lm_head


def test_forward_matches_explicit_formula_and_paths_are_stable(lm):
    apply_fn, params = lm
    tokens = jax.random.randint(jax.random.key(1), (3, 9), 0, V)
    logits = jax.jit(apply_fn)(params, tokens)
    assert logits.shape == (3, 9, V) and logits.dtype == jnp.float32
    for b in range(3):
        ref = _reference_logits(params, np.asarray(tokens[b]), CFG["n_heads"])
        np.testing.assert_allclose(np.asarray(logits[b]), ref, rtol=2e-4, atol=2e-4)

    names = dict(named_leaves(params))
    assert names["blocks/1/attn/qkv/kernel"].shape == (16, 48)
    assert names["embed/embedding"].shape == (V, 16)
    assert names["unembed/kernel"].shape == (16, V)
    assert names["pos_embed/embedding"].shape == (12, 16)
    assert all(leaf.ndim in (1, 2) for leaf in names.values())
    assert M.count_params(params) == sum(int(x.size) for x in names.values())
    # The nnx module rebuilt from params holds exactly those params.
    module = apply_fn.module(params)
    assert isinstance(module, gpt2.GPT2LM)
    back = dict(named_leaves(nnx.to_pure_dict(nnx.state(module, nnx.Param))))
    assert back.keys() == names.keys()
    assert all(np.array_equal(back[k], names[k]) for k in names)


def test_causal_masking(lm):
    apply_fn, params = lm
    apply_jit = jax.jit(apply_fn)
    tokens = jax.random.randint(jax.random.key(2), (1, 10), 0, V)
    base = np.asarray(apply_jit(params, tokens))
    for t in (3, 7, 9):
        changed = tokens.at[0, t].set((tokens[0, t] + 5) % V)
        out = np.asarray(apply_jit(params, changed))
        np.testing.assert_array_equal(out[0, :t], base[0, :t])
        assert not np.allclose(out[0, t], base[0, t])


def _greedy(apply_jit, params, prompt, n, T=7):
    """Explicit greedy decoding, one token at a time (fixed padded length: one compilation)."""
    seq = list(prompt)
    for _ in range(n):
        padded = jnp.array([seq + [0] * (T - len(seq))])
        seq.append(int(jnp.argmax(apply_jit(params, padded)[0, len(seq) - 1])))
    return np.array(seq[len(prompt) :])


def test_greedy_correct_and_target_logprob_match_decoding(lm):
    apply_fn, params = lm
    apply_jit = jax.jit(apply_fn)
    prompt = [1, 5, 9, 4]
    seq = prompt + _greedy(apply_jit, params, prompt, 3).tolist()
    tokens = np.array([seq, seq, seq], np.int32)
    tokens[1, 5] = (tokens[1, 5] + 1) % V  # A wrong second target token.
    tokens[2, 3] = (tokens[2, 3] + 1) % V  # Another prompt: its greedy answer may differ.
    weights = np.zeros(tokens.shape, np.float32)
    weights[:, 4:] = 1
    correct = np.asarray(M.greedy_correct(apply_fn, params, tokens, weights))
    third = bool((tokens[2, 4:] == _greedy(apply_jit, params, tokens[2, :4], 3)).all())
    assert correct.tolist() == [True, False, third]

    lp = np.asarray(M.target_logprob(apply_fn, params, tokens, weights))
    logits = np.asarray(apply_jit(params, jnp.asarray(tokens)), np.float64)
    for b in range(3):
        ref = 0.0
        for t in range(4, 7):
            row = logits[b, t - 1] - np.log(np.sum(np.exp(logits[b, t - 1])))
            ref += row[tokens[b, t]]
        np.testing.assert_allclose(lp[b], ref, rtol=1e-5, atol=1e-5)


def test_greedy_answer_is_the_argmax_at_the_targets_and_its_logprob(lm):
    apply_fn, params = lm
    apply_jit = jax.jit(apply_fn)
    prompt = [1, 5, 9, 4]
    seq = prompt + _greedy(apply_jit, params, prompt, 3).tolist()
    tokens = np.array([seq, seq], np.int32)
    tokens[1, 5] = (tokens[1, 5] + 1) % V  # A teacher-forced prefix off the greedy path.
    weights = np.zeros(tokens.shape, np.float32)
    weights[:, 4:] = 1
    pred, lp = (np.asarray(x) for x in M.greedy_answer(apply_fn, params, tokens, weights))
    # On the greedy path the answer is the greedy continuation itself.
    np.testing.assert_array_equal(pred[0, 4:], tokens[0, 4:])
    logits = np.asarray(apply_jit(params, jnp.asarray(tokens)), np.float64)
    for b in range(2):
        ref = 0.0
        for t in range(4, 7):
            row = logits[b, t - 1] - np.log(np.sum(np.exp(logits[b, t - 1])))
            assert pred[b, t] == np.argmax(row)
            ref += row.max()
        np.testing.assert_allclose(lp[b], ref, rtol=1e-5, atol=1e-5)
    # The model's confidence in its own answer is at least its confidence in any target.
    assert np.all(lp >= np.asarray(M.target_logprob(apply_fn, params, tokens, weights)) - 1e-5)


def test_presets_overrides_and_bad_sizes():
    spec = gpt2.resolve(dict(size="small", d_model=0, n_layers=0, n_heads=0, d_ff=0), 700)
    assert (spec.d_model, spec.n_layers, spec.n_heads, spec.d_ff, spec.max_len) == (
        128,
        2,
        4,
        512,
        64,
    )
    assert spec.d_model == M.SIZES["small"]["d_model"]
    spec = gpt2.resolve(dict(size="tiny", d_model=48, n_heads=3), 50)
    assert (spec.d_model, spec.n_heads, spec.head_dim, spec.n_layers) == (48, 3, 16, 1)
    with pytest.raises(M.ModelConfigError, match="not divisible by model.n_heads"):
        families.make_model(dict(CFG, d_model=30, n_heads=4), 50, 0)
    with pytest.raises(M.ModelConfigError, match="unknown model size"):
        gpt2.resolve(dict(size="huge"), 50)
    with pytest.raises(M.ModelConfigError, match="negative"):
        gpt2.resolve(dict(size="tiny", d_ff=-1), 50)
    with pytest.raises(M.ModelConfigError, match="vocab_size"):
        gpt2.resolve(dict(size="tiny"), 0)
    # The project's former own family is refused with the fix.
    with pytest.raises(M.ModelConfigError, match="model.family = 'gpt2'.*tie_word_embeddings"):
        families.make_model(dict(family="transformer"), 50, 0)


def test_too_long_tokens_raise(lm):
    apply_fn, params = lm
    with pytest.raises(ValueError, match="exceeds GPT-2's n_positions 12"):
        apply_fn(params, jnp.zeros((1, 13), jnp.int32))
