"""The imported families (llama with GQA and Qwen2 biases, neox) on 2x4 "tensor" and 4x2 "fsdp"
meshes agree with one device, take the fast path and shard every parameter by the rules.

The multi-device part runs once in a subprocess with 8 fake CPU devices
(tests/hf_mesh_worker.py; the project's own gpt2 model is covered by tests/test_sharding.py).
Reference: ``gradients.make_feature_fn`` on one device, same positive random preconditioner and
global Kronecker projector. Vectors agree to 1e-5 relative to their largest magnitude.
"""

from __future__ import annotations

import math
import os

import hf_mesh_worker as W
import jax
import numpy as np
import pytest
from sharding_worker import run_worker
from tolerances import assert_close

from trackstar import families
from trackstar import sharding as sh
from trackstar.tree import named_leaves, path_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

COL, ROW, VEC, REP = "P(None, 'model')", "P('model', None)", "P('model',)", "P()"
# What the "tensor" preset must give each parameter, written out independently of the regexes
# (a rule that stops matching falls through to ".*" = replicated and would pass silently):
# column-parallel q/k/v/gate/up (qkv, h_to_4h) with their biases, row-parallel o/down (dense,
# 4h_to_h) with replicated biases, embedding split along the hidden width, head along the vocab.
TENSOR = {
    "llama": {
        "attn/q/kernel": COL,
        "attn/k/kernel": COL,
        "attn/v/kernel": COL,
        "attn/q/bias": VEC,
        "attn/k/bias": VEC,
        "attn/v/bias": VEC,
        "attn/o/kernel": ROW,
        "mlp/gate/kernel": COL,
        "mlp/up/kernel": COL,
        "mlp/down/kernel": ROW,
        "attn_norm/scale": REP,
        "mlp_norm/scale": REP,
        "final_norm/scale": REP,
        "embed/embedding": COL,
        "unembed/kernel": COL,
    },
    "neox": {
        "attn/qkv/kernel": COL,
        "attn/qkv/bias": VEC,
        "attn/dense/kernel": ROW,
        "attn/dense/bias": REP,
        "mlp/dense_h_to_4h/kernel": COL,
        "mlp/dense_h_to_4h/bias": VEC,
        "mlp/dense_4h_to_h/kernel": ROW,
        "mlp/dense_4h_to_h/bias": REP,
        "input_layernorm/scale": REP,
        "input_layernorm/bias": REP,
        "post_attention_layernorm/scale": REP,
        "post_attention_layernorm/bias": REP,
        "final_layer_norm/scale": REP,
        "final_layer_norm/bias": REP,
        "embed_in/embedding": COL,
        "embed_out/kernel": COL,
    },
}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf_mesh") / "report.json"
    worker = os.path.join(ROOT, "tests", "hf_mesh_worker.py")
    return run_worker(worker, [str(out)], str(out))


def _meshes(report):
    for fam, rep in report.items():
        for name, m in rep["meshes"].items():
            yield fam, name, m


@pytest.mark.parametrize("family", ["llama", "neox"])
def test_vectors_agree_with_one_device_on_the_fast_path(report, family):
    rep = report[family]
    ref = np.asarray(rep["ref_v"])
    assert ref.shape == (W.N_TRAIN, W.PROJ["k_in"] * W.PROJ["k_out"])
    assert np.all(np.isfinite(ref)) and rep["vec_scale"] > 0
    assert rep["ref_fast"] and rep["ref_fast_calls"] >= 1
    assert set(rep["meshes"]) == {"2x4-tensor", "4x2-fsdp"}
    for name, m in rep["meshes"].items():
        v = np.asarray(m["v"])
        assert_close(v, ref, err_msg=f"{family} {name}")
        # The fast path: the flag, and activation_features traced for this mesh's kernel.
        assert m["fast"] and m["fast_calls"] >= 1, (family, name)
        assert m["out_sharding"] == "P('data',)", (family, name)
        print(
            f"{family} {name}: max abs diff {np.abs(v - ref).max():.3g} "
            f"(scale {rep['vec_scale']:.3g})"
        )


def test_per_example_gradients_never_gathered(report):
    for fam, name, m in _meshes(report):
        assert m["per_example_gathers"] == [], (fam, name, m["per_example_gathers"])
    # The HLO scan is not vacuous: the tensor-parallel kernels do gather (activations
    # B/data x T x D and projection factors), just never a batch of per-example gradients.
    for fam in report:
        assert report[fam]["meshes"]["2x4-tensor"]["all_gathers"], fam


