"""Activation-based per-example features equal the vmap-of-grad reference.

On the project's LM and on a second model family registered by name (tests/toy_models.py's
``TOY_FAMILY``, plain functions following the tap contract of trackstar.taps).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy_models import TOY_FAMILY, demo_lm, random_preconditioner

from trackstar import correction, families
from trackstar.gradients import make_feature_fn, per_example_grads
from trackstar.projection import Projector
from trackstar.train import mean_token_loss
from trackstar.tree import named_leaves

VOCAB = 29
MODEL = demo_lm(d_model=16, n_layers=1, n_heads=2, d_ff=24, max_len=12)


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
    apply_fn, params = families.make_model(MODEL, VOCAB, seed=0)
    tokens, weights = _examples(5, 10, seed=3)
    # Reference per-example gradients (vmap of grad), one compile per output function.
    ref = {
        kind: _flat(jax.jit(per_example_grads, static_argnums=(0, 4))(
            apply_fn, params, tokens, weights, kind
        ))
        for kind in ("loss", "margin")
    }  # fmt: skip
    return apply_fn, params, tokens, weights, ref


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.asarray(x).reshape(x.shape[0], -1) for _, x in named_leaves(tree)], 1)


def _precond(kind, params):
    pre = random_preconditioner(kind, params)
    if kind != "factored":
        return pre
    # Adafactor factors every matrix here (min_dim_size_to_factor=4), after two real steps.
    n_factored = sum(
        isinstance(s, correction.FactoredScale)
        for s in jax.tree.leaves(pre, is_leaf=lambda s: isinstance(s, correction.FactoredScale))
    )
    assert n_factored >= 6  # kernels and both embeddings take the folded path
    return pre


def _dense_formula(ref_grads_BxP, pre, proj, params):
    """P (g * V) with the projection as an explicit dim x |theta| matrix."""
    scale = np.ones(ref_grads_BxP.shape[1], np.float32)
    if pre is not None:
        scale = np.concatenate(
            [np.asarray(x).reshape(-1) for _, x in named_leaves(correction.dense(pre))]
        )
    return (ref_grads_BxP * scale) @ np.asarray(proj.dense_matrix()).T


@pytest.mark.parametrize(
    "precond_kind,mode,output_fn,k",
    [
        ("none", "global", "loss", 3),
        ("factored", "global", "margin", 3),
        ("adam", "per_tensor", "loss", 3),
        ("adam", "dense", "margin", 3),
        # k = 24: materializing G is cheaper than folding for some kernels, so both branches of
        # the cost switch run under a factored V.
        ("factored", "global", "loss", 24),
    ],
)
def test_fast_features_equal_dense_formula(lm, precond_kind, mode, output_fn, k):
    apply_fn, params, tokens, weights, ref = lm
    proj = Projector(params, mode, k_in=k + 1, k_out=k, seed=5, dense_dim=16)
    pre = _precond(precond_kind, params)
    fast = make_feature_fn(apply_fn, output_fn, proj, pre)
    assert fast.fast  # the project's model takes the fast path by default
    want = _dense_formula(ref[output_fn], pre, proj, params)
    got = np.asarray(fast(params, tokens, weights))
    assert np.abs(want).max() > 0
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5 * np.abs(want).max())
    assert np.all(got[-1] == 0)  # the padding row contributes nothing


def test_exact_v_memory_is_a_training_step_plus_one_layer():
    # Exact Adam V materializes per-example gradients one layer at a time: compiled scratch
    # memory exceeds the plain training step's (activations) by O(B x largest layer), not by
    # O(B x |theta|).
    vocab, batch = 512, 32
    apply_fn, params = families.make_model(
        dict(MODEL, d_model=64, n_layers=4, n_heads=2, d_ff=128, max_len=16), vocab, 0
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
    apply_fn, params, *_ = lm
    proj = Projector(params, "global", k_in=2, k_out=2)
    tokens, weights = _examples(2, 6, seed=0)
    fn = make_feature_fn(_Untapped(apply_fn), "loss", proj)
    with pytest.raises(ValueError, match="do not cover parameters.*final_norm"):
        fn(params, tokens, weights)
    with pytest.raises(ValueError, match="fast=True needs an apply_fn with a tapped"):
        make_feature_fn(lambda p, t: apply_fn(p, t), "loss", proj, fast=True)


@pytest.fixture()
def toy_family(monkeypatch):
    monkeypatch.setattr(families, "MODEL_FAMILIES", dict(families.MODEL_FAMILIES))
    families.register_family(TOY_FAMILY)
    return TOY_FAMILY.name


@pytest.mark.parametrize(
    "precond_kind,mode,output_fn",
    [("none", "global", "loss"), ("factored", "per_tensor", "margin"), ("adam", "dense", "loss")],
)
def test_a_registered_family_takes_the_fast_path(toy_family, precond_kind, mode, output_fn):
    cfg = dict(family=toy_family, d_model=8, d_ff=12, n_layers=2, max_len=12)
    apply_fn, params = families.make_model(cfg, VOCAB, seed=1)
    assert type(apply_fn).__name__ == "ToyTappedLM"
    tokens, weights = _examples(4, 10, seed=7)
    proj = Projector(params, mode, k_in=3, k_out=4, seed=2, dense_dim=16)
    pre = _precond(precond_kind, params)
    fast = make_feature_fn(apply_fn, output_fn, proj, pre)
    assert fast.fast  # found by name, tapped: the fast path by default
    ref_grads = jax.jit(per_example_grads, static_argnums=(0, 4))(
        apply_fn, params, tokens, weights, output_fn
    )
    want = _dense_formula(_flat(ref_grads), pre, proj, params)
    got = np.asarray(fast(params, tokens, weights))
    assert np.abs(want).max() > 0
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5 * np.abs(want).max())
    assert np.all(got[-1] == 0)

    # The same model without ``tapped`` goes through the per-example-gradient loop, silently
    # by default; fast=True names the fix.
    def untapped(p, t):
        return apply_fn(p, t)

    slow = make_feature_fn(untapped, output_fn, proj, pre)
    assert not slow.fast
    np.testing.assert_allclose(
        slow(params, tokens, weights), got, rtol=2e-4, atol=2e-5 * np.abs(want).max()
    )
    with pytest.raises(ValueError, match="fast=True needs .*trackstar.taps"):
        make_feature_fn(untapped, output_fn, proj, pre, fast=True)


def test_an_unknown_tap_kind_is_refused_by_name(lm):
    apply_fn, params, *_ = lm
    proj = Projector(params, "global", k_in=2, k_out=2)
    tokens, weights = _examples(2, 6, seed=0)

    class Renamed(_Untapped):
        def tapped(self, params, tokens, tap):
            def renamed(kind, path, x, y):
                return tap("layer_norm" if kind == "scale_shift" else kind, path, x, y)

            return self.apply_fn.tapped(params, tokens, renamed)

    fn = make_feature_fn(Renamed(apply_fn), "loss", proj)
    with pytest.raises(ValueError, match="as 'layer_norm'; the tap kinds are"):
        fn(params, tokens, weights)
