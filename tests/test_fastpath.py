"""Activation-based per-example features equal the vmap-of-grad reference, on the project's LM."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from trackstar import correction
from trackstar.gradients import activation_features, make_feature_fn
from trackstar.model import make_model
from trackstar.projection import Projector
from trackstar.train import mean_token_loss

VOCAB = 29
MODEL = dict(size="tiny", d_model=16, n_layers=1, n_heads=2, d_ff=24, max_len=12)


def _examples(n, t, seed):
    """Right-padded random examples (one all-padding row) with repeated token ids."""
    rng = np.random.default_rng(seed)
    tokens = np.zeros((n, t), np.int32)
    weights = np.zeros((n, t), np.float32)
    for i in range(n - 1):
        length = int(rng.integers(3, t + 1))
        tokens[i, :length] = rng.integers(1, 6, length)  # few ids: rows repeat in one example
        weights[i, 1:length] = 1.0
    return jnp.asarray(tokens), jnp.asarray(weights)


@pytest.fixture(scope="module")
def lm():
    return make_model(MODEL, VOCAB, seed=0)


def _precond(kind, params):
    if kind == "none":
        return None
    if kind == "adam":
        rng = np.random.default_rng(1)
        return jax.tree.map(
            lambda x: jnp.asarray(rng.uniform(0.3, 3.0, x.shape), jnp.float32), params
        )
    # Adafactor factors every matrix here (min_dim_size_to_factor=4), after two real steps.
    opt = optax.adafactor(1e-2, min_dim_size_to_factor=4, multiply_by_parameter_scale=False)
    state = opt.init(params)
    rng = np.random.default_rng(2)
    for _ in range(2):
        grads = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), params)
        _, state = opt.update(grads, state, params)
    pre = correction.preconditioner(state, params)
    n_factored = sum(
        isinstance(s, correction.FactoredScale)
        for s in jax.tree.leaves(pre, is_leaf=lambda s: isinstance(s, correction.FactoredScale))
    )
    assert n_factored >= 6  # kernels and both embeddings take the folded path
    return pre


@pytest.mark.parametrize(
    "precond_kind,mode,output_fn",
    [
        ("none", "global", "train"),
        ("factored", "global", "margin"),
        ("adam", "global", "loss"),
        ("factored", "per_tensor", "loss"),
        ("adam", "dense", "logit"),
    ],
)
def test_fast_features_equal_reference(lm, precond_kind, mode, output_fn):
    apply_fn, params = lm
    proj = Projector(params, mode, k_in=4, k_out=3, seed=5, dense_dim=16)
    pre = _precond(precond_kind, params)
    tokens, weights = _examples(5, 10, seed=3)
    ref = make_feature_fn(apply_fn, output_fn, proj, pre, fast=False)
    fast = make_feature_fn(apply_fn, output_fn, proj, pre)
    assert fast.fast and not ref.fast  # the project's model takes the fast path by default
    want = np.asarray(ref(params, tokens, weights))
    got = np.asarray(fast(params, tokens, weights))
    assert np.abs(want).max() > 0
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5 * np.abs(want).max())
    assert np.all(got[-1] == 0)  # the padding row contributes nothing


def test_folded_and_materialized_kernels_agree(lm):
    # A wide projection makes materializing G cheaper than folding for some kernels; both must
    # equal the reference (this exercises the cost switch in both directions at once).
    apply_fn, params = lm
    proj = Projector(params, "global", k_in=24, k_out=24, seed=1)
    pre = _precond("factored", params)
    tokens, weights = _examples(3, 12, seed=4)
    want = make_feature_fn(apply_fn, "loss", proj, pre, fast=False)(params, tokens, weights)
    got = jax.jit(activation_features, static_argnums=(0, 5, 6))(
        apply_fn, params, pre, tokens, weights, "loss", proj
    )
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5 * float(jnp.abs(want).max()))


def test_exact_v_memory_is_a_training_step_plus_one_layer():
    # Exact Adam V materializes per-example gradients one layer at a time: compiled scratch
    # memory exceeds the plain training step's (activations) by O(B x largest layer), not by
    # O(B x |theta|).
    vocab, batch = 512, 32
    apply_fn, params = make_model(
        dict(size="tiny", d_model=64, n_layers=4, n_heads=2, d_ff=128, max_len=16), vocab, 0
    )
    proj = Projector(params, "global", k_in=8, k_out=8)
    pre = jax.tree.map(jnp.ones_like, params)
    tokens = jnp.ones((batch, 16), jnp.int32)
    weights = jnp.ones((batch, 16), jnp.float32)
    fn = make_feature_fn(apply_fn, "train", proj, pre, fast=True)
    fast = fn.jitted.lower(params, pre, tokens, weights).compile().memory_analysis()

    def mean_loss(p, t, w):
        return mean_token_loss(apply_fn(p, t), t, w)[0]

    floor = jax.jit(jax.grad(mean_loss)).lower(params, tokens, weights).compile()
    floor_temp = floor.memory_analysis().temp_size_in_bytes
    largest = max(x.size for x in jax.tree.leaves(params)) * batch * 4
    all_grads = sum(x.size for x in jax.tree.leaves(params)) * batch * 4
    excess = fast.temp_size_in_bytes - floor_temp
    assert excess <= 1.5 * largest < 0.3 * all_grads, (excess, largest, all_grads)


class _Untapped:
    """A model whose taps skip the final norm, so its parameters are not covered."""

    def __init__(self, apply_fn):
        self.apply_fn = apply_fn

    def __call__(self, params, tokens):
        return self.apply_fn(params, tokens)

    def tapped(self, params, tokens, tap):
        def partial_tap(kind, path, x, y):
            return y if path == "final_norm" else tap(kind, path, x, y)

        return self.apply_fn.tapped(params, tokens, partial_tap)


def test_uncovered_parameters_and_missing_taps_raise(lm):
    apply_fn, params = lm
    proj = Projector(params, "global", k_in=2, k_out=2)
    tokens, weights = _examples(2, 6, seed=0)
    fn = make_feature_fn(_Untapped(apply_fn), "loss", proj)
    with pytest.raises(ValueError, match="do not cover parameters.*final_norm"):
        fn(params, tokens, weights)
    with pytest.raises(ValueError, match="fast=True needs an apply_fn with a tapped"):
        make_feature_fn(lambda p, t: apply_fn(p, t), "loss", proj, fast=True)
