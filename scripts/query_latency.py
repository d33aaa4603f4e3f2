"""Query latency through ``trackstar.Attributor``: the demo run, and a synthetic N = 1M index.

Two measurements, each after compilation (one warm-up call, then ``--repeats`` timed calls;
best and median are reported), with the load average at start and end:

  demo        ``Attributor.from_run(<run>, index=True)`` (the run's float32 scoring index of the
              candidate store, built on first use and cached under the run's ``indexes/``) and
              the same Attributor with its ``index`` set to None (the R^{-1/2} transform
              streamed over the raw store on every call), answering 1 and 64 of the run's task
              queries. Each call is split into featurize (``query_vectors``), score
              (``Attributor.score_vectors``: its index, or ``score.score_preset`` with its own
              fit, rows per step and mesh) and texts; the end-to-end ``proponents_batch`` is timed
              on its own.
  synthetic   an index store of ``--n`` synthetic rows (``scripts/synthetic_rows.py``: replicas
              of the demo index's rows with noise) at the demo's d, written directly in
              ``--dtype`` with an ``IndexInfo`` record copied from the demo index (so
              ``ScoringIndex.open`` accepts it; its store fingerprint names the synthetic rows,
              so nothing ties it to the demo store). Queries are featurized by the demo
              Attributor and scored with ``index.score_index(..., fit=<the run's fit>)``; the
              text of row i is the text of base row i mod B. Reports rows/s and GB/s (bytes of
              the index's rows on disk) of the scoring step.

Both parts check the returned top-k against an exact path: the index's against the Attributor
without index (demo), the scorer's against a NumPy brute-force pass over the same rows
(synthetic); near-ties (scores within ``TIE_TOL``) may swap places.

The synthetic store lives under ``--workdir`` and is reused when one with the same parameters
(N, d, dtype, noise, seed, chunk rows, base index fingerprint) is there; one of other parameters
at the same path is deleted and rewritten. Nothing outside ``--workdir`` is written, except the
demo run's own cached index (``stages.stage_index``).

Run: python scripts/query_latency.py --json results/query_latency.json
       (2 cores: about 7 min with the synthetic index in place; writing it adds 2-3 min, and
       the demo's index build on first use about 2 min)
     python scripts/query_latency.py --n 20000                            (smaller synthetic N)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import hashlib
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)  # synthetic_rows is a sibling script, not a package module.

from synthetic_rows import base_rows, synthetic_blocks  # noqa: E402

from trackstar import index as index_lib  # noqa: E402
from trackstar import stages, store  # noqa: E402
from trackstar.attributor import Attributor  # noqa: E402
from trackstar.store import StoreMeta, VectorStore  # noqa: E402

DEFAULT_RUN = os.path.join(REPO, "runs", "demo")
DEFAULT_WORKDIR = "/tmp/trackstar_latency"
# Version of the ``extra["synthetic"]`` record; a store of another version is rewritten.
SYNTHETIC_FORMAT = 1
# Scores this close count as tied: the scorer (XLA, float32, blocked) and the exact path
# (NumPy) sum in different orders, so near-equal neighbours may swap.
TIE_TOL = 1e-5
BYTES_PER_VALUE = {"float32": 4, "bfloat16": 2}


# ----------------------------------------------------------------------------- timing


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (the machine is shared: say how busy it was)."""
    return [round(x, 2) for x in os.getloadavg()]


def summarize(samples: Sequence[float]) -> dict:
    """``{"best", "median", "samples"}`` of timed repeats, in seconds."""
    return {
        "best": min(samples),
        "median": statistics.median(samples),
        "samples": [round(s, 6) for s in samples],
    }


def repeat(call: Callable[[], dict[str, float]], repeats: int) -> dict[str, dict]:
    """Runs ``call`` once untimed (compilation, caches), then ``repeats`` times; ``call`` returns
    its own ``{part: seconds}``. Returns ``{part: summarize(...)}``."""
    call()
    runs = [call() for _ in range(repeats)]
    return {part: summarize([r[part] for r in runs]) for part in runs[0]}


# ----------------------------------------------------------------------------- top-k checks


