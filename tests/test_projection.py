"""Kronecker / dense projection against explicit dense matrices and its statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import assert_close
from toy_models import make_toy_gru

from trackstar.projection import ProjectionError, Projector, matrix_shape
from trackstar.tree import named_leaves


def _flat(tree_with_B) -> np.ndarray:
    """Concatenates leaves (in path order) flattened row-major: B x |theta|."""
    leaves = [np.asarray(x).reshape(x.shape[0], -1) for _, x in named_leaves(tree_with_B)]
    return np.concatenate(leaves, axis=1)


def _random_like(params, batch, seed):
    # numpy, not jax.random: every eager jax.random call compiles its own kernel.
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: jnp.asarray(rng.standard_normal((batch, *np.shape(x))), jnp.float32), params
    )


def test_matrix_shape():
    assert matrix_shape(()) == (1, 1)
    assert matrix_shape((7,)) == (7, 1)
    assert matrix_shape((3, 4, 5)) == (12, 5)


@pytest.mark.parametrize(
    "mode,dim", [("global", 12), ("per_tensor", 7 * 12), ("dense", 40)]
)  # the GRU toy has 7 tensors
def test_project_equals_dense_matrix(mode, dim):
    _, params = make_toy_gru(vocab=11, hidden=5)
    proj = Projector(params, mode=mode, k_in=3, k_out=4, seed=3, dense_dim=40)
    assert proj.dim == dim
    grads = _random_like(params, batch=2, seed=1)
    got, dense = jax.jit(lambda g: (proj.project(g), proj.dense_matrix()))(grads)
    got, dense = np.asarray(got), np.asarray(dense)
    assert dense.shape == (dim, proj.n_params)
    want = _flat(grads) @ dense.T
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_folded_scales_equal_scaling_the_gradient():
    params = {"w": jnp.zeros((6, 5)), "u": jnp.zeros((2, 3, 4))}
    proj = Projector(params, k_in=3, k_out=2, seed=0)
    rng = np.random.default_rng(0)
    g = jnp.asarray(rng.standard_normal((2, 2, 3, 4)), jnp.float32)
    row = jnp.asarray(rng.uniform(0.5, 2.0, 6), jnp.float32)
    col = jnp.asarray(rng.uniform(0.5, 2.0, 4), jnp.float32)
    scaled = g * (row.reshape(2, 3)[:, :, None] * col)[None]

    @jax.jit
    def both(g, row, col, scaled):
        folded = proj.project_leaf("u", g, row_scale=row, col_scale=col)
        return folded, proj.project_leaf("u", scaled)

    folded, direct = both(g, row, col, scaled)
    assert_close(folded, direct)


def test_factors_depend_on_seed_and_path_only():
    a = Projector({"x": jnp.zeros((4, 3))}, k_in=2, k_out=2, seed=5)
    b = Projector({"x": jnp.zeros((4, 3)), "extra": jnp.zeros(9)}, k_in=2, k_out=2, seed=5)
    c = Projector({"x": jnp.zeros((4, 3))}, k_in=2, k_out=2, seed=6)
    fa, fb, fc = jax.jit(lambda: (a.factors("x"), b.factors("x"), c.factors("x")))()
    for x, y in zip(fa, fb, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.allclose(fa[0], fc[0])


@pytest.mark.parametrize("mode", ["global", "per_tensor", "dense"])
def test_inner_products_preserved_in_expectation(mode):
    # Unbiasedness: over independent seeds, mean <Pg, Ph> = <g, h> and mean P^T P = I.
    params = {"w": jnp.zeros((5, 4)), "b": jnp.zeros(4), "s": jnp.zeros(())}
    n_seeds = 300
    rng = np.random.default_rng(0)
    g = rng.standard_normal(25)
    h = g + 0.7 * rng.standard_normal(25)
    mats = jax.jit(
        jax.vmap(lambda s: Projector(params, mode, 3, 2, seed=s, dense_dim=6).dense_matrix())
    )(jnp.arange(n_seeds))
    mats = np.asarray(mats, np.float64)  # n_seeds x d x 25
    dots = np.einsum("sdn,n,sdm,m->s", mats, g, mats, h)
    # 4 standard errors: a biased projection fails; an unbiased one passes ~99.99% of seeds.
    assert abs(dots.mean() - g @ h) < 4 * dots.std() / np.sqrt(n_seeds)
    grams = np.einsum("sdn,sdm->snm", mats, mats)
    z = (grams.mean(0) - np.eye(25)) / (grams.std(0) / np.sqrt(n_seeds) + 1e-12)
    # Entries that are exactly 0 (different blocks in per_tensor) have std 0 and z = 0.
    assert np.abs(z).max() < 5.0


def test_config_identifies_projection():
    params = {"w": jnp.zeros((4, 3))}
    cfg = Projector(params, k_in=2, k_out=3, seed=1).config()
    assert cfg["mode"] == "global" and cfg["dim"] == 6 and cfg["seed"] == 1
    other = Projector({"w": jnp.zeros((4, 4))}, k_in=2, k_out=3, seed=1).config()
    assert cfg["params_hash"] != other["params_hash"]


def test_bad_inputs_raise_clear_errors():
    params = {"w": jnp.zeros((4, 3))}
    with pytest.raises(ProjectionError, match="unknown projection mode"):
        Projector(params, mode="sparse")
    with pytest.raises(ProjectionError, match="use mode='global'"):
        Projector({"w": jnp.zeros((1000, 1000))}, mode="dense", dense_dim=4096)
    proj = Projector(params, k_in=2, k_out=2)
    with pytest.raises(ProjectionError, match="missing \\['w'\\], extra \\['v'\\]"):
        proj.project({"v": jnp.zeros((1, 4, 3))})
    with pytest.raises(ProjectionError, match="expected \\(B, \\*\\(4, 3\\)\\)"):
        proj.project_leaf("w", jnp.zeros((1, 3, 4)))


def test_config_pins_generated_factor_values(monkeypatch):
    """Same seed/mode/widths but another factor generator must not look compatible."""
    import jax.numpy as jnp

    from trackstar import projection

    params = {"a": {"w": jnp.zeros((8, 4)), "b": jnp.zeros(4)}}
    base = projection.Projector(params, k_in=4, k_out=4, seed=0).config()
    again = projection.Projector(params, k_in=4, k_out=4, seed=0).config()
    assert base == again
    original = projection.Projector.leaf_factors

    def other_generator(self, paths=None):
        return {p: tuple(f * 1.5 for f in fs) for p, fs in original(self, paths).items()}

    monkeypatch.setattr(projection.Projector, "leaf_factors", other_generator)
    changed = projection.Projector(params, k_in=4, k_out=4, seed=0).config()
    assert changed["factors_hash"] != base["factors_hash"]
    assert {k: v for k, v in changed.items() if k != "factors_hash"} == {
        k: v for k, v in base.items() if k != "factors_hash"
    }
