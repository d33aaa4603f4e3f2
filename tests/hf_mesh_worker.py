"""Subprocess worker for tests/test_hf_mesh.py: the imported families (llama, neox) on meshes.

Needs ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before JAX is imported, so it runs
in a fresh process and writes a JSON report; the test asserts.

    python tests/hf_mesh_worker.py OUT.json
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# T = 12 differs from every parameter dimension (16, 32, 64, 96), so no activation or
# per-example loss (B, T, ...) looks like a per-example gradient in the all-gather check.
VOCAB, T, N_TRAIN, BATCH = 64, 12, 16, 8
# Qwen2-like Llama: grouped-query attention (4 query heads, 2 kv heads of 8 dims: k/v kernels
# of 16 columns), q/k/v biases without an o bias, an untied head.
LLAMA = dict(
    family="llama",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    attention_bias=True,
    o_bias=False,
    tie_word_embeddings=False,
    max_position_embeddings=24,
)
NEOX = dict(
    family="neox",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    rotary_pct=0.5,
    tie_word_embeddings=False,
    max_position_embeddings=24,
)
FAMILIES = {"llama": LLAMA, "neox": NEOX}
MESHES = [(2, 4, "tensor"), (4, 2, "fsdp")]  # (data, model, rules preset)
PROJ = dict(mode="global", k_in=8, k_out=8, seed=0)


def examples(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded token rows with loss weights on their real positions."""
    tok = rng.integers(4, VOCAB, (n, T)).astype(np.int32)
    w = np.zeros((n, T), np.float32)
    for i in range(n):
        length = int(rng.integers(5, T + 1))
        tok[i, length:] = 0
        w[i, 1:length] = 1.0
    return tok, w


def run_family(name: str, cfg: dict, calls: list[int]) -> dict:
    import jax
    from sharding_worker import per_example_gathers

    from trackstar import families
    from trackstar import sharding as sh
    from trackstar.featurize import make_mesh_feature_fn
    from trackstar.gradients import make_feature_fn
    from trackstar.projection import Projector
    from trackstar.tree import named_leaves

    apply_fn, params = families.make_model(cfg, VOCAB, 0)
    params = jax.tree.map(np.asarray, params)
    rng = np.random.default_rng(1)
    # A positive random elementwise (Adam-like) correction factor per parameter.
    precond = jax.tree.map(lambda p: rng.uniform(0.5, 2.0, np.shape(p)).astype(np.float32), params)
    projector = Projector(params, PROJ["mode"], PROJ["k_in"], PROJ["k_out"], PROJ["seed"])
    tok, w = examples(rng, N_TRAIN)
    shapes = {p: list(np.shape(x)) for p, x in named_leaves(params)}

    before = calls[0]
    ref_fn = make_feature_fn(apply_fn, "train", projector, precond)
    ref_v = np.concatenate(
        [np.asarray(ref_fn(params, tok[i : i + BATCH], w[i : i + BATCH])) for i in (0, BATCH)]
    )
    out: dict = {
        "shapes": shapes,
        "ref_fast": bool(getattr(ref_fn, "fast", False)),
        "ref_fast_calls": calls[0] - before,
        "vec_scale": float(np.abs(ref_v).max()),
        "ref_v": ref_v.tolist(),
        "meshes": {},
    }
    devices = jax.devices()
    for data, model, rules in MESHES:
        t0 = time.perf_counter()
        mesh = sh.make_mesh(data, model, devices[: data * model])
        shardings = sh.param_shardings(params, mesh, sh.preset_rules(rules, cfg))
        before = calls[0]
        fn = make_mesh_feature_fn(apply_fn, "train", projector, precond, mesh, shardings)
        placed = sh.place(params, shardings)
        compiled = fn.jitted.lower(placed, fn.precond, tok[:BATCH], w[:BATCH]).compile()
        parts = [compiled(placed, fn.precond, tok[i : i + BATCH], w[i : i + BATCH]) for i in (0, 8)]
        v = np.concatenate([np.asarray(x) for x in parts])
        precond_specs = {
            p: str(s.spec)
            for p, s in sh._named(jax.tree.map(lambda x: x.sharding, fn.precond))  # noqa: SLF001
        }
        hlo = compiled.as_text()
        out["meshes"][f"{data}x{model}-{rules}"] = {
            "mesh_shape": dict(mesh.shape),
            "fast": bool(fn.fast),
            "fast_calls": calls[0] - before,
            "v": v.tolist(),
            "out_sharding": str(parts[0].sharding.spec),
            "per_example_gathers": per_example_gathers(
                hlo, BATCH // data, [tuple(s) for s in shapes.values()]
            ),
            "all_gathers": re.findall(r"= (f32\[[\d,]*\])[^=]*? all-gather\(", hlo),
            "param_specs": {p: str(s.spec) for p, s in sh._named(shardings)},  # noqa: SLF001
            "param_axes": {p: list(s.spec) for p, s in sh._named(shardings)},  # noqa: SLF001
            "precond_specs": precond_specs,
            "placed_shard_shapes": {
                p: [list(s.data.shape) for s in x.addressable_shards]
                for p, x in named_leaves(placed)
            },
            "seconds": time.perf_counter() - t0,
        }
    return out


def main() -> None:
    from trackstar import gradients

    calls = [0]
    real = gradients.activation_features

    def spy(*args, **kwargs):  # counts traces of the fast path (make_feature_fn calls it)
        calls[0] += 1
        return real(*args, **kwargs)

    gradients.activation_features = spy
    report = {name: run_family(name, cfg, calls) for name, cfg in FAMILIES.items()}
    with open(sys.argv[1], "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