def topk_agreement(
    ids_a: np.ndarray, scores_a: np.ndarray, ids_b: np.ndarray, scores_b: np.ndarray
) -> dict:
    """How two ``(Q, K)`` top-k answers agree: ``exact`` (same ids in the same order) and
    ``tie_aware`` (scores equal within ``TIE_TOL`` rank by rank, and the id sets differ only in
    ids scoring within ``TIE_TOL`` of the k-th score, where the cut falls among ties)."""
    exact = bool(np.array_equal(ids_a, ids_b))
    ok = np.allclose(scores_a, scores_b, atol=TIE_TOL, rtol=0)
    for ia, sa, ib, sb in zip(ids_a, scores_a, ids_b, scores_b, strict=True):
        if not ok:
            break
        score_of = {int(i): float(s) for i, s in zip(ia, sa, strict=True)}
        score_of.update({int(i): float(s) for i, s in zip(ib, sb, strict=True)})
        kth = min(float(sa[-1]), float(sb[-1]))
        differ = set(map(int, ia)) ^ set(map(int, ib))
        ok = all(score_of[i] <= kth + TIE_TOL for i in differ)
    return {"exact": exact, "tie_aware": bool(ok)}


def exact_top_k(vs: VectorStore, q_prepared_QxD: np.ndarray, k: int) -> tuple[np.ndarray, ...]:
    """Top-``k`` rows of ``vs`` per prepared query by a NumPy pass (dot products of the stored
    rows, float32): the reference the streamed scorer must reproduce. Ties to the lower id."""
    q = np.asarray(q_prepared_QxD, np.float32)
    best_ids = np.zeros((len(q), 0), np.int64)
    best = np.zeros((len(q), 0), np.float32)
    for ids_N, x_NxD in vs.iter_chunks():
        s = q @ x_NxD.T
        ids = np.broadcast_to(ids_N, s.shape)
        if s.shape[1] > k:  # Cut each chunk to its k best first (a sort of 2k, not N, below).
            part = np.argpartition(-s, k - 1, axis=1)[:, :k]
            s, ids = np.take_along_axis(s, part, axis=1), np.take_along_axis(ids, part, axis=1)
        ids = np.concatenate([best_ids, ids], axis=1)
        sc = np.concatenate([best, s], axis=1)
        # Sort by score descending, then id ascending; keep k.
        order = np.lexsort((ids, -sc), axis=1)[:, :k]
        best_ids = np.take_along_axis(ids, order, axis=1)
        best = np.take_along_axis(sc, order, axis=1)
    return best_ids, best


# ----------------------------------------------------------------------------- demo


def demo_queries(cfg: Any, n: int) -> tuple[list[str], list[str]]:
    """The first ``n`` task queries of the run's world (cycled when it has fewer)."""
    qs = list(stages.load_trained(cfg).world.task_queries)
    qs = [qs[i % len(qs)] for i in range(n)]
    return [q.prompt for q in qs], [q.target for q in qs]


def texts_for(att: Attributor, ids_QxK: np.ndarray) -> list[list[str]]:
    """The texts of the returned ids, as ``proponents_batch`` looks them up."""
    return [[att.texts[int(j)] for j in row] for row in ids_QxK]


def time_attributor(
    att: Attributor, prompts: list[str], targets: list[str], k: int, repeats: int
) -> tuple[dict, tuple[np.ndarray, np.ndarray]]:
    """Timings of one Attributor answering ``prompts``: the parts (featurize, score, texts and
    their sum) and, separately, the end-to-end ``proponents_batch``. Returns the timings and
    the last ``(ids, scores)``."""
    last: dict[str, Any] = {}

    def parts() -> dict[str, float]:
        t0 = time.perf_counter()
        q = att.query_vectors(prompts, targets)
        t1 = time.perf_counter()
        ids, scores = att.score_vectors(q, k)
        t2 = time.perf_counter()
        texts_for(att, ids)
        t3 = time.perf_counter()
        last["ids"], last["scores"] = ids, scores
        return {"featurize": t1 - t0, "score": t2 - t1, "texts": t3 - t2, "parts_sum": t3 - t0}

    def end_to_end() -> dict[str, float]:
        t0 = time.perf_counter()
        out = att.proponents_batch(prompts, targets, k)
        last["e2e_ids"] = np.stack([p.ids for p in out])
        return {"total": time.perf_counter() - t0}

    timings = repeat(parts, repeats)
    timings.update(repeat(end_to_end, repeats))
    if not np.array_equal(last["e2e_ids"], last["ids"]):
        raise AssertionError("the timed parts returned other ids than proponents_batch")
    return timings, (last["ids"], last["scores"])


