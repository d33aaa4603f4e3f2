"""Tail-patch on a tiny trained causal LM: vmapped batches vs explicit per-pair formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tolerances import assert_close, assert_near_zero

from trackstar import correction, tailpatch, train

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


def _sweep(params, precond, scale="batch_share"):
    """Deltas of the test queries' proponents at every multiplier, 8 tokens per batch."""
    return tailpatch.tailpatch_sweep(
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
        counted_tokens_per_batch=8,
        pair_batch=3,
    )


@pytest.mark.parametrize("scale", ["single", "batch_share"])
def test_vmapped_batches_equal_per_pair_loop(trained, scale):
    params, _, precond = trained
    deltas = _sweep(params, precond, scale)
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
    share = tailpatch.tailpatch_deltas(*args, scale="batch_share", counted_tokens_per_batch=3, **kw)
    assert_close(single, share)
    assert (single > 0).all()
    smaller = [
        tailpatch.tailpatch_deltas(*args, scale="batch_share", counted_tokens_per_batch=n, **kw)
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
        counted_tokens_per_batch=8,
        carry_momentum=True,
        optimizer=OPT,
        opt_state=opt_state,
        pair_batch=3,
    )
    assert_near_zero(deltas[:, :3, 1], deltas, rel=1e-5)
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
    with pytest.raises(tailpatch.TailPatchError, match="counted_tokens_per_batch"):
        tailpatch.tailpatch_deltas(*args, lr=LR, precond=precond)
    with pytest.raises(tailpatch.TailPatchError, match="scale"):
        tailpatch.tailpatch_deltas(*args, lr=LR, precond=precond, scale="full")
    with pytest.raises(tailpatch.TailPatchError, match="precond"):
        tailpatch.tailpatch_deltas(
            *args, lr=LR, precond={"embed": precond["embed"]}, scale="single"
        )
    with pytest.raises(tailpatch.TailPatchError, match="optimizer"):
        tailpatch.tailpatch_deltas(*args, lr=LR, scale="single", carry_momentum=True)
    # A factored scale counts as one parameter, and its dense shape must fit that parameter.
    wrong = correction.FactoredScale(jnp.ones(3), jnp.ones(5), 0, 1)  # dense (5, 3)
    with pytest.raises(tailpatch.TailPatchError, match=r"factored precond .*'embed'.*\(5, 3\)"):
        tailpatch.tailpatch_deltas(
            *args, lr=LR, precond={**precond, "embed": wrong}, scale="single"
        )
    broken = correction.FactoredScale(jnp.ones((2, 3)), jnp.ones(5), 0, 1)
    with pytest.raises(tailpatch.TailPatchError, match="do not combine"):
        tailpatch.tailpatch_deltas(
            *args, lr=LR, precond={**precond, "embed": broken}, scale="single"
        )
    with pytest.raises(tailpatch.TailPatchError, match="out of range"):
        tailpatch.tailpatch_deltas(*args[:-1], IDS + 5, lr=LR, precond=precond, scale="single")


# ----------------------------------------------------------------------------- Adafactor

WIDE = 128  # optax.adafactor factors a matrix whose two largest dims are both >= 128


def _factored_state(opt_state):
    (state,) = [
        s
        for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.FactoredState))
        if isinstance(s, optax.FactoredState)
    ]
    return state


def _explicit_dense_scale(state, params):
    """The factor optax's scale_by_factored_rms divides by, written out from its moments.

    Only ``mlp/w`` (2 WIDE x WIDE) is factored: ``v_row`` runs along axis 1, ``v_col`` along
    axis 0 and the scale is ``outer(v_col^-1/2, (v_row / mean(v_row))^-1/2)``; every other
    tensor keeps a full ``v`` and its scale is ``v^-1/2``.
    """
    v_row = np.asarray(state.v_row["mlp"]["w"], np.float64)
    v_col = np.asarray(state.v_col["mlp"]["w"], np.float64)
    assert v_row.shape == (WIDE,) and v_col.shape == (2 * WIDE,)

    def scale(v, p):
        if np.shape(v) == np.shape(p):
            return np.asarray(v, np.float64) ** -0.5
        assert p.shape == (2 * WIDE, WIDE)  # the factored one (its v is a placeholder)
        return np.outer(v_col**-0.5, (v_row / v_row.mean()) ** -0.5)

    return jax.tree.map(lambda v, p: jnp.asarray(scale(v, p), jnp.float32), state.v, params)


