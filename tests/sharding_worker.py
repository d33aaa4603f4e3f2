"""Subprocess worker for tests/test_sharding.py and tests/test_multihost.py.

Multi-device checks need ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` before JAX is
imported, so they run here, in a fresh process, and report JSON / npz; the tests assert.

    python tests/sharding_worker.py devices OUT.json
    python tests/sharding_worker.py featurize --store DIR --out OUT.npz
        [--coordinator HOST:PORT --num-processes P --process-id I] [--kill-after N] [--slow S]
        [--scope local|global] [--chunk C] [--only-chunks 0,2] [--no-score]

``--no-score`` writes ``OUT.npz-pI.json`` with process I's kernel call count instead.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Tiny world shared by every worker run: deterministic, identical in every process.
VOCAB, T, N_TRAIN, N_QUERY, K = 64, 16, 40, 6, 5
# max_len != T so no activation shape (B, T, D) looks like a per-example pos_embed gradient.
# The demo LM's configuration (toy_models.demo_lm; not imported: it imports jax).
MODEL_CFG = dict(family="gpt2", tie_word_embeddings=False, size="tiny", d_model=32, n_layers=1)
MODEL_CFG.update(n_heads=2, d_ff=64, max_len=T + 8)
PROJ = dict(mode="global", k_in=8, k_out=8, seed=0)


def build():
    """``(apply_fn, params, precond, projector, train examples, query examples)``."""
    import jax

    from trackstar.hf import gpt2
    from trackstar.projection import Projector

    # The project's LM, initialized from numpy (eager nnx init dispatches dozens of tiny ops).
    apply_fn = gpt2.make_apply(MODEL_CFG, VOCAB)
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda x: (rng.standard_normal(x.shape) / np.sqrt(x.shape[0])).astype(np.float32),
        gpt2.abstract_params(MODEL_CFG, VOCAB),
    )
    # A positive Adam-like correction factor per parameter.
    precond = jax.tree.map(lambda p: rng.uniform(0.5, 2.0, np.shape(p)).astype(np.float32), params)
    projector = Projector(params, PROJ["mode"], PROJ["k_in"], PROJ["k_out"], PROJ["seed"])

    def examples(n, query):
        tok = rng.integers(4, VOCAB, (n, T)).astype(np.int32)
        w = np.zeros((n, T), np.float32)
        for i in range(n):
            length = int(rng.integers(5, T + 1))
            tok[i, length:] = 0
            start = length - 2 if query else 1
            w[i, start:length] = 1.0
        return tok, w

    return apply_fn, params, precond, projector, examples(N_TRAIN, False), examples(N_QUERY, True)


def run_worker(worker: str, args: list[str], out: str, devices: int = 8) -> dict:
    """Runs ``python <worker> *args`` with ``devices`` fake CPU devices and returns the JSON it
    wrote to ``out`` (the tests' process keeps its one device)."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=root,
    )
    r = subprocess.run(
        [sys.executable, worker, *args], env=env, capture_output=True, text=True, timeout=400
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    with open(out) as f:
        return json.load(f)


def per_example_gathers(hlo: str, local_batch: int, shapes: list[tuple[int, ...]]) -> list[str]:
    """All-gather results shaped like a batch of full per-example gradients (must be none)."""
    bad = []
    full = {(local_batch, *s) for s in shapes} | {
        (local_batch, int(np.prod(s[:-1])), s[-1]) for s in shapes if len(s) >= 2
    }
    for m in re.finditer(r"= f32\[([\d,]*)\][^=]*? all-gather\(", hlo):
        dims = tuple(int(x) for x in m.group(1).split(",") if x)
        if dims in full:
            bad.append(m.group(0)[:80])
    return bad


def run_devices(out_path: str) -> None:
    import jax

    from trackstar import hessian, score
    from trackstar import sharding as sh
    from trackstar.featurize import make_mesh_feature_fn
    from trackstar.gradients import make_feature_fn
    from trackstar.tree import named_leaves

    apply_fn, params, precond, projector, (tok, w), (qtok, qw) = build()
    batch = 8
    ref_fn = make_feature_fn(apply_fn, "train", projector, precond)
    ref_v = np.concatenate(
        [np.asarray(ref_fn(params, tok[i : i + batch], w[i : i + batch])) for i in range(0, 40, 8)]
    )
    # Queries through the same kernel (one compile): only their weights differ.
    ref_q = np.asarray(ref_fn(params, np.tile(qtok, (2, 1))[:8], np.tile(qw, (2, 1))[:8]))[:6]
    # The explicit formulas: R = UᵀU / n in float64; scores against them on one device.
    ref_R = ref_v.astype(np.float64).T @ ref_v.astype(np.float64) / len(ref_v)
    t, _ = hessian.inverse_sqrt(ref_R, 0.1)
    ref_ids, ref_s = score.top_k_scores(ref_v, ref_q, t, t, True, K, rows_per_step=12)
    shapes = [tuple(np.shape(x)) for _, x in named_leaves(params)]
    report: dict = {"meshes": {}}
    devices = jax.devices()
    timings = {}
    for data, model, rules in [
        (1, 1, "tensor"),
        (1, 2, "tensor"),
        (2, 2, "tensor"),
        (2, 4, "tensor"),
        (4, 2, "fsdp"),
    ]:
        t0 = time.perf_counter()
        mesh = sh.make_mesh(data, model, devices[: data * model])
        shardings = sh.param_shardings(params, mesh, sh.preset_rules(rules))
        fn = make_mesh_feature_fn(apply_fn, "train", projector, precond, mesh, shardings)
        placed = sh.place(params, shardings)
        compiled = fn.jitted.lower(placed, fn.precond, tok[:batch], w[:batch]).compile()
        v_parts = [
            compiled(placed, fn.precond, tok[i : i + 8], w[i : i + 8]) for i in range(0, 40, 8)
        ]
        out_spec = str(v_parts[0].sharding.spec)
        v = np.concatenate([np.asarray(x) for x in v_parts])
        hlo = compiled.as_text()
        R, _ = hessian.gauss_newton(ref_v, rows_per_step=12, mesh=mesh)
        ids, s = score.top_k_scores(ref_v, ref_q, t, t, True, K, rows_per_step=12, mesh=mesh)
        name = f"{data}x{model}-{rules}"
        report["meshes"][name] = {
            "devices": data * model,
            "vec_max_abs": float(np.abs(v - ref_v).max()),
            "vec_bitwise": bool(np.array_equal(v, ref_v)),
            "vec_scale": float(np.abs(ref_v).max()),
            "R_max_abs": float(np.abs(R - ref_R).max()),
            "R_scale": float(np.abs(ref_R).max()),
            "topk_ids_equal": bool(np.array_equal(ids, ref_ids)),
            "topk_score_max_abs": float(np.abs(s - ref_s).max()),
            "per_example_gathers": per_example_gathers(hlo, batch // data, shapes),
            "out_sharding": out_spec,
            "param_specs": {
                p: str(s.spec)
                for p, s in sh._named(shardings)  # noqa: SLF001
            },
            "placed_shard_shapes": {
                p: list(x.addressable_shards[0].data.shape) for p, x in named_leaves(placed)
            },
        }
        timings[name] = time.perf_counter() - t0
    # The ~1B-parameter config: arithmetic bytes per device vs the real NamedShardings.
    from jax.sharding import NamedSharding

    from trackstar.config import load_config_file

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    large = load_config_file(os.path.join(root, "configs", "large.py"))
    abstract = sh.abstract_lm_params(large.model, large.mesh.memory_vocab_size)
    lmesh = sh.make_mesh(-1, large.mesh.model, devices)
    specs = sh.param_specs(abstract, sh.rules_from_config(large.mesh), dict(lmesh.shape))
    spec_leaves = jax.tree.leaves(
        specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
    )
    named = sum(
        int(np.prod(NamedSharding(lmesh, s).shard_shape(x.shape))) * x.dtype.itemsize
        for x, s in zip(jax.tree.leaves(abstract), spec_leaves, strict=True)
    )
    report["large"] = {
        "n_params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(abstract))),
        "arith_param_bytes": sh.bytes_per_device(abstract, specs, dict(lmesh.shape)),
        "named_sharding_param_bytes": named,
    }
    report["timings"] = timings
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)


def run_featurize(args) -> None:
    import types

    import jax

    from trackstar import correction, hessian, multihost, score, store
    from trackstar import sharding as sh
    from trackstar.featurize import Examples, featurize_into_store, make_mesh_feature_fn

    cfg = types.SimpleNamespace(
        distributed="auto",
        coordinator=args.coordinator,
        num_processes=args.num_processes,
        process_id=args.process_id,
        cpu_collectives="gloo",
        data=-1,
        model=args.model,
        rules="tensor",
        rule_overrides=(),
    )
    info = multihost.initialize_distributed(cfg)
    apply_fn, params, precond, projector, (tok, w), (qtok, qw) = build()
    mesh = sh.mesh_from_config(cfg, scope=args.scope)
    shardings = sh.param_shardings(params, mesh, sh.preset_rules("tensor"))
    fn = make_mesh_feature_fn(apply_fn, "train", projector, precond, mesh, shardings)
    placed = sh.place(params, shardings)
    calls = [0]
    per_chunk = args.chunk // args.batch

    def feature_fn(p, t, wt):
        if args.kill_after >= 0 and calls[0] == args.kill_after * per_chunk + 1:
            os.kill(os.getpid(), signal.SIGKILL)  # a crash mid-chunk, after N chunks
        calls[0] += 1
        if args.slow:
            time.sleep(args.slow)
        return fn(p, t, wt)

    feature_fn.mesh = fn.mesh  # featurize_into_store runs in lockstep on a global mesh
    meta = store.StoreMeta(
        kind="train",
        dim=projector.dim,
        dtype="float32",
        num_examples=N_TRAIN,
        chunk_size=args.chunk,
        model_fingerprint="toy",
        optimizer_fingerprint=correction.__name__,
        projection=projector.config(),
        output_fn="train",
        correction="adam",
    )
    vs = store.VectorStore.create(args.store, meta)
    if args.only_chunks:  # one process writes just these chunks (a partial store to resume)
        only = [int(c) for c in args.only_chunks.split(",")]
        featurize_into_store(
            feature_fn, placed, Examples(tok, w), vs, args.batch, chunks=only, progress=False
        )
        return
    featurize_into_store(
        feature_fn, placed, Examples(tok, w), vs, args.batch, progress=False, finalize=True
    )
    vs = store.VectorStore.open(args.store)
    if args.no_score:
        with open(f"{args.out}-p{info.process_index}.json", "w") as f:
            json.dump({"calls": calls[0], "devices": jax.device_count()}, f)
        return
    # Queries: featurized by every process alike, at the store's batch size (no new compile).
    qt, qwt = np.tile(qtok, (2, 1))[:8], np.tile(qw, (2, 1))[:8]
    q = np.concatenate([np.asarray(fn(placed, qt[i : i + 4], qwt[i : i + 4])) for i in (0, 4)])
    q = q[:N_QUERY]
    gmesh = sh.make_mesh(-1, args.model)
    R, used = hessian.gauss_newton(vs, mesh=gmesh)
    t, _ = hessian.inverse_sqrt(R, 0.1)
    ids, s = score.top_k_scores(vs, q, t, t, True, K, mesh=gmesh)
    # No mesh: this process's first device, reading the whole store.
    ref_ids, ref_s = score.top_k_scores(vs, q, t, t, True, K)
    if info.process_index == 0:
        np.savez(
            args.out,
            R=R,
            ids=ids,
            scores=s,
            single_ids=ref_ids,
            single_scores=ref_s,
            queries=q,
            used=used,
            devices=jax.device_count(),
            processes=info.process_count,
        )
    multihost.barrier("worker-done")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["devices", "featurize"])
    p.add_argument("out", nargs="?")
    p.add_argument("--store")
    p.add_argument("--out", dest="out_npz")
    p.add_argument("--coordinator", default="")
    p.add_argument("--num-processes", type=int, default=0)
    p.add_argument("--process-id", type=int, default=-1)
    p.add_argument("--model", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--chunk", type=int, default=4)
    p.add_argument("--kill-after", type=int, default=-1)
    p.add_argument("--slow", type=float, default=0.0)
    p.add_argument("--no-score", action="store_true", help="featurize only")
    p.add_argument("--scope", choices=["local", "global"], default="local")
    p.add_argument("--only-chunks", default="", help="write only these chunks, e.g. 0,2")
    args = p.parse_args()
    if args.mode == "devices":
        run_devices(args.out)
    else:
        args.out = args.out_npz
        run_featurize(args)


if __name__ == "__main__":
    main()