def _even_shards(fam, name, m, shapes):
    """Every device's block is the full shape divided exactly by the spec's mesh axes."""
    mesh_shape = m["mesh_shape"]
    for path, spec_text in m["param_specs"].items():
        shape = shapes[path]
        axes = m["param_axes"][path] + [None] * (len(shape) - len(m["param_axes"][path]))
        assert len(axes) == len(shape), (fam, name, path, shape, spec_text)
        sizes = [1 if a is None else mesh_shape[a] for a in axes]
        assert all(d % s == 0 for d, s in zip(shape, sizes, strict=True)), (fam, name, path)
        want = [d // s for d, s in zip(shape, sizes, strict=True)]
        blocks = m["placed_shard_shapes"][path]
        assert len(blocks) == math.prod(mesh_shape.values()), (fam, name, path)
        assert all(b == want for b in blocks), (fam, name, path, blocks, want)
        # The preconditioner lies like its parameter.
        assert m["precond_specs"][path] == spec_text, (fam, name, path)


def test_parameter_shardings_follow_the_family_rules(report):
    for fam, name, m in _meshes(report):
        shapes = report[fam]["shapes"]
        assert set(m["param_specs"]) == set(shapes)
        _even_shards(fam, name, m, shapes)
        model = m["mesh_shape"]["model"]
        for path, spec in m["param_specs"].items():
            suffix = path.split("/", 2)[-1] if path.startswith("blocks/") else path
            if name.endswith("tensor"):
                assert spec == TENSOR[fam][suffix], (fam, path, spec)
            else:  # fsdp: the largest dimension the model axis divides; vectors replicated
                shape = shapes[path]
                dims = [i for i in np.argsort(shape, kind="stable")[::-1] if shape[i] % model == 0]
                want = [None] * len(shape)
                want[int(dims[0])] = "model"
                assert spec == (str(sh.P(*want)) if len(shape) >= 2 else REP), (fam, path, spec)
    # Qwen2 layout: q/k/v biases present, no o bias; untied head.
    llama = report["llama"]["shapes"]
    assert "blocks/0/attn/k/bias" in llama and "blocks/0/attn/o/bias" not in llama
    assert "unembed/kernel" in llama
    # GQA: k/v kernels have n_kv_heads * head_dim = 2 * 8 columns, q 4 * 8; on model = 4 they
    # split evenly into 4 columns (half a kv head) and q into one head per device.
    blocks = report["llama"]["meshes"]["2x4-tensor"]["placed_shard_shapes"]
    assert llama["blocks/0/attn/k/kernel"] == [32, 16]
    assert blocks["blocks/0/attn/k/kernel"][0] == blocks["blocks/0/attn/v/kernel"][0] == [32, 4]
    assert blocks["blocks/0/attn/q/kernel"][0] == [32, 8]
    # neox: the fused qkv columns are grouped per head, so model = 4 = heads gives each device
    # one whole head's q, k and v (3 * head_dim = 24 columns).
    blocks = report["neox"]["meshes"]["2x4-tensor"]["placed_shard_shapes"]
    assert blocks["blocks/0/attn/qkv/kernel"][0] == [32, 24]


@pytest.mark.parametrize("family", ["llama", "neox"])
def test_tensor_rules_shard_evenly_or_refuse(family):
    """On any model-axis size the "tensor" preset either shards every dimension evenly or raises
    a ShardingError naming the tensor (never an uneven block or a silent fallback)."""
    cfg = W.FAMILIES[family]
    params = families.abstract_params(cfg, W.VOCAB)
    rules = sh.preset_rules("tensor", cfg)
    outcomes = {}
    for model in (1, 2, 3, 4, 8, 16, 32, 64):
        mesh_shape = {"data": 1, "model": model}
        try:
            specs = sh.param_specs(params, rules, mesh_shape)
        except sh.ShardingError as e:
            assert "not divisible" in str(e) and "rule_overrides" in str(e), str(e)
            outcomes[model] = str(e).split("'")[1]  # the refused tensor's path
            continue
        spec_leaves = dict(_spec_leaves(specs))
        for path, x in named_leaves(params):
            spec = tuple(spec_leaves[path])
            block = sh.shard_shape(tuple(x.shape), sh.P(*spec), mesh_shape)
            axes = spec + (None,) * (len(x.shape) - len(spec))
            for d, b, axis in zip(x.shape, block, axes, strict=True):
                assert b * (model if axis == "model" else 1) == d, (family, model, path)
        outcomes[model] = "ok"
    # llama: 32 devices cannot split the 16 k/v columns; neox: 64 cannot split the hidden 32.
    widest = {"llama": 16, "neox": 32}[family]
    assert all(outcomes[m] == "ok" for m in (1, 2, 4, 8, 16, 32) if m <= widest), outcomes
    assert outcomes[3] != "ok" and outcomes[2 * widest] != "ok", outcomes
    if family == "llama":
        assert outcomes[32].startswith("blocks/0/attn/k/"), outcomes


def _spec_leaves(specs):
    leaves, _ = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, sh.P))
    return [(path_name(p), s) for p, s in leaves]