@pytest.fixture(scope="module")
def adafactor_run():
    """A WIDE model after two real updates of the project's Adafactor optimizer."""
    keys = jax.random.split(jax.random.key(1), 3)
    params = {
        "embed": 0.5 * jax.random.normal(keys[0], (V, WIDE)),
        "mlp": {
            "w": jax.random.normal(keys[1], (2 * WIDE, WIDE)) / np.sqrt(2 * WIDE),
            "b": jnp.zeros(WIDE),
        },
        "out": {"w": jax.random.normal(keys[2], (WIDE, V)) / np.sqrt(WIDE), "b": jnp.zeros(V)},
    }
    cfg = dict(
        optimizer="adafactor",
        steps=4,
        warmup_steps=1,
        lr=1e-2,
        final_lr=1e-3,
        weight_decay=0.01,
        adafactor_eps=1e-30,
    )
    opt = train.make_optimizer(cfg)
    opt_state = opt.init(params)
    loss = lambda p: jnp.mean(jax.vmap(_loss, (None, 0, 0))(p, CAND_T, CAND_W))
    for _ in range(2):
        updates, opt_state = opt.update(jax.grad(loss)(params), opt_state, params)
        params = optax.apply_updates(params, updates)
    return params, opt_state


def test_adafactor_factored_precond_equals_its_dense_factor(adafactor_run):
    params, opt_state = adafactor_run
    precond = correction.preconditioner(opt_state, params)
    assert isinstance(precond["mlp"]["w"], correction.FactoredScale)  # the case that crashed
    assert not isinstance(precond["embed"], correction.FactoredScale)
    explicit = _explicit_dense_scale(_factored_state(opt_state), params)
    factored = _sweep(params, precond)
    assert np.isfinite(factored[:, :3]).all() and np.isnan(factored[:, 3, 1]).all()
    assert_close(factored, _sweep(params, explicit), rtol=1e-5, peak_rtol=1e-5)
    # The factored scale matters: a plain gradient step gives other deltas.
    plain = _sweep(params, jax.tree.map(jnp.ones_like, params))
    assert np.abs(plain[0, :3] - factored[0, :3]).max() > 0.1 * np.abs(factored[0, :3]).max()


def test_adafactor_step_equals_explicit_formula(adafactor_run):
    """theta' = theta - eta * mult * s * g * dense(precond), log p(y|x) from a direct loop."""
    params, opt_state = adafactor_run
    precond = correction.preconditioner(opt_state, params)
    explicit = _explicit_dense_scale(_factored_state(opt_state), params)
    deltas = _sweep(params, precond)
    got, want = [], []
    for mi, mult in enumerate(MULTS):
        for q, k in zip(*np.nonzero(IDS >= 0), strict=True):
            m = IDS[q, k]
            g = _grad(params, CAND_T[m], CAND_W[m])
            patched = jax.tree.map(
                lambda p, gi, c, mult=mult: p - mult * LR * gi * c / 8, params, g, explicit
            )
            base = -float(_loss(params, QUERY_T[q], QUERY_W[q]))
            want.append(-float(_loss(patched, QUERY_T[q], QUERY_W[q])) - base)
            got.append(np.log(np.exp(base) + deltas[mi, q, k]) - base)
    # Log-probability changes: the direct computation and tail-patch's delta agree.
    assert_close(np.array(got), np.array(want), rtol=2e-3, peak_rtol=2e-3)
    assert np.abs(want).max() > 1e-3  # the step is large enough to test something
