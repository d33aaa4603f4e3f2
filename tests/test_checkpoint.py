"""Checkpoint round trip, structure checks and refusal of incomplete step directories."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from trackstar import checkpoint as C
from trackstar.tree import named_leaves


def _tree(scale=1.0, d=3):
    return {
        "blocks": {0: {"kernel": scale * jnp.arange(2.0 * d).reshape(2, d)}},
        "bias": jnp.full((d,), scale),
    }


def _state(params):
    opt = optax.adamw(1e-2)
    state = opt.init(params)
    grads = jax.tree.map(lambda p: p * 0.5 + 1.0, params)
    _, state = opt.update(grads, state, params)  # Non-trivial mu, nu and count.
    return state


def _abstract(tree):
    return jax.eval_shape(lambda t: t, tree)


def _assert_equal(a, b):
    la, lb = named_leaves(a), named_leaves(b)
    assert [n for n, _ in la] == [n for n, _ in lb]
    for (name, x), (_, y) in zip(la, lb, strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype, name
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)


def test_round_trip_with_optimizer_state_and_meta(tmp_path):
    d = str(tmp_path / "ck")
    params = _tree()
    state = _state(params)
    C.save(d, 5, params, state, meta={"data_position": 7, "note": "x"})
    assert C.latest_step(d) == 5
    p2, s2, meta = C.restore(d, _abstract(params), _abstract(state))
    _assert_equal(p2, params)
    _assert_equal(s2, state)
    assert jax.tree_util.tree_structure(s2) == jax.tree_util.tree_structure(state)
    assert int(s2[0].count) == 1  # The Adam step count survives (bias correction needs it).
    assert meta["step"] == 5 and meta["data_position"] == 7 and meta["note"] == "x"
    assert meta["params_spec"]["blocks/0/kernel"] == [[2, 3], "float32"]
    assert "0/nu/blocks/0/kernel" in meta["opt_state_spec"]


def test_missing_and_incompatible_checkpoints_name_the_problem(tmp_path):
    d = str(tmp_path / "ck")
    with pytest.raises(C.CheckpointError, match="no checkpoint directory at .*ck"):
        C.restore(d, {}, {})
    os.makedirs(d)
    with pytest.raises(C.CheckpointError, match="no complete checkpoint in"):
        C.restore(d, {}, {})
    params = _tree()
    C.save(d, 1, params, _state(params))
    with pytest.raises(C.CheckpointError, match="does not exist; complete steps .*\\[1\\]"):
        C.restore(d, _abstract(params), _abstract(_state(params)), step=2)
    bigger = _tree(d=4)
    with pytest.raises(C.CheckpointError) as err:
        C.restore(d, _abstract(bigger), _abstract(_state(bigger)))
    msg = str(err.value)
    assert "blocks/0/kernel: expected float32(2, 4), checkpoint has float32(2, 3)" in msg
    assert "bias: expected float32(4,), checkpoint has float32(3,)" in msg
    renamed = {"blocks": params["blocks"], "scale": params["bias"]}
    with pytest.raises(C.CheckpointError, match="scale: expected .* not in checkpoint"):
        C.restore(d, _abstract(renamed), _abstract(_state(params)))


def test_incomplete_and_temporary_steps_are_never_used(tmp_path):
    d = str(tmp_path / "ck")
    params = _tree()
    state = _state(params)
    C.save(d, 3, params, state)
    # A crashed Orbax write (temporary dir) and a half-copied step dir, both newer.
    os.makedirs(os.path.join(d, "7.orbax-checkpoint-tmp-1234", "params"))
    shutil.copytree(os.path.join(d, "3"), os.path.join(d, "9"))
    os.remove(os.path.join(d, "9", "opt_state", "_METADATA"))
    assert C.all_steps(d) == [3] and C.latest_step(d) == 3
    p2, _, meta = C.restore(d, _abstract(params), _abstract(state))
    assert meta["step"] == 3
    _assert_equal(p2, params)
    with pytest.raises(C.CheckpointError, match="9 is incomplete"):
        C.restore(d, _abstract(params), _abstract(state), step=9)
    with pytest.raises(C.CheckpointError, match="already holds an incomplete checkpoint"):
        C.save(d, 9, params, state)


def test_corrupted_values_fail_verification_and_keep_policy(tmp_path):
    d = str(tmp_path / "ck")
    params = _tree()
    with C.Checkpointer(d, keep=2) as ck:
        for step in (1, 2, 3):
            ck.save(step, _tree(scale=float(step)), _state(params))
    assert C.all_steps(d) == [2, 3]
    p2, _, _ = C.restore(d, _abstract(params), _abstract(_state(params)), step=2)
    _assert_equal(p2, _tree(scale=2.0))
    # Simulate bytes that no longer match what was saved.
    meta_path = os.path.join(d, "3", "meta", "metadata")
    with open(meta_path) as f:
        meta = json.load(f)
    meta["params_fingerprint"] = "0" * 16
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    with pytest.raises(C.CheckpointError, match="do not match the fingerprint"):
        C.restore(d, _abstract(params), _abstract(_state(params)))
    C.restore(d, _abstract(params), _abstract(_state(params)), verify=False)
