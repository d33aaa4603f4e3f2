"""Performance benchmark: featurize against a training step, scoring against a matmul.

One process, one run, on the reference workload of configs/benchmark.py:
  floor        jitted forward + backward of the mean loss (no optimizer update), examples/s
  featurize    per-example gradient + V correction + projection + store write, examples/s and
               its ratio to the floor: exact Adam V (Kronecker "global", d = k_in * k_out),
               Adafactor-factored V, dense projection (small d), and the vmap-of-grad reference
  bf16         error of bfloat16 store rows (row error, score error, top-10 overlap)
  score        streaming top-k from the store (R^-1/2 matmul + normalize + dot + top-k), rows/s,
               and its ratio to the same computation on an in-memory device array
  store read   MB/s of iter_chunks vs a raw tensorstore read of the same arrays
  index        the store's scoring index (trackstar.index, preset "trackstar", d x d R fit):
               index scoring rows/s over an in-memory matmul + top-k of the same shapes and
               dtype (store read included), and over score_preset's per-call R^-1/2 path
  hessian      R fit + R^-1/2 seconds per d (one subprocess per d, with a time limit; the
               library's choice of form: low rank when the rows are fewer than d)
  low-rank R   the low-rank fit + (R + dI)^-1/2 of 8,192 rows at d = 16,384 and 65,536: seconds
               and peak RSS (one subprocess per d)
  ann          approximate top-k (faiss IVF) vs the exact flat index at N = 1M synthetic rows
               built from this run's featurized rows (scripts/ann_benchmark.py; subprocess)
  rss          peak RSS of featurize and score at two corpus sizes (one subprocess per stage)
  hf rows      (hf_rows; only these with the config's "hf" mode) Hugging Face-shaped models
               (GPT-2 small, a Llama of similar size) and the project's own model at the same
               batch: featurize over floor with the exact Adam V and with an estimated V, the
               V estimate's one-time cost, and each family's ratio over the own model's
It prints a table and, with --json PATH, writes every figure.

Run: python scripts/benchmark.py --json results/benchmark.json   (about 15-25 min on 2 cores)
     python scripts/benchmark.py --tiny --json /tmp/bench.json    (CI smoke run, seconds)
     python scripts/benchmark.py --config configs/benchmark.py:hf --json results/hf.json
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any
from unittest import mock

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tensorstore as ts

from trackstar import correction
from trackstar import index as index_lib
from trackstar import score as score_lib
from trackstar import v_estimate as v_estimate_lib
from trackstar.config import load_config_file
from trackstar.families import make_model
from trackstar.featurize import Examples, featurize_into_store
from trackstar.gradients import make_feature_fn
from trackstar.hessian import fit_hessian, fit_low_rank, gauss_newton, inverse_sqrt
from trackstar.model import count_params
from trackstar.projection import Projector
from trackstar.score import top_k_scores
from trackstar.store import StoreMeta, VectorStore
from trackstar.train import mean_token_loss

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(HERE, "..", "configs", "benchmark.py")


# ----------------------------------------------------------------------------- workload


def load_cfg(path: str, tiny: bool):
    if tiny and ":" not in os.path.basename(path):
        path = f"{path}:tiny"
    elif tiny and path.endswith(":hf"):
        path = f"{path}_tiny"
    return load_config_file(path)


def make_data(cfg) -> tuple[Examples, Examples]:
    """Random-id training sequences (every token after BOS counts) and queries (last tokens)."""
    rng = np.random.default_rng(cfg.seed)
    n, q, t = cfg.n_train, cfg.n_queries, cfg.seq_len
    tokens = rng.integers(4, cfg.vocab_size, (n + q, t)).astype(np.int32)
    tokens[:, 0] = 1  # BOS
    w_train = np.ones((n, t), np.float32)
    w_train[:, 0] = 0.0
    w_query = np.zeros((q, t), np.float32)
    w_query[:, t - cfg.query_targets :] = 1.0
    return Examples(tokens[:n], w_train), Examples(tokens[n:], w_query)


def build(cfg):
    apply_fn, params = make_model(cfg.model.to_dict(), cfg.vocab_size, cfg.seed)
    return apply_fn, params


def grad_step(apply_fn):
    """The jitted gradient of the mean training loss of a batch (the floor's computation)."""

    def loss(p, tok, w):
        return mean_token_loss(apply_fn(p, tok), tok, w)[0]

    return jax.jit(jax.grad(loss))


def optimizer_states(
    cfg, apply_fn, params, train: Examples, kinds=("adam", "adafactor"), grad_fn=None
) -> dict[str, Any]:
    """V from a few AdamW and Adafactor steps on the training data: {name: preconditioner}."""
    grad_fn = grad_fn or grad_step(apply_fn)
    out = {}
    opts = {
        "adam": (optax.adamw(cfg.lr, b1=0.9, b2=0.98, eps=1e-8), dict(eps=1e-8, b2=0.98)),
        "adafactor": (optax.adafactor(cfg.lr, multiply_by_parameter_scale=False), {}),
    }
    for name, (opt, kw) in ((k, opts[k]) for k in kinds):
        p, state = params, opt.init(params)
        for s in range(cfg.v_steps):
            lo = (s * cfg.batch_size) % max(1, len(train) - cfg.batch_size + 1)
            batch = train.take(np.arange(lo, lo + cfg.batch_size))
            g = grad_fn(p, batch.tokens_NxT, batch.weights_NxT)
            updates, state = opt.update(g, state, p)
            p = optax.apply_updates(p, updates)
        out[name] = correction.preconditioner(state, params, **kw)
    return out


def new_store(root: str, name: str, proj: Projector, n: int, cfg, dtype="float32", kind="train"):
    path = os.path.join(root, name)
    shutil.rmtree(path, ignore_errors=True)
    meta = StoreMeta(
        kind=kind,
        dim=proj.dim,
        dtype=dtype,
        num_examples=n,
        chunk_size=cfg.chunk_size,
        model_fingerprint="benchmark",
        optimizer_fingerprint="benchmark",
        projection=proj.config(),
        output_fn="train_loss" if kind == "train" else "loss",
        correction="adam",
    )
    return VectorStore.create(path, meta)


def peak_rss_mb() -> float:
    """This process's peak RSS (MB).

    VmHWM is per address space, so a child started by exec reports its own peak; ru_maxrss
    would carry over the parent's peak across fork + exec.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ----------------------------------------------------------------------------- timings


def make_floor(cfg, apply_fn, params, train: Examples, step=None):
    """``floor(n_examples) -> seconds per example`` of fwd + bwd of the mean loss (compiled)."""
    step = step or grad_step(apply_fn)
    b = cfg.batch_size
    batches = [
        (jnp.asarray(train.tokens_NxT[i : i + b]), jnp.asarray(train.weights_NxT[i : i + b]))
        for i in range(0, len(train) - b + 1, b)
    ]
    jax.block_until_ready(step(params, *batches[0]))

    def floor(n_examples: int) -> float:
        todo = batches[: max(1, n_examples // b)]
        t0 = time.perf_counter()
        out = [step(params, tok, w) for tok, w in todo]  # dispatch all, sync once
        jax.block_until_ready(out)
        return (time.perf_counter() - t0) / (len(todo) * b)

    return floor


def time_featurize(
    cfg, feature_fn, params, examples: Examples, store: VectorStore, warm_up: bool = True
) -> float:
    """Seconds per example of featurize_into_store (store write and finalize included)."""
    b = cfg.batch_size
    if warm_up:  # compile (and run once) outside the timing
        tok, w = examples.tokens_NxT[:b], examples.weights_NxT[:b]
        jax.block_until_ready(feature_fn(params, tok, w))
    t0 = time.perf_counter()
    featurize_into_store(feature_fn, params, examples, store, b, progress=False)
    store.finalize()
    return (time.perf_counter() - t0) / len(examples)


def featurize_one(cfg, apply_fn, params, pre, proj, examples, root, name, fast=None) -> float:
    fn = make_feature_fn(apply_fn, "train", proj, pre, fast=fast)
    store = new_store(root, name, proj, len(examples), cfg)
    return time_featurize(cfg, fn, params, examples, store)


def bf16_error(cfg, root: str, train_store: VectorStore, q_QxD: np.ndarray) -> dict[str, float]:
    """Rewrites the float32 train store as bfloat16 rows and measures what that changes."""
    ids, v32 = train_store.read_all()
    meta = train_store.meta
    path = os.path.join(root, "train_bf16")
    shutil.rmtree(path, ignore_errors=True)
    bf = VectorStore.create(path, StoreMeta(**{**meta.to_dict(), "dtype": "bfloat16"}))
    for c in range(meta.num_chunks):
        lo, hi = meta.chunk_range(c)
        bf.write_chunk(c, ids[lo:hi], v32[lo:hi], [])
    bf.finalize()
    _, v16 = bf.read_all()
    row_err = np.linalg.norm(v16 - v32, axis=1) / np.linalg.norm(v32, axis=1)

    def cos(a, b):
        a = a / np.linalg.norm(a, axis=1, keepdims=True)
        b = b / np.linalg.norm(b, axis=1, keepdims=True)
        return b @ a.T

    s32, s16 = cos(v32, q_QxD), cos(v16, q_QxD)
    k = min(10, len(v32))
    top32 = np.argsort(-s32, axis=1)[:, :k]
    top16 = np.argsort(-s16, axis=1)[:, :k]
    overlap = np.mean([len(set(a) & set(b)) / k for a, b in zip(top32, top16, strict=True)])
    return {
        "bf16_row_rel_error_max": float(row_err.max()),
        "bf16_row_rel_error_mean": float(row_err.mean()),
        "bf16_cosine_abs_error_max": float(np.abs(s16 - s32).max()),
        "bf16_top10_overlap": float(overlap),
        "bf16_bytes_ratio": 0.5,
    }


def time_scoring(cfg, store: VectorStore, q_QxD: np.ndarray, t_DxD: np.ndarray) -> dict:
    """Streaming top-k from the store vs the same math on an in-memory device array."""
    n = store.num_rows
    kw = dict(rows_per_step=cfg.score_rows_per_step, progress=False)
    stream = []
    for _ in range(cfg.score_repeats + 1):  # the first pass compiles
        t0 = time.perf_counter()
        ids_s, _ = top_k_scores(store, q_QxD, t_DxD, t_DxD, True, cfg.top_k, **kw)
        stream.append(time.perf_counter() - t0)

    _, x_NxD = store.read_all()
    x_dev = jnp.asarray(x_NxD)
    t_dev = jnp.asarray(t_DxD, jnp.float32)
    k = min(cfg.top_k, n)

    @jax.jit
    def in_memory(x_NxD, t_DxD, q_QxD):
        def unit(v):
            return v / jnp.linalg.norm(v, axis=1, keepdims=True)

        s_QxN = unit(q_QxD @ t_DxD) @ unit(x_NxD @ t_DxD).T
        return jax.lax.top_k(s_QxN, k)

    q_dev = jnp.asarray(q_QxD)
    mem = []
    for _ in range(cfg.score_repeats + 1):
        t0 = time.perf_counter()
        _, ids_m = jax.block_until_ready(in_memory(x_dev, t_dev, q_dev))
        mem.append(time.perf_counter() - t0)
    agree = float(np.mean(np.asarray(ids_m)[:, 0] == ids_s[:, 0]))

    # Store read alone: iter_chunks (prefetching reader) vs raw tensorstore reads.
    nbytes = n * store.dim * 4
    reads = {"store": [], "raw": []}
    for _ in range(cfg.score_repeats):
        t0 = time.perf_counter()
        for _ids, v in store.iter_chunks():
            v[0, 0]  # noqa: B018  (touch the data)
        reads["store"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for c in range(store.num_chunks):
            vec_path = os.path.join(store.path, "chunks", f"{c:08d}", "vectors")
            spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": vec_path}}
            ts.open(spec, open=True).result().read().result()
        reads["raw"].append(time.perf_counter() - t0)
    best_stream, best_mem = min(stream[1:]), min(mem[1:])
    store_mb, raw_mb = (nbytes / 2**20 / min(reads[k]) for k in ("store", "raw"))
    return {
        "score_rows_per_s": n / best_stream,
        "matmul_rows_per_s": n / best_mem,
        "score_over_matmul": best_mem / best_stream,
        "score_top1_agreement": agree,
        "store_read_mb_per_s": store_mb,
        "raw_tensorstore_read_mb_per_s": raw_mb,
        "store_read_over_raw": store_mb / raw_mb,
    }


def best_of(fn, repeats: int) -> tuple[float, Any]:
    """``(best seconds of repeats timed calls, last result)`` after one untimed (compiling) call."""
    out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def time_index(cfg, root: str, store: VectorStore, q_QxD: np.ndarray) -> dict:
    """The store's scoring index against an in-memory matmul and against the per-call path.

    The fit is the d x d one (``low_rank = "never"``) from the store's rows and the queries as
    R_eval: the form score_preset applied per call before indexes. Index scoring is timed on
    prepared queries (``prepare_queries``: T_q u_q, unit length, once per query batch, timed
    on its own); the in-memory reference is one jitted ``top_k(q @ X.T)`` over the index rows
    already on the device, float32 like the index.
    """
    hcfg = {"lambda_mix": "auto_trace", "damping": 0.1, "low_rank": "never"}
    fit = fit_hessian(store, q_QxD, hcfg, store.dim, transforms=["mixed_inv_sqrt"])
    kw = dict(rows_per_step=cfg.score_rows_per_step, progress=False)
    k = min(cfg.top_k, store.num_rows)
    t0 = time.perf_counter()
    path = os.path.join(root, "index")
    shutil.rmtree(path, ignore_errors=True)
    index = index_lib.build_index(store, fit, "trackstar", path, cfg.index_dtype, progress=False)
    build_s = time.perf_counter() - t0
    reps = cfg.score_repeats
    per_call_s, (ids_p, _) = best_of(
        lambda: score_lib.score_preset(store, q_QxD, "trackstar", fit, k, **kw), reps
    )
    prep_s, q_prep = best_of(lambda: index_lib.prepare_queries(index, q_QxD, fit), reps)
    stream_s, (ids_i, _) = best_of(
        lambda: score_lib.top_k_scores(index.store, q_prep, None, None, False, k, **kw), reps
    )
    full_s, (ids_f, _) = best_of(lambda: index_lib.score_index(index, q_QxD, k, fit=fit), reps)
    _, x_NxD = index.store.read_all()
    x_dev, q_dev = jnp.asarray(x_NxD), jnp.asarray(q_prep)
    in_memory = jax.jit(lambda x, q: jax.lax.top_k(q @ x.T, k))
    mem_s, _ = best_of(lambda: jax.block_until_ready(in_memory(x_dev, q_dev)), reps)
    n = index.num_rows
    return {
        "index_rows": n,
        "index_dtype": cfg.index_dtype,
        "index_build_s": build_s,
        "index_rows_per_s": n / stream_s,
        "index_matmul_rows_per_s": n / mem_s,
        "index_score_over_matmul": mem_s / stream_s,
        "index_prepare_queries_s": prep_s,
        "index_score_index_s": full_s,
        "index_per_call_transform_s": per_call_s,
        "index_speedup_over_transform": per_call_s / full_s,
        "index_top1_agreement": float(np.mean(ids_i[:, 0] == ids_p[:, 0])),
        "index_top_k_overlap": float(
            np.mean([len(set(a) & set(b)) / k for a, b in zip(ids_f, ids_p, strict=True)])
        ),
    }


# ----------------------------------------------------------------------------- hf rows


def hf_row_cfg(cfg, name: str):
    """``cfg`` for one hf row: its model and vocab ("own": the reference workload's), the hf
    batch and sequence length, N = hf_batch_size * hf_reps (own: hf_own_reps) training
    examples, no queries."""
    c = ml_collections.ConfigDict(cfg.to_dict())
    if name != "own":
        if name not in cfg.hf_models:
            raise ValueError(f"hf row {name!r}: use 'own' or one of {sorted(cfg.hf_models)}")
        row = cfg.hf_models[name]
        c.model = ml_collections.ConfigDict(row.model.to_dict())
        c.vocab_size = int(row.vocab)
    c.batch_size = cfg.hf_batch_size
    c.seq_len = cfg.hf_seq_len
    reps = cfg.hf_own_reps if name == "own" else cfg.hf_reps
    c.n_train, c.n_queries = cfg.hf_batch_size * reps, 0
    c.v_steps = cfg.hf_v_steps
    return c


def time_estimate(cfg, apply_fn, params, train: Examples) -> tuple[Any, dict]:
    """V from ``v_estimate.estimate_v`` on hf_estimate_examples examples, and what it cost.

    The estimate's jitted step is compiled (and run once, on the first batch) first, so the
    timed ``estimate_v`` call is its steady cost; ``compile_s`` is that first call.
    """
    sample = v_estimate_lib.EstimateSample(cfg.hf_estimate_examples, cfg.seed, cfg.batch_size)
    pos = v_estimate_lib.sample_positions(len(train), sample)
    tok, w = train.tokens_NxT[pos], train.weights_NxT[pos]
    step = v_estimate_lib.make_step(apply_fn)
    b = cfg.batch_size
    zeros = jax.tree.map(lambda p: jnp.zeros(np.shape(p), jnp.float32), params)
    t0 = time.perf_counter()
    jax.block_until_ready(step(zeros, params, tok[:b], w[:b]))
    first = time.perf_counter() - t0
    with mock.patch.object(v_estimate_lib, "make_step", lambda _fn: step):  # reuse it, warm
        t0 = time.perf_counter()
        est = v_estimate_lib.estimate_v(apply_fn, params, tok, w, b, progress=False)
        jax.block_until_ready(est.v)
        steady = time.perf_counter() - t0
    return est, {"examples": len(pos), "batches": est.count, "s": steady, "compile_s": first}


def hf_row(cfg, name: str, root: str) -> dict:
    """One hf row: featurize over floor with the exact Adam V and the estimated V."""
    rc = hf_row_cfg(cfg, name)
    t_row = time.perf_counter()
    apply_fn, params = build(rc)
    train, _ = make_data(rc)
    step = grad_step(apply_fn)
    t0 = time.perf_counter()
    adam = optimizer_states(rc, apply_fn, params, train, ("adam",), step)["adam"]
    adam_s = time.perf_counter() - t0  # compile of the step + v_steps steps
    floor_fn = make_floor(rc, apply_fn, params, train, step)
    est, est_info = time_estimate(rc, apply_fn, params, train)
    pre_est = correction.preconditioner(est, params, eps=correction.ESTIMATE_EPS)
    proj = Projector(params, "global", k_in=rc.k_in, k_out=rc.k_out, seed=rc.seed)
    exact_fn = make_feature_fn(apply_fn, "train", proj, adam)

    def estimate_fn(p, tok, w):  # the same compiled program, the estimate's V as its argument
        return exact_fn.jitted(p, pre_est, tok, w)

    # hf_passes rounds of (floor pass, featurize pass) per V; the best of each is kept (the CPU
    # may be shared: contention only slows a pass down).
    n = len(train)
    floors, passes = [], {"exact": [], "estimate": []}
    for i in range(cfg.hf_passes):
        for key, fn in (("exact", exact_fn), ("estimate", estimate_fn)):
            floors.append(floor_fn(n))
            store = new_store(root, f"hf_{name}_{key}", proj, n, rc)
            passes[key].append(time_featurize(rc, fn, params, train, store, warm_up=i == 0))
    floors.append(floor_fn(n))
    floor = min(floors)
    secs = {key: min(v) for key, v in passes.items()}
    out = {
        "family": rc.model.get("family", "") or "transformer (default)",
        "n_params": count_params(params),
        "vocab_size": rc.vocab_size,
        "fast_path": bool(exact_fn.fast),
        "examples_timed": n,
        "floor_s_per_example": floor,
        "floor_s_per_example_all_passes": floors,
        "adam_steps_s": adam_s,
        "v_estimate_examples": est_info["examples"],
        "v_estimate_batches": est_info["batches"],
        "v_estimate_s": est_info["s"],
        "v_estimate_compile_s": est_info["compile_s"],
        "v_estimate_per_example_over_floor": est_info["s"] / est_info["examples"] / floor,
    }
    for key, sec in secs.items():
        out[f"featurize_{key}_s_per_example"] = sec
        out[f"featurize_{key}_s_per_example_all_passes"] = passes[key]
        out[f"featurize_over_floor_{key}"] = sec / floor
    out["row_wall_s"] = time.perf_counter() - t_row
    return out


def run_hf(cfg, root: str) -> dict:
    """The hf rows, and each row's ratios over the own model's (when "own" is among them)."""
    rows = {name: hf_row(cfg, name, root) for name in cfg.hf_rows}
    r: dict[str, Any] = {
        "hf_rows": rows,
        "hf_batch_size": cfg.hf_batch_size,
        "hf_reps": cfg.hf_reps,
        "hf_own_reps": cfg.hf_own_reps,
        "hf_passes": cfg.hf_passes,
        "hf_seq_len": cfg.hf_seq_len,
        "hf_dim": cfg.k_in * cfg.k_out,
    }
    if "own" in rows:
        own = rows["own"]
        r["hf_over_own"] = {
            name: {
                key: row[f"featurize_over_floor_{key}"] / own[f"featurize_over_floor_{key}"]
                for key in ("exact", "estimate")
            }
            for name, row in rows.items()
            if name != "own"
        }
    return r


def hf_table(r: dict) -> str:
    d = r["hf_dim"]
    lines = [
        f"hf rows: batch {r['hf_batch_size']}, {r['hf_reps']} timed batches per pass (own model: "
        f"{r['hf_own_reps']}), best of {r['hf_passes']} passes, seq {r['hf_seq_len']}, global "
        f"Kronecker d={d}; ratios are featurize / floor per example",
        f"{'row':12s} {'family':22s} {'params':>12s} {'floor s/ex':>10s} {'exact V':>8s} "
        f"{'est. V':>8s} {'V est. s':>9s} {'/ex/floor':>9s}",
    ]
    for name, x in r["hf_rows"].items():
        lines.append(
            f"{name:12s} {x['family']:22s} {x['n_params']:12,d} {x['floor_s_per_example']:10.4f} "
            f"{x['featurize_over_floor_exact']:7.2f}x {x['featurize_over_floor_estimate']:7.2f}x "
            f"{x['v_estimate_s']:9.2f} {x['v_estimate_per_example_over_floor']:8.2f}x"
        )
    lines.append(
        "V est. s: estimate_v on the sample after its compile (compile + first batch: "
        + ", ".join(f"{n} {x['v_estimate_compile_s']:.1f} s" for n, x in r["hf_rows"].items())
        + f"); sample {', '.join(str(x['v_estimate_examples']) for x in r['hf_rows'].values())}"
        " examples"
    )
    for name, ratios in r.get("hf_over_own", {}).items():
        lines.append(
            f"{name} ratio / own ratio: exact V {ratios['exact']:.3f}, "
            f"estimated V {ratios['estimate']:.3f}  (target <= 1.10)"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- subprocess stages


def spread_rows(n: int, dim: int, seed: int) -> np.ndarray:
    """Gaussian float32 rows with decaying column scales: R gets a spread spectrum like real
    gradient features."""
    u_NxD = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)
    u_NxD *= (1.0 + np.arange(dim, dtype=np.float32)) ** -0.5
    return u_NxD


def stage_hessian(cfg, dim: int) -> dict:
    """R_train and its root from ``hessian_rows`` rows in the form the library picks: d x d
    (Gauss-Newton sum + eigh) when the rows are at least d, else low rank."""
    u_NxD = spread_rows(cfg.hessian_rows, dim, cfg.seed)
    if cfg.hessian_rows < dim:
        t0 = time.perf_counter()
        fit_low_rank(u_NxD, None, {"damping": 0.1}, dim, wanted=["train_inv_sqrt"])
        return {"dim": dim, "form": "low_rank", "fit_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    r_DxD, _ = gauss_newton(u_NxD, rows_per_step=512)
    t1 = time.perf_counter()
    inverse_sqrt(r_DxD, 0.1)
    t2 = time.perf_counter()
    return {"dim": dim, "form": "dense", "fit_s": t1 - t0, "inverse_sqrt_s": t2 - t1}


def stage_low_rank(cfg, dim: int) -> dict:
    """The low-rank fit of the mixed R from ``low_rank_rows`` rows (``low_rank_eval_rows`` of
    them queries: λ by auto_trace) and (R + dI)^-1/2 applied to the queries and to one
    ``score_rows_per_step`` block of train rows: seconds and this process's peak RSS."""
    n_e = cfg.low_rank_eval_rows
    u_NxD = spread_rows(cfg.low_rank_rows, dim, cfg.seed)
    rows_mb = u_NxD.nbytes / 2**20
    hcfg = {"lambda_mix": "auto_trace", "damping": 0.1}
    t0 = time.perf_counter()
    fit = fit_low_rank(u_NxD[n_e:], u_NxD[:n_e], hcfg, dim, wanted=["mixed_inv_sqrt"])
    t1 = time.perf_counter()
    fit.apply("mixed_inv_sqrt", u_NxD[: n_e + cfg.score_rows_per_step])
    t2 = time.perf_counter()
    return {
        "dim": dim,
        "rows": cfg.low_rank_rows,
        "eval_rows": n_e,
        "rank": int(fit.low_rank["mixed_inv_sqrt"].basis.shape[1]),
        "fit_s": t1 - t0,
        "apply_s": t2 - t1,
        "apply_rows": n_e + cfg.score_rows_per_step,
        "rows_mb": rows_mb,
        "peak_rss_mb": peak_rss_mb(),
    }


def stage_ann(cfg, store_path: str) -> dict:
    """scripts/ann_benchmark.py on rows built from this run's featurized store."""
    sys.path.insert(0, HERE)
    from ann_benchmark import run_ann_benchmark
    from synthetic_rows import base_rows

    base = base_rows(store_path, dim=cfg.ann_dim, seed=cfg.seed)
    r = run_ann_benchmark(
        base, n_rows=cfg.ann_rows, dim=cfg.ann_dim, n_queries=cfg.n_queries, k=10,
        noise=cfg.ann_noise, seed=cfg.seed, nlist=cfg.ann_nlist,
    )  # fmt: skip
    return {**r, "peak_rss_mb": peak_rss_mb()}


def stage_featurize_rss(cfg, n: int, store_path: str) -> dict:
    cfg.n_train = n
    apply_fn, params = build(cfg)
    train, _ = make_data(cfg)
    pre = optimizer_states(cfg, apply_fn, params, train)["adam"]
    proj = Projector(params, "global", k_in=cfg.k_in, k_out=cfg.k_out, seed=cfg.seed)
    root, name = os.path.split(store_path)
    sec = featurize_one(cfg, apply_fn, params, pre, proj, train, root, name)
    return {"n": n, "peak_rss_mb": peak_rss_mb(), "s_per_example": sec}


def stage_score_rss(cfg, store_path: str) -> dict:
    store = VectorStore.open(store_path)
    rng = np.random.default_rng(cfg.seed)
    d = store.dim
    q = rng.standard_normal((cfg.n_queries, d), dtype=np.float32)
    t = np.eye(d, dtype=np.float32) + 0.01 * rng.standard_normal((d, d), dtype=np.float32)
    top_k_scores(
        store, q, t, t, True, cfg.top_k, rows_per_step=cfg.score_rows_per_step, progress=False
    )
    return {"n": store.num_rows, "peak_rss_mb": peak_rss_mb()}


def run_stage(args: argparse.Namespace, extra: list[str], timeout: float) -> dict | None:
    cmd = [sys.executable, os.path.abspath(__file__), "--config", args.config]
    cmd += (["--tiny"] if args.tiny else []) + [f"--set={x}" for x in args.set] + extra
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return None
    if res.returncode != 0:
        raise RuntimeError(f"benchmark stage {extra} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- main


def run_meta() -> dict:
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "load_average_start": list(os.getloadavg()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__} "
        f"({jax.default_backend()}: {jax.devices()[0].device_kind})",
    }


def run(args: argparse.Namespace, cfg) -> dict:
    t_start = time.perf_counter()
    root = args.workdir or tempfile.mkdtemp(prefix="trackstar_bench_")
    if cfg.hf_only:
        r = {"tiny": bool(cfg.tiny), **run_meta(), **run_hf(cfg, root)}
        r["wall_s"] = time.perf_counter() - t_start
        r["load_average_end"] = list(os.getloadavg())
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
        return r
    apply_fn, params = build(cfg)
    train, queries = make_data(cfg)
    pres = optimizer_states(cfg, apply_fn, params, train)
    kron = Projector(params, "global", k_in=cfg.k_in, k_out=cfg.k_out, seed=cfg.seed)
    r: dict[str, Any] = {
        "tiny": bool(cfg.tiny),
        **run_meta(),
        "n_params": count_params(params),
        "n_train": len(train),
        "batch_size": cfg.batch_size,
        "seq_len": cfg.seq_len,
        "dim": kron.dim,
    }
    floor_fn = make_floor(cfg, apply_fn, params, train)
    # The CPU may be shared, and load drifts over minutes: a floor pass on the same number of
    # examples runs right before every featurize pass, and the best floor of the run is the
    # denominator (conservative: a contended featurize pass only makes its ratio worse).
    floors = []
    dense = Projector(
        params, "dense", dense_dim=cfg.dense_dim, seed=cfg.seed, max_dense_elements=1 << 40
    )
    variants = (
        ("exact", pres["adam"], kron, cfg.n_train, None),
        ("factored", pres["adafactor"], kron, cfg.n_train, None),
        ("dense", pres["adam"], dense, cfg.dense_examples, None),
        ("reference", pres["adam"], kron, cfg.reference_examples, False),
    )
    secs = {}
    for name, pre, proj, n, fast in variants:
        floors.append(floor_fn(min(n, cfg.n_train)))
        sub = train.take(np.arange(n))
        secs[name] = featurize_one(cfg, apply_fn, params, pre, proj, sub, root, name, fast)
    floors.append(floor_fn(cfg.n_train))
    floor = min(floors)
    r["floor_examples_per_s"] = 1.0 / floor
    r["floor_examples_per_s_all_passes"] = [1.0 / f for f in floors]
    r["dense_dim"] = cfg.dense_dim
    for name, sec in secs.items():
        r[f"featurize_{name}_examples_per_s"] = 1.0 / sec
        r[f"featurize_over_floor_{name}"] = sec / floor
    r["featurize_over_floor_reference_exact"] = r.pop("featurize_over_floor_reference")

    qfn = make_feature_fn(apply_fn, "loss", kron, pres["adam"])
    from trackstar.featurize import compute_vectors

    q_QxD = compute_vectors(qfn, params, queries, cfg.batch_size)
    store = VectorStore.open(os.path.join(root, "exact"))
    r.update(bf16_error(cfg, root, store, q_QxD))
    r_train, _ = gauss_newton(store)
    t_DxD, _ = inverse_sqrt(r_train, 0.1)
    r.update(time_scoring(cfg, store, q_QxD, t_DxD.astype(np.float32)))
    r.update(time_index(cfg, root, store, q_QxD))

    r["hessian"] = []
    for d in cfg.hessian_dims:
        res = run_stage(args, ["--stage", "hessian", "--dim", str(d)], cfg.hessian_timeout_s)
        r["hessian"].append(res or {"dim": d, "timed_out_s": cfg.hessian_timeout_s})
    r["low_rank"] = []
    for d in cfg.low_rank_dims:
        res = run_stage(args, ["--stage", "low_rank", "--dim", str(d)], cfg.hessian_timeout_s)
        r["low_rank"].append(res or {"dim": d, "timed_out_s": cfg.hessian_timeout_s})
        if res is not None:
            r[f"r_fit_seconds_d{d}"] = res["fit_s"] + res["apply_s"]
            r[f"r_apply_rss_mb_d{d}"] = res["peak_rss_mb"]
    if cfg.ann_rows:
        ann = run_stage(args, ["--stage", "ann", "--store", store.path], cfg.ann_timeout_s)
        r["ann"] = ann or {"timed_out_s": cfg.ann_timeout_s}
        if ann is not None:
            r["ann_recall_at_10"], r["ann_speedup"] = ann["ann_recall_at_10"], ann["ann_speedup"]
    rss = {"featurize": [], "score": []}
    for n in cfg.rss_sizes:
        path = os.path.join(root, f"rss_{n}")
        rss["featurize"].append(
            run_stage(args, ["--stage", "featurize_rss", "--n", str(n), "--store", path], 3600)
        )
        rss["score"].append(run_stage(args, ["--stage", "score_rss", "--store", path], 3600))
    r["rss"] = rss
    for stage in ("featurize", "score"):
        small, large = rss[stage][0]["peak_rss_mb"], rss[stage][-1]["peak_rss_mb"]
        r[f"{stage}_rss_growth"] = large / small
    if cfg.hf_rows:
        r.update(run_hf(cfg, root))
    r["main_peak_rss_mb"] = peak_rss_mb()
    r["wall_s"] = time.perf_counter() - t_start
    r["load_average_end"] = list(os.getloadavg())
    if not args.workdir:
        shutil.rmtree(root, ignore_errors=True)
    return r


def table(r: dict) -> str:
    f = r["floor_examples_per_s"]
    lines = [
        f"workload: {r['n_params']:,} params, N={r['n_train']}, batch {r['batch_size']}, "
        f"seq {r['seq_len']}, d={r['dim']}{'  (TINY)' if r['tiny'] else ''}",
        f"{'stage':44s} {'rate':>14s} {'ratio':>8s}",
        f"{'floor: fwd+bwd of the mean loss':44s} {f:10.1f} ex/s {'1.00':>8s}",
    ]
    for key, label in (
        ("exact", f"featurize, exact Adam V, global d={r['dim']}"),
        ("factored", f"featurize, Adafactor V, global d={r['dim']}"),
        ("dense", f"featurize, Adam V, dense d={r['dense_dim']}"),
        ("reference", "featurize, Adam V, vmap-of-grad reference"),
    ):
        rate = r[f"featurize_{key}_examples_per_s"]
        lines.append(f"{label:44s} {rate:10.1f} ex/s {f / rate:7.2f}x")
    lines += [
        f"{'score: stream store, R^-1/2, norm, dot, top-k':44s} "
        f"{r['score_rows_per_s']:8.0f} rows/s {r['score_over_matmul']:7.2f}x of in-memory",
        f"{'score: same math on an in-memory array':44s} {r['matmul_rows_per_s']:8.0f} rows/s",
        f"{'store read (iter_chunks, prefetch)':44s} {r['store_read_mb_per_s']:9.0f} MB/s "
        f"{r['store_read_over_raw']:7.2f}x of raw",
        f"{'raw tensorstore read':44s} {r['raw_tensorstore_read_mb_per_s']:9.0f} MB/s",
        f"bf16 rows: max row rel. error {r['bf16_row_rel_error_max']:.2e}, max cosine error "
        f"{r['bf16_cosine_abs_error_max']:.2e}, top-10 overlap {r['bf16_top10_overlap']:.3f}",
    ]
    lines += [
        f"{'index: stream finished rows, dot, top-k':44s} {r['index_rows_per_s']:8.0f} rows/s "
        f"{r['index_score_over_matmul']:7.2f}x of in-memory  (target >= 0.8)",
        f"{'index: same shapes on an in-memory array':44s} "
        f"{r['index_matmul_rows_per_s']:8.0f} rows/s",
        f"index: score_index {r['index_score_index_s'] * 1e3:.1f} ms (queries prepared in "
        f"{r['index_prepare_queries_s'] * 1e3:.1f} ms) vs per-call R^-1/2 "
        f"{r['index_per_call_transform_s'] * 1e3:.1f} ms: "
        f"{r['index_speedup_over_transform']:.1f}x (target >= 5); top-k overlap "
        f"{r['index_top_k_overlap']:.3f}; built in {r['index_build_s']:.1f} s",
    ]
    for h in r["hessian"]:
        if "timed_out_s" in h:
            lines.append(f"R fit + R^-1/2 at d={h['dim']:<6d} > {h['timed_out_s']} s (stopped)")
        elif h.get("form") == "low_rank":
            lines.append(f"R fit + R^-1/2 at d={h['dim']:<6d} low rank {h['fit_s']:8.2f} s")
        else:
            lines.append(
                f"R fit + R^-1/2 at d={h['dim']:<6d} fit {h['fit_s']:8.2f} s, "
                f"R^-1/2 {h['inverse_sqrt_s']:8.2f} s"
            )
    for h in r["low_rank"]:
        if "timed_out_s" in h:
            lines.append(f"low-rank R at d={h['dim']:<6d} > {h['timed_out_s']} s (stopped)")
            continue
        lines.append(
            f"low-rank R at d={h['dim']:<6d} from {h['rows']} rows: fit {h['fit_s']:7.1f} s, "
            f"apply to {h['apply_rows']} rows {h['apply_s']:6.2f} s, peak RSS "
            f"{h['peak_rss_mb']:.0f} MB (rows alone {h['rows_mb']:.0f} MB)"
        )
    if "ann" in r:
        a = r["ann"]
        if "timed_out_s" in a:
            lines.append(f"ann: > {a['timed_out_s']} s (stopped)")
        else:
            lines.append(
                f"ann: N={a['ann_n_rows']:,} d={a['ann_dim']} {a['ann_kind']} nlist "
                f"{a['ann_nlist']} nprobe {a['ann_nprobe']}: recall@10 "
                f"{a['ann_recall_at_10']:.3f} at {a['ann_speedup']:.1f}x the flat index "
                "(target >= 0.95 at >= 5x)"
            )
    lines.append(
        "load average (1, 5, 15 min) at start "
        + ", ".join(f"{x:.2f}" for x in r["load_average_start"])
        + "; at end "
        + ", ".join(f"{x:.2f}" for x in r["load_average_end"])
    )
    for stage in ("featurize", "score"):
        sizes = ", ".join(f"N={x['n']}: {x['peak_rss_mb']:.0f} MB" for x in r["rss"][stage])
        lines.append(f"peak RSS {stage:9s} {sizes}  (growth {r[f'{stage}_rss_growth']:.3f}x)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=os.path.normpath(DEFAULT_CONFIG))
    ap.add_argument("--tiny", action="store_true", help="tiny workload (CI smoke run)")
    ap.add_argument("--json", default="", help="write every figure to this JSON file")
    ap.add_argument("--workdir", default="", help="keep stores here (default: a temp dir)")
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a config field, e.g. --set rss_sizes='(256, 1024)' (repeatable)",
    )  # fmt: skip
    ap.add_argument("--stage", default="", help=argparse.SUPPRESS)  # subprocess entry points
    ap.add_argument("--dim", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--store", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cfg = load_cfg(args.config, args.tiny)
    for item in args.set:
        key, _, value = item.partition("=")
        cfg[key] = type(cfg[key])(ast.literal_eval(value))
    if args.stage:
        stages = {
            "hessian": lambda: stage_hessian(cfg, args.dim),
            "low_rank": lambda: stage_low_rank(cfg, args.dim),
            "ann": lambda: stage_ann(cfg, args.store),
            "featurize_rss": lambda: stage_featurize_rss(cfg, args.n, args.store),
            "score_rss": lambda: stage_score_rss(cfg, args.store),
        }
        print(json.dumps(stages[args.stage]()))
        return None
    r = run(args, cfg)
    tables = ([] if cfg.hf_only else [table(r)]) + ([hf_table(r)] if "hf_rows" in r else [])
    print("\n\n".join(tables), flush=True)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)
    return r


if __name__ == "__main__":
    main()
