"""Tail-patch on a tiny trained causal LM: vmapped batches vs explicit per-pair formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from trackstar import tailpatch

V, D, S = 16, 16, 6  # vocab, width, candidate length
BOS, BORN = 1, 2
SUBJ = [3, 4, 5, 6]
OBJ = [7, 8, 9, 10]
FILLER = [11, 12, 13, 14, 15]


def apply_fn(params, tokens_BxT):
    """A causal bag-of-words LM: the current token plus the mean of all tokens so far."""
    emb_BxTxD = params["embed"][tokens_BxT]
    steps_T = jnp.arange(1, tokens_BxT.shape[1] + 1, dtype=jnp.float32)
    ctx_BxTxD = jnp.cumsum(emb_BxTxD, axis=1) / steps_T[None, :, None]
    h = jnp.tanh(
        jnp.concatenate([emb_BxTxD, ctx_BxTxD], -1) @ params["mlp"]["w"] + params["mlp"]["b"]
    )
    return h @ params["out"]["w"] + params["out"]["b"]


def _pad(seq, n):
    return seq + [0] * (n - len(seq))


# Candidates: the four fact sentences "s_i born o_i", then a longer filler sentence.
CAND = [[BOS, s, BORN, o] for s, o in zip(SUBJ, OBJ, strict=True)] + [[BOS, *FILLER]]
CAND_T = np.array([_pad(c, S) for c in CAND], np.int32)
CAND_W = np.array([_pad([0.0] + [1.0] * (len(c) - 1), S) for c in CAND], np.float32)
QUERY_T = np.array([[BOS, s, BORN, o] for s, o in zip(SUBJ, OBJ, strict=True)], np.int32)
QUERY_W = np.tile(np.array([[0.0, 0.0, 0.0, 1.0]], np.float32), (4, 1))
FILLER_ID = 4
OPT = optax.adamw(1e-2, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.01)


def _loss(params, tokens_T, weights_T):
    """Summed next-token cross-entropy, written densely with one-hot targets."""
    logp_TxV = jax.nn.log_softmax(apply_fn(params, tokens_T[None])[0], axis=-1)
    onehot_TxV = jax.nn.one_hot(tokens_T[1:], V)
    return -jnp.sum(weights_T[1:, None] * onehot_TxV * logp_TxV[:-1])


@pytest.fixture(scope="module")
def trained():
    keys = jax.random.split(jax.random.key(0), 3)
    params = {
        "embed": 0.5 * jax.random.normal(keys[0], (V, D)),
        "mlp": {"w": jax.random.normal(keys[1], (2 * D, D)) / np.sqrt(2 * D), "b": jnp.zeros(D)},
        "out": {"w": jax.random.normal(keys[2], (D, V)) / np.sqrt(D), "b": jnp.zeros(V)},
    }
    opt_state = OPT.init(params)

    @jax.jit
    def step(params, opt_state):
        loss = lambda p: jnp.mean(jax.vmap(_loss, (None, 0, 0))(p, CAND_T, CAND_W))
        grads = jax.grad(loss)(params)
        updates, opt_state = OPT.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    for _ in range(40):
        params, opt_state = step(params, opt_state)
    adam = opt_state[0]
    nu_hat = jax.tree.map(lambda n: n / (1 - 0.98**adam.count), adam.nu)
    precond = jax.tree.map(lambda n: 1.0 / (jnp.sqrt(n) + 1e-8), nu_hat)
    return params, opt_state, precond


# The reference path is jitted only to keep the test fast; it shares no code with tailpatch.
_grad = jax.jit(jax.grad(_loss))
_prob = jax.jit(lambda params, tokens_T, weights_T: jnp.exp(-_loss(params, tokens_T, weights_T)))


def _target_prob(params, q):
    return float(_prob(params, QUERY_T[q], QUERY_W[q]))


def _loop_delta(params, precond, q, m, lr, s, mult):
    g = _grad(params, CAND_T[m], CAND_W[m])
    patched = jax.tree.map(lambda p, gi, c: p - mult * lr * s * gi * c, params, g, precond)
    return _target_prob(patched, q) - _target_prob(params, q)


# Each query's own fact sentence first, then the filler; query 3 has only one proponent.
IDS = np.array([[0, FILLER_ID], [1, FILLER_ID], [2, FILLER_ID], [3, -1]])
LR, MULTS = 1e-2, (1.0, 3.0)


def test_model_is_partly_trained(trained):
    probs = [_target_prob(trained[0], q) for q in range(4)]
    assert all(0.05 < p < 0.95 for p in probs), probs


@pytest.mark.parametrize("scale", ["single", "batch_share"])
def test_vmapped_batches_equal_per_pair_loop(trained, scale):
    params, _, precond = trained
    deltas = tailpatch.tailpatch_sweep(
        apply_fn,
        params,
        QUERY_T,
        QUERY_W,
        CAND_T,
        CAND_W,
        IDS,
        lr=LR,
        lr_multipliers=MULTS,
        precond=precond,
        scale=scale,
        tokens_per_batch=8,
        pair_batch=3,
    )
    assert deltas.shape == (2, 4, 2) and np.isnan(deltas[:, 3, 1]).all()
    for mi, mult in enumerate(MULTS):
        for q, k in zip(*np.nonzero(IDS >= 0), strict=True):
            m = IDS[q, k]
            s = 1 / CAND_W[m].sum() if scale == "single" else 1 / 8
            want = _loop_delta(params, precond, q, m, LR, s, mult)
            np.testing.assert_allclose(deltas[mi, q, k], want, rtol=2e-3, atol=2e-6)
    # The query's own fact sentence helps it, and more than the filler sentence does.
    own, filler = deltas[0, :3, 0], deltas[0, :3, 1]
    assert (own > 0).all() and (own > filler + 1e-4).all(), (own, filler)
    at_k = tailpatch.tailpatch_at_k(deltas[0], ks=(1, 2))
    assert at_k["tailpatch@1"] == pytest.approx(100 * deltas[0, :, 0].mean())
    assert at_k["tailpatch@2"] == pytest.approx(
        100 * np.mean([*deltas[0, :3].mean(1), deltas[0, 3, 0]])  # query 3: one proponent
    )


def test_scale_single_equals_batch_share_at_own_token_count(trained):
    params, _, precond = trained
    # Fact sentences only: 3 counted tokens each.
    args = (apply_fn, params, QUERY_T, QUERY_W, CAND_T, CAND_W, IDS[:, :1])
    kw = dict(lr=LR, precond=precond, pair_batch=3)
    single = tailpatch.tailpatch_deltas(*args, scale="single", **kw)
    share = tailpatch.tailpatch_deltas(*args, scale="batch_share", tokens_per_batch=3, **kw)
    np.testing.assert_allclose(single, share, rtol=1e-6)
    assert (single > 0).all()
    smaller = [
        tailpatch.tailpatch_deltas(*args, scale="batch_share", tokens_per_batch=n, **kw)
        for n in (300, 3000)
    ]
    # Far smaller steps are in the linear regime: 10x smaller step, 10x smaller delta.
    np.testing.assert_allclose(smaller[1] * 10, smaller[0], rtol=0.05)


def test_carry_momentum_matches_optimizer_difference_and_zero_gradient(trained):
    params, opt_state, _ = trained
    cand_w = CAND_W.copy()
    cand_w[FILLER_ID] = 0.0  # no counted tokens: zero gradient
    deltas = tailpatch.tailpatch_sweep(
        apply_fn,
        params,
        QUERY_T,
        QUERY_W,
        CAND_T,
        cand_w,
        IDS,
        lr=LR,
        lr_multipliers=MULTS,
        scale="batch_share",
        tokens_per_batch=8,
        carry_momentum=True,
        optimizer=OPT,
        opt_state=opt_state,
        pair_batch=3,
    )
    np.testing.assert_allclose(deltas[:, :3, 1], 0.0, atol=1e-7)
    zero = jax.tree.map(jnp.zeros_like, params)
    u0, _ = OPT.update(zero, opt_state, params)
    for mi, mult in enumerate(MULTS):
        for q in range(4):
            g = _grad(params, CAND_T[q], cand_w[q])
            ug, _ = OPT.update(jax.tree.map(lambda x: x / 8, g), opt_state, params)
            patched = jax.tree.map(lambda p, a, b, mult=mult: p + mult * (a - b), params, ug, u0)
            want = _target_prob(patched, q) - _target_prob(params, q)
            np.testing.assert_allclose(deltas[mi, q, 0], want, rtol=2e-3, atol=2e-6)
    assert (deltas[0, :3, 0] > 0).all()


def test_sweep_table_and_at_k_on_known_deltas():
    deltas = np.array([[[0.01, 0.03], [0.02, np.nan]], [[0.1, 0.3], [0.2, 0.0]]])
    rows = tailpatch.sweep_table(deltas, [1.0, 10.0], lr=3e-4, ks=(1, 2))
    assert rows[0]["lr"] == pytest.approx(3e-4) and rows[1]["lr_multiplier"] == 10.0
    assert rows[0]["tailpatch@1"] == pytest.approx(1.5)  # mean(1, 2) pp
    assert rows[0]["tailpatch@2"] == pytest.approx(2.0)  # mean(2, 2) pp: NaN left out
    assert rows[1]["tailpatch@2"] == pytest.approx(15.0)
    assert rows[1]["tailpatch@1_se"] == pytest.approx(np.std([10, 20], ddof=1) / np.sqrt(2))


def test_bad_inputs_raise(trained):
    params, _, precond = trained
    args = (apply_fn, params, QUERY_T, QUERY_W, CAND_T, CAND_W, IDS)
    with pytest.raises(tailpatch.TailPatchError, match="tokens_per_batch"):
        tailpatch.tailpatch_deltas(*args, lr=LR, precond=precond)
    with pytest.raises(tailpatch.TailPatchError, match="scale"):
        tailpatch.tailpatch_deltas(*args, lr=LR, precond=precond, scale="full")
    with pytest.raises(tailpatch.TailPatchError, match="precond"):
        tailpatch.tailpatch_deltas(
            *args, lr=LR, precond={"embed": precond["embed"]}, scale="single"
        )
    with pytest.raises(tailpatch.TailPatchError, match="optimizer"):
        tailpatch.tailpatch_deltas(*args, lr=LR, scale="single", carry_momentum=True)
    with pytest.raises(tailpatch.TailPatchError, match="out of range"):
        tailpatch.tailpatch_deltas(*args[:-1], IDS + 5, lr=LR, precond=precond, scale="single")
