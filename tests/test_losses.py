"""Token log-probabilities and output functions against plain numpy loops (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import assert_close

from trackstar import losses

B, T, V = 3, 6, 7


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((B, T, V)) * 3).astype(np.float32)
    tokens = rng.integers(0, V, (B, T)).astype(np.int32)
    weights = np.array(
        [[0, 1, 1, 0, 1, 1], [0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0]], np.float32
    )  # the last row counts no token
    return logits, tokens, weights


def _logp(logits, tokens, b, t):
    """log p(tokens[b, t] | tokens[b, :t]) from logits[b, t - 1], in float64."""
    z = logits[b, t - 1].astype(np.float64)
    log_norm = z.max() + np.log(np.exp(z - z.max()).sum())
    return z[tokens[b, t]] - log_norm


def _per_token(kind, logits, tokens, b, t):
    lp = _logp(logits, tokens, b, t)
    return {
        "loss": -lp,
        "margin": -(lp - np.log(1 - np.exp(lp))),
        "logit": -float(logits[b, t - 1, tokens[b, t]]),
    }[kind]


def test_token_logprobs_match_loop():
    logits, tokens, _ = _inputs()
    got = np.asarray(jax.jit(losses.token_logprobs)(logits, tokens))
    want = np.zeros((B, T))
    for b in range(B):
        for t in range(1, T):
            want[b, t] = _logp(logits, tokens, b, t)
    assert got.shape == (B, T) and got.dtype == np.float32
    assert (got[:, 0] == 0).all()  # nothing predicts the first token
    assert_close(got, want)


@pytest.mark.parametrize("kind", ["loss", "margin", "logit"])
def test_output_fns_match_loop(kind):
    logits, tokens, weights = _inputs()
    got = np.asarray(jax.jit(losses.OUTPUT_FNS[kind])(logits, tokens, weights))
    want = np.zeros(B)
    for b in range(B):
        for t in range(1, T):
            want[b] += weights[b, t] * _per_token(kind, logits, tokens, b, t)
    assert got.shape == (B,) and got[2] == 0.0
    assert_close(got, want)
    # output_loss dispatches to the table; any leading batch shape works.
    by_name = losses.output_loss(logits[0], tokens[0], weights[0], kind)
    assert np.asarray(by_name) == got[0]


def test_sequence_logprob_and_mean_token_loss_match_loop():
    logits, tokens, weights = _inputs(1)
    seq = np.zeros(B)
    for b in range(B):
        for t in range(1, T):
            seq[b] += weights[b, t] * _logp(logits, tokens, b, t)
    assert_close(np.asarray(jax.jit(losses.sequence_logprob)(logits, tokens, weights)), seq)
    loss, n = jax.jit(losses.mean_token_loss)(logits, tokens, weights)
    assert float(n) == weights[:, 1:].sum()
    assert_close(float(loss), -seq.sum() / weights[:, 1:].sum())
    # No counted token: loss 0, not NaN.
    loss0, n0 = losses.mean_token_loss(logits, tokens, np.zeros_like(weights))
    assert float(n0) == 0 and float(loss0) == 0


def test_both_roundings_of_log_p_agree():
    # Training / tail-patch (log_softmax) and the output functions (z - logsumexp) compute the
    # same log-probability in two float32 roundings; they must agree to rounding.
    logits, tokens, weights = _inputs(2)
    seq = np.asarray(losses.sequence_logprob(logits, tokens, weights))
    assert_close(seq, -np.asarray(losses.loss(logits, tokens, weights)))
    per_token = np.asarray(losses.token_logprobs(logits, tokens))[:, 1:]
    assert_close((per_token * weights[:, 1:]).sum(-1), seq)


def test_train_output_fn_is_the_loss():
    """The training examples' stored label computes the query ``"loss"`` exactly."""
    logits, tokens, weights = _inputs(2)
    assert losses.resolve_output_fn(losses.TRAIN_OUTPUT_FN) == losses.LOSS
    train = losses.output_loss(logits, tokens, weights, losses.TRAIN_OUTPUT_FN)
    np.testing.assert_array_equal(train, losses.output_loss(logits, tokens, weights, "loss"))
    np.testing.assert_array_equal(train, -losses.sequence_logprob(logits, tokens, weights))
    assert losses.TRAIN_OUTPUT_FN not in losses.OUTPUT_FNS  # a stored label, not a second fn


def test_margin_is_finite_when_target_is_certain():
    logits = jnp.zeros((1, 2, 5)).at[0, 0, 3].set(60.0)  # p(token 3) rounds to 1 in float32
    tokens = jnp.array([[0, 3]])
    weights = jnp.array([[0.0, 1.0]])

    def f(x):
        return losses.margin(x, tokens, weights)[0]

    value, grad = jax.jit(jax.value_and_grad(f))(logits)
    # -(log p - log(1 - p)) = -(0 - (log 4 - 60)) up to e^-60 terms; naive log1p(-p) gives inf.
    np.testing.assert_allclose(value, np.log(4.0) - 60.0, rtol=1e-6)
    assert np.isfinite(np.asarray(grad)).all()


def test_unknown_output_fn_raises():
    with pytest.raises(ValueError, match="unknown output_fn 'nll'.*featurize.query_output_fn"):
        losses.output_loss(
            jnp.zeros((1, 2, 3)), jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, 2)), "nll"
        )