def measure_demo(
    run: str, preset: str, sizes: Sequence[int], k: int, repeats: int
) -> tuple[dict, Attributor, Any]:
    """The demo part: index and no-index Attributors on ``sizes`` task queries each. Returns
    the figures, the index Attributor and the run's config (the synthetic part reuses them)."""
    cfg = stages.config_for_run_dir(run)
    index_dir = stages.index_path(cfg, "candidates", preset, "float32")
    built = not os.path.isdir(index_dir)
    t0 = time.perf_counter()
    att_index = Attributor.from_run(cfg, preset, index=True)
    t1 = time.perf_counter()
    # The same Attributor without its index: same model, store, fit and compiled feature kernel
    # (a second from_run would only compile that kernel again).
    att_plain = copy.copy(att_index)
    att_plain.index = None
    out: dict[str, Any] = {
        "demo_run": os.path.abspath(run),
        "demo_preset": preset,
        "demo_n": int(att_index.train_store.num_rows),
        "demo_d": int(att_index.train_store.dim),
        "demo_store_dtype": att_index.train_store.meta.dtype,
        "demo_index_dtype": att_index.index.info.dtype,
        "demo_index_path": att_index.index.path,
        # from_run with index=True builds the index when missing: that load includes the build.
        "demo_index_built_now": built,
        "demo_load_index_s": t1 - t0,
        "timings": {},
    }
    for n in sizes:
        prompts, targets = demo_queries(cfg, n)
        answers = {}
        for name, att in (("index", att_index), ("noindex", att_plain)):
            timings, answers[name] = time_attributor(att, prompts, targets, k, repeats)
            key = f"demo_{name}_{n}q"
            out["timings"][key] = timings
            flat_keys(out, key, timings)
            # Rows streamed per call: the index's float32 rows, or the raw store's rows (each
            # also multiplied by R^{-1/2} on every call).
            rows_s = out["demo_n"] / timings["score"]["median"]
            out[f"{key}_rows_per_s"] = rows_s
            out[f"{key}_gb_per_s"] = rows_s * out["demo_d"] * 4 / 1e9
        agree = topk_agreement(*answers["index"], *answers["noindex"])
        out[f"demo_index_{n}q_topk_equal"] = agree["exact"]
        out[f"demo_index_{n}q_topk_equal_tie_aware"] = agree["tie_aware"]
    return out, att_index, cfg


def flat_keys(out: dict, key: str, timings: dict) -> None:
    """``<key>_s`` (median total) and ``<key>_best_s``, ``<key>_<part>_s`` (medians)."""
    total = timings.get("total", timings["parts_sum"])
    out[f"{key}_s"] = total["median"]
    out[f"{key}_best_s"] = total["best"]
    for part in ("featurize", "score", "texts"):
        out[f"{key}_{part}_s"] = timings[part]["median"]


# ----------------------------------------------------------------------------- synthetic


def n_label(n: int) -> str:
    """A short name for a row count: 1000000 -> "1m", 2000 -> "2k", 1500 -> "1500"."""
    for div, suffix in ((1_000_000, "m"), (1000, "k")):
        if n % div == 0:
            return f"{n // div}{suffix}"
    return str(n)


