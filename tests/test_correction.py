"""Optimizer correction against optax's real AdamW / Adafactor states and optax's own math."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tolerances import assert_close
from toy_models import make_toy_gru

from trackstar import correction
from trackstar.correction import (
    CorrectionError,
    CorrectionSettings,
    FactoredScale,
    PathMismatchError,
    dense,
    opt_state_fingerprint,
    preconditioner,
    preconditioner_for,
    settings_from,
)
from trackstar.gradients import output_loss
from trackstar.tree import named_leaves, path_name

VOCAB, HIDDEN = 29, 6
B2, EPS = 0.95, 1e-6


@pytest.fixture(scope="module")
def model():
    apply_fn, params = make_toy_gru(vocab=VOCAB, hidden=HIDDEN)
    rng = np.random.default_rng(0)
    batches = [jnp.asarray(rng.integers(1, VOCAB, (4, 8)), jnp.int32) for _ in range(5)]

    @jax.jit
    def grad_fn(p, tokens):
        weights = jnp.ones(tokens.shape).at[:, 0].set(0.0)
        return jax.grad(lambda p: output_loss(apply_fn(p, tokens), tokens, weights, "loss").mean())(
            p
        )

    return params, batches, grad_fn


def _train(opt, params, batches, grad_fn):
    state = opt.init(params)
    update = jax.jit(opt.update)
    for tokens in batches[:-1]:
        updates, state = update(grad_fn(params, tokens), state, params)
        params = optax.apply_updates(params, updates)
    return params, state, grad_fn(params, batches[-1])


@pytest.fixture(scope="module")
def adamw_run(model):
    return _train(optax.adamw(1e-2, b1=0.9, b2=B2, eps=EPS, weight_decay=0.01), *model)


def test_adamw_preconditioner_equals_formula_and_optax_update(adamw_run):
    params, state, g = adamw_run
    pre = preconditioner(state, params, eps=EPS, b2=B2)
    adam = state[0]
    t = int(adam.count)
    assert t == 4
    for (path, got), (_, nu) in zip(named_leaves(pre), named_leaves(adam.nu), strict=True):
        want = 1.0 / (np.sqrt(np.asarray(nu, np.float64) / (1 - B2**t)) + EPS)
        np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=path)
    # optax's own step with b1 = 0 is exactly g / (sqrt(nu_hat) + eps) on the updated state.
    updates, new_adam = optax.scale_by_adam(b1=0.0, b2=B2, eps=EPS).update(g, adam, params)
    new_pre = preconditioner((new_adam,), params, eps=EPS, b2=B2)
    want = jax.tree.map(lambda x, s: x * s, g, new_pre)
    for (path, u), (_, w) in zip(named_leaves(updates), named_leaves(want), strict=True):
        assert_close(u, w, err_msg=path)


def test_restored_dict_state_gives_the_same_factor(adamw_run):
    params, state, _ = adamw_run
    adam = state[0]
    as_dicts = [{"count": adam.count, "mu": adam.mu, "nu": adam.nu}, {"other": jnp.zeros(())}]
    a = preconditioner(state, params, eps=EPS, b2=B2)
    b = preconditioner(as_dicts, params, eps=EPS, b2=B2)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_adafactor_factor_equals_optax_scaling(model):
    params, batches, grad_fn = model
    opt = optax.adafactor(learning_rate=1e-2, min_dim_size_to_factor=4)
    params, state, g = _train(opt, params, batches, grad_fn)
    pre = preconditioner(state, params, eps=EPS, b2=B2)  # eps/b2 unused for Adafactor
    kinds = {p: type(s).__name__ for p, s in named_leaves_keep_factored(pre)}
    assert kinds["embed"] == kinds["out/w"] == kinds["gates/w"] == "FactoredScale"
    assert kinds["gates/b"] == kinds["temp"] == "ArrayImpl"  # 3 < 4: not factored
    for path in ("embed", "out/w"):
        scale = dict(named_leaves_keep_factored(pre))[path]
        row, col = scale.in_out_factors()
        np.testing.assert_allclose(np.outer(row, col), scale.dense(), rtol=1e-6, err_msg=path)
    assert pre["gates"]["w"].in_out_factors() is None  # 3-D: not a matrix outer product
    # optax's scaling of a gradient with the stored moments (decay 1 keeps them unchanged;
    # momentum, clipping and parameter scaling are separate transforms in adafactor's chain).
    rms = optax.scale_by_factored_rms(
        min_dim_size_to_factor=4, decay_rate_fn=lambda step, rate: jnp.asarray(1.0)
    )
    updates, _ = rms.update(g, state[0], params)
    want = jax.tree.map(lambda x, s: x * s, g, dense(pre))
    for (path, u), (_, w) in zip(named_leaves(updates), named_leaves(want), strict=True):
        np.testing.assert_allclose(u, w, rtol=2e-5, err_msg=path)


def named_leaves_keep_factored(tree):
    leaves, _ = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, FactoredScale)
    )
    return [("/".join(str(k.key) for k in p), x) for p, x in leaves]


def test_path_mismatch_names_the_paths(adamw_run):
    params, state, _ = adamw_run
    missing = copy.copy(params)
    del missing["temp"]
    with pytest.raises(PathMismatchError, match=r"extra in state \['temp'\]"):
        preconditioner(state, missing, eps=EPS, b2=B2)
    extra = dict(params, head=jnp.zeros(3))
    with pytest.raises(PathMismatchError, match=r"missing in state \['head'\]"):
        preconditioner(state, extra, eps=EPS, b2=B2)


def test_bad_states_raise(adamw_run, model):
    params, state, _ = adamw_run
    with pytest.raises(CorrectionError, match="b2"):
        preconditioner(state, params, eps=EPS)
    with pytest.raises(CorrectionError, match="found 2"):
        preconditioner((state[0], state[0]), params, eps=EPS, b2=B2)
    with pytest.raises(CorrectionError, match="found 0"):
        preconditioner(optax.sgd(0.1).init(params), params, eps=EPS, b2=B2)
    fresh = optax.adam(1e-3).init(params)
    with pytest.raises(CorrectionError, match="step count 0"):
        preconditioner(fresh, params, eps=EPS, b2=B2)


def test_fingerprint_is_stable_and_sensitive(adamw_run):
    params, state, g = adamw_run
    fp = opt_state_fingerprint(state)
    assert len(fp) == 16 and fp == opt_state_fingerprint(copy.deepcopy(state))
    _, later = optax.adamw(1e-2, b2=B2).update(g, state, params)
    assert opt_state_fingerprint(later) != fp


def _with_zero_row(state, path_keys, row):
    """A copy of an adamw state whose nu is 0 on one row of one tensor (a never-updated row)."""
    adam = state[0]
    nu = jax.tree.map(lambda x: x, adam.nu)
    node = nu
    for k in path_keys[:-1]:
        node = node[k]
    node[path_keys[-1]] = node[path_keys[-1]].at[row].set(0.0)
    return (adam._replace(nu=nu), *state[1:])


def test_v_floor_bounds_a_never_updated_row_and_equals_the_formula(adamw_run):
    params, state, _ = adamw_run
    state = _with_zero_row(state, ["embed"], 3)  # e.g. the UNK input embedding
    t = int(state[0].count)
    v_hat = {p: np.asarray(v, np.float64) / (1 - B2**t) for p, v in named_leaves(state[0].nu)}
    mean = np.mean(np.concatenate([v.ravel() for v in v_hat.values()]))

    plain = preconditioner(state, params, eps=EPS, b2=B2)
    assert_close(np.asarray(plain["embed"])[3], np.full(HIDDEN, 1 / EPS))  # 1e6 unguarded

    floor = 1e-4
    guarded = preconditioner(state, params, eps=EPS, b2=B2, v_floor=floor)
    bound = 1 / np.sqrt(floor * mean)
    assert np.max(np.asarray(guarded["embed"])[3]) <= bound * (1 + 1e-5)
    assert bound < 1e-2 / EPS  # bounded far below 1/eps
    for path, got in named_leaves(guarded):
        want = 1.0 / (np.sqrt(np.maximum(v_hat[path], floor * mean)) + EPS)
        assert_close(got, want, err_msg=path)
    # Rows above the floor keep the plain factor exactly.
    above = v_hat["gates/w"] > floor * mean
    np.testing.assert_array_equal(
        np.asarray(guarded["gates"]["w"])[above], np.asarray(plain["gates"]["w"])[above]
    )
    with pytest.raises(CorrectionError, match="v_floor"):
        preconditioner(state, params, eps=EPS, b2=B2, v_floor=-1.0)


def test_adafactor_v_floor_equals_the_dense_formula(model):
    params, batches, grad_fn = model
    opt = optax.adafactor(learning_rate=1e-2, min_dim_size_to_factor=4)
    params, state, _ = _train(opt, params, batches, grad_fn)
    # A never-updated token row of the (29 x 6) embedding: its statistic (in v_col, which
    # spans the vocabulary axis) holds only Adafactor's eps, 1e-30.
    fs = state[0]
    assert fs.v_col["embed"].shape == (VOCAB,)
    fs = fs._replace(v_col=dict(fs.v_col, embed=fs.v_col["embed"].at[3].set(1e-30)))
    state = (fs, *state[1:])
    plain = dense(preconditioner(state, params))
    assert np.min(np.asarray(plain["embed"])[3]) > 1e12  # unguarded: ~ eps^-1/2
    dense_v = {p: np.asarray(x, np.float64) ** -2 for p, x in named_leaves(plain)}
    mean = np.mean(np.concatenate([v.ravel() for v in dense_v.values()]))
    floor = 1e-4
    guarded = preconditioner(state, params, v_floor=floor)
    kinds = dict(named_leaves_keep_factored(guarded))
    assert not isinstance(kinds["embed"], FactoredScale)  # floored values are not rank one
    assert isinstance(kinds["out/w"], FactoredScale)  # nothing below the floor: kept factored
    for path, got in named_leaves(dense(guarded)):
        want = np.maximum(dense_v[path], floor * mean) ** -0.5
        assert_close(got, want, rtol=1e-4, err_msg=path)
    assert np.max(np.asarray(guarded["embed"])) <= (floor * mean) ** -0.5 * (1 + 1e-4)


@pytest.mark.parametrize("floor", [0.0, 1e-4])
def test_drop_unmoved_zeroes_exactly_where_nu_is_zero_and_keeps_the_rest(adamw_run, floor):
    params, state, _ = adamw_run
    state = _with_zero_row(state, ["embed"], 3)  # a never-updated input embedding row
    # A single zero element inside an otherwise moved tensor too: dropping is per element.
    state = _with_zero_row(state, ["gates", "w"], (1, 2, 4))
    nu = {p: np.asarray(v) for p, v in named_leaves(state[0].nu)}
    zeros = sum(int(np.sum(v == 0)) for v in nu.values())
    assert zeros >= HIDDEN + 1  # the rows set above (token 0 never occurs either)
    kept = preconditioner(state, params, eps=EPS, b2=B2, v_floor=floor)
    dropped = preconditioner(state, params, eps=EPS, b2=B2, v_floor=floor, drop_unmoved=True)
    for (path, got), (_, want) in zip(named_leaves(dropped), named_leaves(kept), strict=True):
        got, want = np.asarray(got), np.asarray(want)
        unmoved = nu[path] == 0
        np.testing.assert_array_equal(got[unmoved], 0.0, err_msg=path)
        # Everywhere else the factor without the option, bit for bit (the floor's mean still
        # counts the dropped zeros, so the floor does not move).
        np.testing.assert_array_equal(got[~unmoved], want[~unmoved], err_msg=path)
    assert np.all(np.asarray(dropped["embed"])[3] == 0.0)
    assert np.asarray(dropped["gates"]["w"])[1, 2, 4] == 0.0


@pytest.mark.parametrize("floor", [0.0, 1e-4])
def test_adafactor_drop_unmoved_zeroes_zero_statistics(model, floor):
    params, batches, grad_fn = model
    opt = optax.adafactor(learning_rate=1e-2, min_dim_size_to_factor=4)
    params, state, _ = _train(opt, params, batches, grad_fn)
    # Zero statistics as optax would keep them with epsilon 0: token 3's column statistic of
    # the factored (29 x 6) embedding, and one entry of the unfactored (3 x 6) gates/b.
    fs = state[0]
    fs = fs._replace(
        v_col=dict(fs.v_col, embed=fs.v_col["embed"].at[3].set(0.0)),
        v=dict(fs.v, gates=dict(fs.v["gates"], b=fs.v["gates"]["b"].at[1, 2].set(0.0))),
    )
    state = (fs, *state[1:])
    kept = dense(preconditioner(state, params, v_floor=floor))
    got = preconditioner(state, params, v_floor=floor, drop_unmoved=True)
    kinds = dict(named_leaves_keep_factored(got))
    # Without a floor the factored embedding stays rank one (a zero in its column factor).
    assert isinstance(kinds["embed"], FactoredScale) == (floor == 0.0)
    got = dense(got)
    unmoved = {p: np.zeros(np.shape(x), bool) for p, x in named_leaves(params)}
    unmoved["embed"][3] = True
    unmoved["gates/b"][1, 2] = True
    for (path, g), (_, k) in zip(named_leaves(got), named_leaves(kept), strict=True):
        g, k = np.asarray(g), np.asarray(k)
        np.testing.assert_array_equal(g[unmoved[path]], 0.0, err_msg=path)
        assert np.all(np.isfinite(g)), path
        # Factored leaves: the same row and column factors multiplied in another order.
        assert_close(g[~unmoved[path]], k[~unmoved[path]], err_msg=path)
    if floor == 0.0:
        assert np.all(np.isinf(np.asarray(kept["embed"])[3]))  # what the option replaces


def test_settings_come_from_the_training_config_and_build_the_same_factor(adamw_run, model):
    params, state, _ = adamw_run
    train_config = {"optimizer": "adamw", "b2": B2, "eps": EPS, "lr": 1e-2}
    s = settings_from(state, train_config, v_floor=1e-4)
    assert s == CorrectionSettings("adamw", "adam", B2, EPS, 4, 1e-4)
    assert s.to_dict() == {
        "optimizer": "adamw",
        "kind": "adam",
        "b2": B2,
        "eps": EPS,
        "count": 4,
        "v_floor": 1e-4,
    }
    assert settings_from(state, train_config, featurize_eps=1e-3).eps == 1e-3
    # drop_unmoved is recorded when set; unset, the dict is the one stores recorded before
    # the option existed, so those stores still resume and match.
    d = settings_from(state, train_config, v_floor=1e-4, drop_unmoved=True)
    assert d.drop_unmoved and d.to_dict() == {**s.to_dict(), "drop_unmoved": True}
    assert "drop_unmoved" not in s.to_dict() and not s.drop_unmoved
    assert CorrectionSettings(**s.to_dict()) == s
    assert CorrectionSettings(**d.to_dict()) == d
    jax.tree.map(
        np.testing.assert_array_equal,
        preconditioner_for(d, state, params),
        preconditioner(state, params, eps=EPS, b2=B2, v_floor=1e-4, drop_unmoved=True),
    )
    got = preconditioner_for(s, state, params)
    want = preconditioner(state, params, eps=EPS, b2=B2, v_floor=1e-4)
    jax.tree.map(np.testing.assert_array_equal, got, want)

    with pytest.raises(CorrectionError, match="'sgd'"):
        settings_from(state, dict(train_config, optimizer="sgd"))
    with pytest.raises(CorrectionError, match="adafactor.*adam moments"):
        settings_from(state, dict(train_config, optimizer="adafactor"))
    with pytest.raises(CorrectionError, match=r"\['b2'\]"):
        settings_from(state, {"optimizer": "adamw", "eps": EPS})
    # Settings are tied to the state they were read from (kind and step count).
    later = (state[0]._replace(count=state[0].count + 1), *state[1:])
    with pytest.raises(CorrectionError, match="step 4"):
        preconditioner_for(s, later, params)

    p, batches, grad_fn = model
    _, fstate, _ = _train(optax.adafactor(1e-2, min_dim_size_to_factor=4), p, batches, grad_fn)
    fs = settings_from(fstate, {"optimizer": "adafactor"})
    assert (fs.kind, fs.b2, fs.eps, fs.count) == ("adafactor", None, None, 4)
    with pytest.raises(CorrectionError, match="featurize.eps"):
        settings_from(fstate, {"optimizer": "adafactor"}, featurize_eps=1e-8)
    # optax adds Adafactor's epsilon to every squared gradient, so no statistic is 0 and
    # drop_unmoved could drop nothing: refused rather than silently a no-op.
    with pytest.raises(CorrectionError, match="adafactor_eps = 1e-30"):
        settings_from(fstate, {"optimizer": "adafactor"}, drop_unmoved=True)
    zero_eps = {"optimizer": "adafactor", "adafactor_eps": 0.0}
    assert settings_from(fstate, zero_eps, drop_unmoved=True).drop_unmoved


# ----------------------------------------------------------------------------- Scale interface


def test_scales_share_one_interface_and_apply_their_dense_factor():
    rng = np.random.default_rng(7)
    row, col = jnp.asarray(rng.uniform(0.5, 2, 5)), jnp.asarray(rng.uniform(0.5, 2, 3))
    arr = jnp.asarray(rng.uniform(0.5, 2, (3, 5)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((3, 5)), jnp.float32)
    elementwise, factored = correction.ElementwiseScale(arr), FactoredScale(row, col, 0, 1)
    cube = FactoredScale(jnp.ones((2, 5)), jnp.ones((2, 3)), 1, 2)  # 3-D: no in/out form
    for s in (elementwise, factored, cube):
        assert isinstance(s, correction.Scale) and correction.is_scale(s)
    assert not correction.is_scale(arr)
    assert correction.as_scale(arr).dense() is arr and correction.as_scale(factored) is factored
    assert elementwise.in_out_factors() is None and cube.in_out_factors() is None
    in_, out = factored.in_out_factors()
    np.testing.assert_array_equal(np.outer(in_, out), factored.dense())
    for s in (elementwise, factored):
        np.testing.assert_array_equal(s.apply(g), g * s.dense())
        assert s.shape() == (3, 5)
        # Pytree nodes: a scale is a jit argument and comes back as the same kind.
        np.testing.assert_array_equal(jax.jit(lambda s: s.apply(g))(s), s.apply(g))
    assert cube.shape() == (2, 3, 5)
    # named_scales keeps a factored scale whole (one parameter) and wraps plain arrays.
    named = correction.named_scales({"a": arr, "b": factored})
    assert [p for p, _ in named] == ["a", "b"]
    assert named[0][1].kind == "elementwise" and named[1][1] is factored
    np.testing.assert_array_equal(dense({"a": arr, "b": factored})["b"], factored.dense())


# ----------------------------------------------------------------------------- registry


def test_registry_gives_the_store_labels_and_covers_every_training_optimizer():
    from trackstar import store, train

    # Labels stores record; "estimate" reads no optimizer (trackstar.v_estimate).
    assert list(correction.CORRECTIONS) == ["adam", "adafactor", "estimate"]
    assert store.CORRECTIONS == ("adam", "adafactor", "estimate", "none")
    assert correction.CORRECTIONS["estimate"].optimizer is None
    assert correction.OPTIMIZER_KINDS == {"adamw": "adam", "adafactor": "adafactor"}
    assert set(correction.OPTIMIZER_KINDS) == set(train.OPTIMIZERS)
    assert correction.for_optimizer("sgd") is None
    assert correction.for_optimizer("adafactor").label == "adafactor"


def _rms_settings(train_config, featurize_eps, drop_unmoved):
    return None, float(featurize_eps if featurize_eps >= 0 else train_config["eps"])


def _rms_preconditioner(state, params, *, eps, b2, v_floor, drop_unmoved):
    nu = dict(named_leaves(state.nu))
    return jax.tree_util.tree_map_with_path(
        lambda p, x: 1.0 / (jnp.sqrt(nu[path_name(p)]) + eps), params
    )


def test_a_new_correction_is_one_registered_entry(monkeypatch):
    """RMSProp as an example: registering it is all settings_from / preconditioner need."""
    for name in ("CORRECTIONS", "OPTIMIZER_KINDS", "_STATE_KINDS"):
        monkeypatch.setattr(correction, name, dict(getattr(correction, name)))
    correction.register(
        correction.Correction(
            label="rms",
            optimizer="rmsprop",
            state_kind="rms",
            state_type=type(optax.rmsprop(0.1, bias_correction=True).init({})[0]),
            state_fields=frozenset({"count", "nu"}),
            train_fields=("eps",),
            read_settings=_rms_settings,
            build=_rms_preconditioner,
        )
    )
    with pytest.raises(ValueError, match="exists"):
        correction.register(correction.CORRECTIONS["rms"])
    params = {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}
    opt = optax.rmsprop(0.1, bias_correction=True)
    state = opt.init(params)
    _, state = opt.update(jax.tree.map(lambda x: 2 * x, params), state, params)
    assert [k for k, _ in correction.find_moment_states(state)] == ["rms"]
    settings = settings_from(state, {"optimizer": "rmsprop", "eps": 1e-3})
    assert (settings.kind, settings.eps, settings.count) == ("rms", 1e-3, 1)
    pre = preconditioner_for(settings, state, params)
    nu = optax.tree_utils.tree_get(state, "nu")
    np.testing.assert_array_equal(pre["w"], 1.0 / (jnp.sqrt(nu["w"]) + 1e-3))
