"""Token log-probabilities and output functions: the one place they are computed.

docs/method.md, Output functions. Everything here is a pure, jittable function of
``logits_BxTxV`` (float, any leading batch shape ``...``), ``tokens_BxT`` (int) and
``weights_BxT`` (float), with the project's convention: ``weights[..., t] = 1`` means token ``t``
counts and is predicted from ``logits[..., t - 1, :]`` (so ``weights[..., 0]`` never counts).
The model is not imported: callers run ``apply_fn`` and pass the logits in.

Every output function is a loss (lower = more confident), **summed** over the counted tokens,
one value per example; ``OUTPUT_FNS`` is the table of them:

  - ``"loss"``: ``-sum_t w_t log p(y_t)``
  - ``"margin"``: ``-sum_t w_t [log p(y_t) - log(1 - p(y_t))]``
  - ``"logit"``: ``-sum_t w_t z_{y_t}``

with ``y_t = tokens[t]`` and ``p``/``z`` from ``logits[t - 1]``. ``log p(y_t)`` is always
computed in float32, as ``z_{y_t} - logsumexp(z)`` by the output functions (featurize) and as
``log_softmax(z)[y_t]`` by ``token_logprobs``, ``sequence_logprob`` (tail-patch, the model's
target log-probability) and ``mean_token_loss`` (training): the two roundings each path has
always used, kept so that checkpoints and stores reproduce bit for bit.

Names. The training examples' output function (candidates, corpus passages: every token after
BOS counts) is the same quantity as the query output function ``"loss"``; its one name is
``LOSS``. Stores record their output function (``StoreMeta.output_fn``), and stores already on
disk record the training examples' as ``"train"``; a store resumes only with equal metadata and
two training stores mixed into one R must agree on it, so renaming it would invalidate every
existing training store. It therefore stays ``"train"`` on disk, defined once here as
``TRAIN_OUTPUT_FN``: a stored label, not a second function. ``output_loss`` and
``resolve_output_fn`` accept it and treat it as ``LOSS``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

LOSS = "loss"
MARGIN = "margin"
LOGIT = "logit"
# The label a training-example store records as its output function (quantity: LOSS).
TRAIN_OUTPUT_FN = "train"


def _next_token(logits_BxTxV: jax.Array, tokens_BxT: jax.Array) -> tuple[jax.Array, ...]:
    """``(logits, targets, z_y)`` over the T - 1 predicted positions: logits[t - 1], tokens[t]."""
    logits = logits_BxTxV[..., :-1, :].astype(jnp.float32)
    targets = tokens_BxT[..., 1:]
    z_y = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return logits, targets, z_y


def _next_token_logprobs(logits_BxTxV: jax.Array, tokens_BxT: jax.Array) -> jax.Array:
    """``log p(tokens[t] | tokens[:t])`` for t = 1..T-1 (``... x (T - 1)``)."""
    logits, _, z_y = _next_token(logits_BxTxV, tokens_BxT)
    return z_y - jax.nn.logsumexp(logits, axis=-1)


def _log_softmax_logprobs(logits_BxTxV: jax.Array, tokens_BxT: jax.Array) -> jax.Array:
    """``log p(tokens[t] | tokens[:t])`` for t = 1..T-1 via ``jax.nn.log_softmax``.

    The same quantity as ``_next_token_logprobs`` in another float32 rounding. Training,
    tail-patch and the model's log-probabilities have always used this one, the output
    functions the other; each keeps its own so that trained checkpoints and featurized stores
    reproduce bit for bit (they agree to float32 rounding: tests/test_losses.py).
    """
    logp = jax.nn.log_softmax(logits_BxTxV[..., :-1, :].astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, tokens_BxT[..., 1:, None], axis=-1)[..., 0]


def _weighted_sum(weights_BxT: jax.Array, per_token: jax.Array) -> jax.Array:
    """``sum_t w_t x_t`` per example over the predicted positions t = 1..T-1."""
    return jnp.sum(weights_BxT[..., 1:].astype(jnp.float32) * per_token, axis=-1)


def token_logprobs(logits_BxTxV: jax.Array, tokens_BxT: jax.Array) -> jax.Array:
    """``logp_BxT[..., t] = log p(tokens[t] | tokens[:t])`` (float32); position 0 is 0.

    Nothing predicts the first token, so ``logp[..., 0] = 0``; weights never count it.
    """
    logp = _log_softmax_logprobs(logits_BxTxV, tokens_BxT)
    return jnp.pad(logp, [(0, 0)] * (logp.ndim - 1) + [(1, 0)])


def sequence_logprob(
    logits_BxTxV: jax.Array, tokens_BxT: jax.Array, weights_BxT: jax.Array
) -> jax.Array:
    """``sum_t w_t log p(tokens[t] | tokens[:t])`` per example (tail-patch, target log-prob)."""
    return _weighted_sum(weights_BxT, _log_softmax_logprobs(logits_BxTxV, tokens_BxT))


def loss(logits_BxTxV: jax.Array, tokens_BxT: jax.Array, weights_BxT: jax.Array) -> jax.Array:
    """``-sum_t w_t log p(y_t)`` per example: summed next-token cross-entropy."""
    return _weighted_sum(weights_BxT, -_next_token_logprobs(logits_BxTxV, tokens_BxT))


def margin(logits_BxTxV: jax.Array, tokens_BxT: jax.Array, weights_BxT: jax.Array) -> jax.Array:
    """``-sum_t w_t [log p(y_t) - log(1 - p(y_t))]`` per example.

    ``log(1 - p_y)`` = logsumexp over the other tokens - logsumexp over all: exact and finite
    even when ``p_y`` rounds to 1, unlike ``log1p(-exp(logp_y))``.
    """
    logits, targets, z_y = _next_token(logits_BxTxV, tokens_BxT)
    log_norm = jax.nn.logsumexp(logits, axis=-1)
    logp_y = z_y - log_norm
    is_target = jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.bool_)
    log_rest = jax.nn.logsumexp(jnp.where(is_target, -jnp.inf, logits), axis=-1)
    return _weighted_sum(weights_BxT, -(logp_y - (log_rest - log_norm)))


def logit(logits_BxTxV: jax.Array, tokens_BxT: jax.Array, weights_BxT: jax.Array) -> jax.Array:
    """``-sum_t w_t z_{y_t}`` per example: the raw logit of each counted target token."""
    _, _, z_y = _next_token(logits_BxTxV, tokens_BxT)
    return _weighted_sum(weights_BxT, -z_y)


OutputFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
# The output functions, by name: fn(logits_BxTxV, tokens_BxT, weights_BxT) -> loss per example.
OUTPUT_FNS: dict[str, OutputFn] = {LOSS: loss, MARGIN: margin, LOGIT: logit}


def resolve_output_fn(name: str) -> str:
    """The ``OUTPUT_FNS`` name for ``name`` (``TRAIN_OUTPUT_FN`` -> ``LOSS``); else ValueError."""
    if name == TRAIN_OUTPUT_FN:
        return LOSS
    if name not in OUTPUT_FNS:
        raise ValueError(
            f"unknown output_fn {name!r}; choose one of {', '.join(OUTPUT_FNS)} "
            f"({TRAIN_OUTPUT_FN!r} for training examples; config field "
            "featurize.query_output_fn)"
        )
    return name


def output_loss(
    logits_BxTxV: jax.Array, tokens_BxT: jax.Array, weights_BxT: jax.Array, kind: str
) -> jax.Array:
    """The output function ``kind`` (an ``OUTPUT_FNS`` name or ``TRAIN_OUTPUT_FN``) per example."""
    return OUTPUT_FNS[resolve_output_fn(kind)](logits_BxTxV, tokens_BxT, weights_BxT)


def mean_token_loss(
    logits_BxTxV: jax.Array, tokens_BxT: jax.Array, weights_BxT: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Training loss: cross-entropy averaged over all counted tokens of the batch.

    Returns ``(loss, n_counted_tokens)``; ``loss = sum_b loss_b / max(n, 1)`` with ``loss_b``
    the ``"loss"`` output function of example b.
    """
    nll = -_log_softmax_logprobs(logits_BxTxV, tokens_BxT)
    w = weights_BxT[..., 1:].astype(jnp.float32)
    n = jnp.sum(w)
    return jnp.sum(nll * w) / jnp.maximum(n, 1.0), n
