"""The kernels on meshes of 1, 2, 4 and 8 devices agree with the reference formulas.

The multi-device checks run once in a subprocess with 8 fake CPU devices
(tests/sharding_worker.py), so this process and every other test keep seeing one device.
References: vectors from ``gradients.make_feature_fn`` (no mesh), R = UᵀU / n in float64,
top-k on one device. Tolerances (max abs difference relative to the max abs value): vectors
1e-5 (bitwise on the 1-device mesh), R 1e-6; top-k ids exactly equal, scores to 1e-5.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from sharding_worker import run_worker

from trackstar import sharding as sh
from trackstar.config import load_config_file
from trackstar.score import ScoreError, merge_top_k, score_preset, top_k_scores

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "sharding_worker.py")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharding") / "report.json"
    return run_worker(WORKER, ["devices", str(out)], str(out))


def test_vectors_R_topk_agree_on_1_2_4_8_devices(report):
    counts = set()
    for name, m in report["meshes"].items():
        counts.add(m["devices"])
        assert m["vec_max_abs"] <= 1e-5 * m["vec_scale"], (name, m["vec_max_abs"])
        assert m["R_max_abs"] <= 1e-6 * m["R_scale"], (name, m["R_max_abs"])
        assert m["topk_ids_equal"], name
        assert m["topk_score_max_abs"] <= 1e-5, name
        assert m["out_sharding"] == "P('data',)", name
    assert counts == {1, 2, 4, 8}
    assert report["meshes"]["1x1-tensor"]["vec_bitwise"]  # one device: the same program
    m8 = report["meshes"]["2x4-tensor"]
    print(
        f"1-vs-8-device max abs diff: vectors {m8['vec_max_abs']:.3g} (scale "
        f"{m8['vec_scale']:.3g}), R {m8['R_max_abs']:.3g} (scale {m8['R_scale']:.3g})"
    )


def test_per_example_gradients_never_gathered(report):
    for name, m in report["meshes"].items():
        assert m["per_example_gathers"] == [], (name, m["per_example_gathers"])


def test_parameter_shardings_follow_the_rules(report):
    specs = report["meshes"]["2x4-tensor"]["param_specs"]
    shapes = report["meshes"]["2x4-tensor"]["placed_shard_shapes"]
    expected = {
        "blocks/0/attn/qkv/kernel": ("P(None, 'model')", [32, 24]),
        "blocks/0/attn/qkv/bias": ("P('model',)", [24]),
        "blocks/0/attn/out/kernel": ("P('model', None)", [8, 32]),
        "blocks/0/attn/out/bias": ("P()", [32]),
        "blocks/0/mlp/fc_in/kernel": ("P(None, 'model')", [32, 16]),
        "blocks/0/mlp/fc_out/kernel": ("P('model', None)", [16, 32]),
        "blocks/0/mlp_norm/scale": ("P()", [32]),
        "embed/embedding": ("P(None, 'model')", [64, 8]),
        "pos_embed/embedding": ("P(None, 'model')", [24, 8]),
        "unembed/kernel": ("P(None, 'model')", [32, 16]),
    }
    assert "unembed/bias" not in specs  # GPT-2's untied head has no bias
    for path, (spec, shard) in expected.items():
        assert specs[path] == spec, path
        assert shapes[path] == shard, path
    fsdp = report["meshes"]["4x2-fsdp"]["param_specs"]
    assert fsdp["embed/embedding"] == "P('model', None)"  # largest dim: vocab 64
    assert fsdp["blocks/0/mlp/fc_out/kernel"] == "P('model', None)"  # (64, 32)
    assert fsdp["blocks/0/attn/qkv/bias"] == "P()"  # vectors stay replicated


def test_large_config_memory_from_shardings(report):
    got = report["large"]
    assert 0.9e9 < got["n_params"] < 1.2e9
    # The arithmetic report equals the bytes of the real NamedShardings' shard shapes.
    assert got["arith_param_bytes"] == got["named_sharding_param_bytes"]
    cfg = load_config_file(os.path.join(ROOT, "configs", "large.py"))
    params = sh.abstract_lm_params(cfg.model, cfg.mesh.memory_vocab_size)
    mem = sh.memory_report(params, sh.rules_from_config(cfg.mesh), {"data": 1, "model": 8})
    # Norm scales and out-projection biases stay replicated: just over 1/8 of the total.
    assert 1 / 8 <= mem["params_gib"] / mem["replicated_params_gib"] < 1.01 / 8
    assert mem["params_gib"] * 2**30 == pytest.approx(got["arith_param_bytes"])


# ----------------------------------------------------------------------------- in-process units


def test_rules_parse_and_refuse_bad_input():
    assert sh.parse_spec("None,model") == (None, "model")
    assert sh.parse_spec("") == () and sh.parse_spec("fsdp") == "fsdp"
    with pytest.raises(sh.ShardingError, match="unknown mesh axis"):
        sh.parse_spec("modle")
    rules = (("kernel$", ("model", None)), (".*", ()))
    assert sh.spec_for("a/kernel", (8, 4), rules, {"data": 1, "model": 4}) == P("model", None)
    assert sh.spec_for("a/bias", (8,), rules, {"data": 1, "model": 4}) == P()
    with pytest.raises(sh.ShardingError, match="not divisible"):
        sh.spec_for("a/kernel", (6, 4), rules, {"data": 1, "model": 4})
    with pytest.raises(sh.ShardingError, match="longer than its rank"):
        sh.spec_for("a/kernel", (8,), rules, {"data": 1, "model": 4})
    with pytest.raises(sh.ShardingError, match="no sharding rule"):
        sh.spec_for("x", (2,), (("kernel$", ()),), {"model": 1})
    cfg = load_config_file(os.path.join(ROOT, "configs", "demo.py"))
    cfg.mesh.rule_overrides = ("fc_in/kernel$=model,None",)
    rules = sh.rules_from_config(cfg.mesh)
    spec = sh.spec_for("blocks/0/mlp/fc_in/kernel", (8, 16), rules, {"model": 2})
    assert spec == P("model", None)
    cfg.mesh.rules = "nope"
    with pytest.raises(sh.ShardingError, match="mesh.rules"):
        sh.rules_from_config(cfg.mesh)


def test_mesh_errors_and_one_device_mesh():
    mesh = sh.make_mesh(-1, 1)
    assert dict(mesh.shape) == {"data": jax.device_count(), "model": 1}
    one = sh.single_device_mesh()
    assert dict(one.shape) == {"data": 1, "model": 1} and sh.default_mesh(None) == one
    assert sh.default_mesh(mesh) is mesh
    with pytest.raises(sh.ShardingError, match="divide"):
        sh.make_mesh(-1, jax.device_count() + 1)


def test_merge_top_k_breaks_ties_to_lower_id():
    scores = np.array([[[3.0, 1.0]], [[3.0, 2.0]]], np.float32)  # shards x Q x k
    ids = np.array([[[7, 1]], [[2, 5]]], np.int32)
    got_ids, got_s = merge_top_k(scores, ids, 3)
    np.testing.assert_array_equal(got_ids, [[2, 7, 5]])
    np.testing.assert_array_equal(got_s, [[3.0, 3.0, 2.0]])
    empty = np.full((1, 1, 2), -np.inf, np.float32)
    got_ids, _ = merge_top_k(
        np.concatenate([scores[:1], empty]), np.concatenate([ids[:1], -np.ones_like(ids[:1])]), 2
    )
    np.testing.assert_array_equal(got_ids, [[7, 1]])


# ----------------------------------------------------------------------------- non-finite rows


def test_scoring_on_a_mesh_refuses_a_nan_row_naming_its_id(tmp_path, monkeypatch):
    from test_score import corrupt_store

    rng = np.random.default_rng(4)
    train = rng.normal(size=(50, 8)).astype(np.float32)
    queries = rng.normal(size=(3, 8)).astype(np.float32)
    store = corrupt_store(tmp_path / "s", monkeypatch, train, {37: np.nan})
    mesh = sh.make_mesh(-1, 1)
    named = r"example ids \[37\] \(store chunks \[2\]\) against every query.*refeaturize"
    with pytest.raises(ScoreError, match=named):
        top_k_scores(store, queries, None, None, True, 4, mesh=mesh)
    with pytest.raises(ScoreError, match=named):
        score_preset(store, queries, "exp_opt_norm", None, 4, mesh=mesh)
    bad_q = queries.copy()
    bad_q[1, 0] = np.inf
    with pytest.raises(ScoreError, match=r"indices \[1\].*refeaturize the queries"):
        top_k_scores(train, bad_q, None, None, True, 4, mesh=mesh)


NAN_ROWS_ON_4_DEVICES = """
import numpy as np
from trackstar import sharding as sh
from trackstar.score import ScoreError, top_k_scores

rng = np.random.default_rng(5)
train = rng.normal(size=(60, 8)).astype(np.float32)
queries = rng.normal(size=(3, 8)).astype(np.float32)
train[[22, 3, 41]] = np.nan  # rows that land on different devices and steps
train[50, 2] = np.inf
mesh = sh.make_mesh(-1, 1)
assert mesh.devices.size == 4
try:
    top_k_scores(train, queries, None, None, False, 5, rows_per_step=8, mesh=mesh)
except ScoreError as e:
    print("ERROR:", e)
ids, _ = top_k_scores(train[:3], queries, None, None, False, 5, rows_per_step=8, mesh=mesh)
print("CLEAN:", ids.shape)
"""


def test_nan_rows_on_several_devices_are_all_named():
    env = dict(os.environ)
    env.update(
        XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu", PYTHONPATH=ROOT
    )
    r = subprocess.run(
        [sys.executable, "-c", NAN_ROWS_ON_4_DEVICES],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "example ids [3, 22, 41, 50] against every query" in r.stdout, r.stdout
    assert "CLEAN: (3, 3)" in r.stdout, r.stdout