def params_hash(params: dict) -> str:
    """A short hash of the synthetic parameters (the synthetic store's stand-in fingerprint)."""
    blob = json.dumps(params, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def synthetic_meta(base: index_lib.ScoringIndex, params: dict) -> StoreMeta:
    """The synthetic index's metadata: the base index's identity fields (model, projection,
    correction), ``params``'s size and dtype, and an ``IndexInfo`` copied from the base index
    but describing these rows (``ScoringIndex.open`` reads it; nothing checks it against the
    demo store, since the fingerprint differs)."""
    info = dataclasses.replace(
        base.info,
        dtype=params["dtype"],
        store_fingerprint="synthetic-" + params_hash(params),
        source_store=f"synthetic rows from {base.path}",
    )
    return dataclasses.replace(
        base.meta,
        dtype=params["dtype"],
        num_examples=params["n"],
        chunk_size=params["chunk_rows"],
        skipped=[],
        created_by=store.__version__,
        extra={
            **base.meta.extra,
            index_lib.INDEX_KEY: info.to_dict(),
            "synthetic": params,
        },
    )


def synthetic_index(
    base: index_lib.ScoringIndex,
    workdir: str,
    n: int,
    dtype: str,
    noise: float,
    seed: int,
    chunk_rows: int,
) -> tuple[index_lib.ScoringIndex, dict]:
    """Opens the synthetic index for these parameters under ``workdir``, writing it first when
    missing or made with other parameters (an interrupted write resumes: its blocks are
    regenerated, only missing chunks written). Returns the index and what was done."""
    params = {
        "format": SYNTHETIC_FORMAT,
        "n": int(n),
        "dim": int(base.dim),
        "dtype": dtype,
        "noise": float(noise),
        "seed": int(seed),
        "chunk_rows": int(chunk_rows),
        "base_store_fingerprint": index_lib.store_fingerprint(base.store),
    }
    path = os.path.join(workdir, f"synthetic-{n_label(n)}-d{base.dim}-{dtype}")
    report = {"synthetic_path": path, "synthetic_reused": False, "synthetic_write_s": None}
    try:
        old = VectorStore.open(path, require_complete=False)
        same = old.meta.extra.get("synthetic") == params
    except (store.StoreError, OSError):
        old, same = None, False
    if same and old.is_complete:
        report["synthetic_reused"] = True
        return index_lib.ScoringIndex.open(path), report
    if os.path.exists(path) and not same:
        # Only ever the path built above, inside workdir.
        assert os.path.commonpath([os.path.abspath(path), os.path.abspath(workdir)]) == (
            os.path.abspath(workdir)
        )
        shutil.rmtree(path)
    os.makedirs(workdir, exist_ok=True)
    t0 = time.perf_counter()
    out = VectorStore.create(path, synthetic_meta(base, params))
    missing = set(out.missing_chunks())
    blocks = synthetic_blocks(base_rows(base.path), n, noise, seed, block=chunk_rows)
    # One commit (bfloat16 cast, CRC-32, write) in flight while the next block is generated.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="synthetic-write") as writer:
        pending: Future | None = None
        for c, (ids, x) in enumerate(blocks):
            if c not in missing:
                continue
            if pending is not None:
                pending.result()
            pending = writer.submit(out.write_chunk, c, ids, x)
        if pending is not None:
            pending.result()
    out.finalize()
    report["synthetic_write_s"] = time.perf_counter() - t0
    return index_lib.ScoringIndex.open(path), report


def synthetic_call(
    att: Attributor,
    idx: index_lib.ScoringIndex,
    base_ids: np.ndarray,
    prompts: list[str],
    targets: list[str],
    k: int,
    last: dict,
) -> Callable[[], dict[str, float]]:
    """One timed query call against the synthetic index: featurize with ``att``, score with
    ``index.score_index`` (the Attributor's fit and mesh; the index's chunks as steps), look
    up the texts of the base rows the ids replicate. Leaves ``q``, ``ids`` and ``scores`` in
    ``last``."""

    def call() -> dict[str, float]:
        t0 = time.perf_counter()
        q = att.query_vectors(prompts, targets)
        t1 = time.perf_counter()
        ids, scores = index_lib.score_index(idx, q, k, fit=att.hessian_fit, mesh=att.mesh)
        t2 = time.perf_counter()
        [[att.texts[int(base_ids[j % len(base_ids)])] for j in row] for row in ids]
        t3 = time.perf_counter()
        last.update(q=q, ids=ids, scores=scores)
        return {"featurize": t1 - t0, "score": t2 - t1, "texts": t3 - t2, "parts_sum": t3 - t0}

    return call


def measure_synthetic(
    att: Attributor,
    cfg: Any,
    workdir: str,
    n: int,
    dtype: str,
    noise: float,
    seed: int,
    chunk_rows: int,
    sizes: Sequence[int],
    k: int,
    repeats: int,
) -> dict:
    """The synthetic part: ``att``'s queries scored against the synthetic index."""
    idx, report = synthetic_index(att.index, workdir, n, dtype, noise, seed, chunk_rows)
    base_ids = att.index.store.read_ids()  # Base row b is example base_ids[b] of the demo.
    label = n_label(n)
    nbytes = idx.num_rows * idx.dim * BYTES_PER_VALUE[dtype]
    out: dict[str, Any] = {
        "synthetic_label": label,
        "synthetic_n": int(idx.num_rows),
        "synthetic_d": int(idx.dim),
        "synthetic_dtype": dtype,
        "synthetic_bytes": int(nbytes),
        "synthetic_noise": noise,
        "synthetic_chunk_rows": chunk_rows,
        "synthetic_rows_per_step": idx.meta.chunk_size,
        **report,
        "timings": {},
    }
    for size in sizes:
        prompts, targets = demo_queries(cfg, size)
        last: dict[str, np.ndarray] = {}
        timings = repeat(synthetic_call(att, idx, base_ids, prompts, targets, k, last), repeats)
        key = f"synthetic_{label}_{size}q"
        out["timings"][key] = timings
        flat_keys(out, key, timings)
        score_s = timings["score"]["median"]
        out[f"{key}_rows_per_s"] = idx.num_rows / score_s
        out[f"{key}_gb_per_s"] = nbytes / score_s / 1e9
        t0 = time.perf_counter()
        q_prepared = index_lib.prepare_queries(idx, last["q"], att.hessian_fit)
        agree = topk_agreement(last["ids"], last["scores"], *exact_top_k(idx.store, q_prepared, k))
        out[f"{key}_exact_check_s"] = time.perf_counter() - t0
        out[f"{key}_topk_equal"] = agree["exact"]
        out[f"{key}_topk_equal_tie_aware"] = agree["tie_aware"]
    return out


# ----------------------------------------------------------------------------- report


def table(result: dict) -> str:
    """The printed table: one line per case, medians and bests of the parts."""
    lines = [
        f"{'case':<24} {'total med':>10} {'best':>9} {'featurize':>10} {'score':>9} "
        f"{'texts':>8} {'rows/s':>11} {'GB/s':>6} {'top-k':>6}"
    ]
    for key, t in result.get("timings", {}).items():
        total = t.get("total", t["parts_sum"])
        rows = result.get(f"{key}_rows_per_s")
        gbs = result.get(f"{key}_gb_per_s")
        eq = result.get(f"{key}_topk_equal_tie_aware")
        eq = "-" if eq is None else ("same" if eq else "DIFF")
        lines.append(
            f"{key:<24} {total['median']:>10.4f} {total['best']:>9.4f} "
            f"{t['featurize']['median']:>10.4f} {t['score']['median']:>9.4f} "
            f"{t['texts']['median']:>8.5f} {'' if rows is None else f'{rows:,.0f}':>11} "
            f"{'' if gbs is None else f'{gbs:.2f}':>6} {eq:>6}"
        )
    lines.append(
        "(seconds; demo_index_*: top-k vs the no-index path; synthetic_*: vs a NumPy exact pass)"
    )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default=DEFAULT_RUN, help="a finished run directory (the demo's)")
    p.add_argument("--preset", default="trackstar")
    p.add_argument("--n", type=int, default=1_000_000, help="synthetic rows (0: skip that part)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(BYTES_PER_VALUE))
    p.add_argument("--noise", type=float, default=0.3, help="synthetic_rows noise")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk-rows", type=int, default=16384, help="synthetic store chunk size")
    p.add_argument("--queries", default="1,64", help="query batch sizes, comma separated")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3, help="timed calls after one warm-up")
    p.add_argument("--workdir", default=DEFAULT_WORKDIR, help="where the synthetic index lives")
    p.add_argument("--json", default=None, help="write every figure to this path")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs both parts; prints the table and returns (and with ``--json`` writes) the figures."""
    args = parse_args(argv)
    sizes = [int(s) for s in args.queries.split(",")]
    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "loadavg_start": load_average(),
        "cpus": os.cpu_count(),
        "k": args.k,
        "repeats": args.repeats,
        "query_sizes": sizes,
    }
    demo, att, cfg = measure_demo(args.run, args.preset, sizes, args.k, args.repeats)
    timings = demo.pop("timings")
    result.update(demo)
    if args.n > 0:
        syn = measure_synthetic(
            att,
            cfg,
            args.workdir,
            args.n,
            args.dtype,
            args.noise,
            args.seed,
            args.chunk_rows,
            sizes,
            args.k,
            args.repeats,
        )
        timings.update(syn.pop("timings"))
        result.update(syn)
    result["timings"] = timings
    result["loadavg_end"] = load_average()
    result["wall_s"] = time.perf_counter() - t0
    print(table(result))
    print(
        f"load average start {result['loadavg_start']} end {result['loadavg_end']}; "
        f"wall {result['wall_s']:.1f} s"
    )
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, sort_keys=True)
    return result


if __name__ == "__main__":
    main()
