"""Per-example gradients and the feature map against explicit references.

The output functions themselves are tested in test_losses.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import assert_close
from toy_models import make_toy_gru, make_toy_transformer

from trackstar import correction
from trackstar.gradients import make_feature_fn, output_loss, per_example_grads
from trackstar.projection import Projector
from trackstar.tree import named_leaves

VOCAB = 29


def _examples(n, t, seed, min_len=3):
    """Right-padded random examples; weights mark every real token after the first."""
    rng = np.random.default_rng(seed)
    tokens = np.zeros((n, t), np.int32)
    weights = np.zeros((n, t), np.float32)
    for i in range(n):
        length = int(rng.integers(min_len, t + 1))
        tokens[i, :length] = rng.integers(1, VOCAB, length)
        weights[i, 1:length] = 1.0
    return jnp.asarray(tokens), jnp.asarray(weights)


def _flat(tree, batched=True) -> np.ndarray:
    leaves = [np.asarray(x) for _, x in named_leaves(tree)]
    if batched:
        return np.concatenate([x.reshape(x.shape[0], -1) for x in leaves], axis=1)
    return np.concatenate([x.reshape(-1) for x in leaves])


@pytest.fixture(scope="module")
def transformer():
    return make_toy_transformer(vocab=VOCAB, d_model=16, n_layers=1, max_len=16)


def test_per_example_grads_equal_loop_of_grad_and_ignore_padding(transformer):
    apply_fn, params = transformer
    tokens, weights = _examples(3, 8, seed=1)
    batched = jax.jit(per_example_grads, static_argnums=(0, 4))(
        apply_fn, params, tokens, weights, "loss"
    )
    leaf_paths = [p for p, _ in named_leaves(params)]
    assert [p for p, _ in named_leaves(batched)] == leaf_paths  # every parameter has a grad

    @jax.jit
    def one(p, tokens_T, weights_T):
        def loss(p):
            return output_loss(apply_fn(p, tokens_T[None]), tokens_T[None], weights_T[None], "loss")

        return jax.grad(lambda p: loss(p)[0])(p)

    loop = np.stack([_flat(one(params, tokens[i], weights[i]), batched=False) for i in range(3)])
    assert_close(_flat(batched), loop)
    # Norms, biases and embeddings all get nonzero gradients.
    flat0 = {p: np.abs(np.asarray(x[0])).sum() for p, x in named_leaves(batched)}
    assert all(v > 0 for v in flat0.values()), [p for p, v in flat0.items() if v == 0]


def test_feature_is_the_same_alone_and_in_padded_batch_of_32(transformer):
    apply_fn, params = transformer
    proj = Projector(params, "global", k_in=4, k_out=4, seed=0)
    rng = np.random.default_rng(2)
    precond = jax.tree.map(lambda x: jnp.asarray(rng.uniform(0.5, 2.0, x.shape), x.dtype), params)
    feature_fn = make_feature_fn(apply_fn, "margin", proj, precond)
    tokens, weights = _examples(32, 12, seed=3)
    # Example 5: 7 real tokens, alone at its own length; in the batch padded to 12 among 31
    # other examples (some shorter, some longer).
    alone_t = jnp.asarray(np.asarray(tokens[5:6, :7]))
    tokens = tokens.at[5].set(jnp.pad(alone_t[0], (0, 5)))
    weights = weights.at[5].set(jnp.asarray([0.0] + [1.0] * 6 + [0.0] * 5))
    batch_vecs = feature_fn(params, tokens, weights)
    alone_vec = feature_fn(params, alone_t, weights[5:6, :7])
    assert batch_vecs.shape == (32, 16) and batch_vecs.dtype == jnp.float32
    assert_close(batch_vecs[5], alone_vec[0])
    assert not np.allclose(batch_vecs[4], batch_vecs[5])


def test_feature_fn_on_gru_equals_dense_formula():
    # A differently structured model (plain dicts, scan, 3-D and scalar tensors) with a mixed
    # preconditioner: folded factored scales (2-D), a densified one (3-D) and plain arrays.
    apply_fn, params = make_toy_gru(vocab=VOCAB, hidden=6)
    rng = np.random.default_rng(4)

    def pos(shape):
        return jnp.asarray(rng.uniform(0.5, 2.0, shape), jnp.float32)

    precond = jax.tree.map(lambda x: pos(x.shape), params)
    precond["embed"] = correction.FactoredScale(pos((VOCAB,)), pos((6,)), d0=1, d1=0)
    precond["out"]["w"] = correction.FactoredScale(pos((VOCAB,)), pos((6,)), d0=0, d1=1)
    precond["gates"]["w"] = correction.FactoredScale(pos((3, 6)), pos((3, 6)), d0=2, d1=1)
    proj = Projector(params, "per_tensor", k_in=3, k_out=2, seed=1)
    tokens, weights = _examples(4, 9, seed=5)
    got = make_feature_fn(apply_fn, "loss", proj, precond)(params, tokens, weights)

    @jax.jit
    def reference(params, tokens, weights):
        return per_example_grads(apply_fn, params, tokens, weights, "loss"), proj.dense_matrix()

    grads, dense = reference(params, tokens, weights)
    want = (_flat(grads) * _flat(correction.dense(precond), batched=False)) @ np.asarray(dense).T
    assert got.shape == (4, proj.dim)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
