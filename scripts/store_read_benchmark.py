"""Measures write and read throughput of the vector store against its alternatives.

Compares, on the same bytes (rows x dim float32, split into chunks of chunk_rows):
  raw        np.ndarray.tofile / np.fromfile per chunk (the floor: one read, one copy)
  ts_raw     one tensorstore zarr3 array per chunk, no commit protocol
  store      trackstar.store.VectorStore (zarr3 arrays + atomic commit), write_chunk /
             iter_chunks(prefetch=0) / iter_chunks(prefetch=2)
  orbax      one orbax PyTreeCheckpointer save / restore per chunk ({"ids", "vectors"})

VectorStore reads include the CRC-32 check of every data file. --checksums instead compares the
stdlib checksums the store could use (MiB/s on one in-memory buffer, best of 5; no disk).

Reads follow writes, so they hit the page cache unless --drop_caches works (needs root); the
comparison is then of the software path, which is what differs between the options.

Run: python scripts/store_read_benchmark.py --rows 65536 --dim 4096 --chunk_rows 4096
     python scripts/store_read_benchmark.py --checksums --checksum_mib 64
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
import zlib
from collections.abc import Callable

import numpy as np
import tensorstore as ts

from trackstar.store import StoreMeta, VectorStore, _zarr_spec


def _drop_caches(enabled: bool) -> None:
    if not enabled:
        return
    subprocess.run(["sync"], check=False)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass


def _timed(label: str, nbytes: int, fn, results: dict) -> None:
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    results[label] = nbytes / 2**20 / dt
    print(f"{label:28s} {dt:7.2f} s  {results[label]:8.0f} MiB/s", flush=True)


def checksum_rates(mib: int, repeats: int = 5) -> dict[str, float]:
    """MiB/s of stdlib checksums (and a memcpy, for scale) over one ``mib`` MiB buffer.

    Best of ``repeats``: on a shared machine the best run is the least disturbed one.
    """
    buf = np.random.default_rng(0).standard_normal(mib * 2**18, dtype=np.float32)
    data = buf.view(np.uint8)
    candidates: dict[str, Callable[[], object]] = {
        "zlib.crc32": lambda: zlib.crc32(data),
        "zlib.adler32": lambda: zlib.adler32(data),
        "hashlib.sha1": lambda: hashlib.sha1(data).digest(),
        "hashlib.sha256": lambda: hashlib.sha256(data).digest(),
        "hashlib.blake2b": lambda: hashlib.blake2b(data).digest(),
        "hashlib.md5": lambda: hashlib.md5(data).digest(),
        "memcpy (numpy copy)": buf.copy,
    }
    rates = {}
    for name, fn in candidates.items():
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        rates[name] = mib / best
        print(f"{name:28s} {rates[name]:8.0f} MiB/s", flush=True)
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=65536)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--chunk_rows", type=int, default=4096)
    ap.add_argument("--dir", default="", help="scratch directory (default: a temp dir)")
    ap.add_argument("--skip_orbax", action="store_true")
    ap.add_argument("--drop_caches", action="store_true", help="drop the page cache before reads")
    ap.add_argument(
        "--checksums", action="store_true", help="only compare checksum rates (no disk)"
    )
    ap.add_argument("--checksum_mib", type=int, default=64, help="buffer size for --checksums")
    args = ap.parse_args()
    if args.checksums:
        print(f"checksums over one {args.checksum_mib} MiB buffer (best of 5)")
        checksum_rates(args.checksum_mib)
        return

    root = args.dir or tempfile.mkdtemp(prefix="store_bench_")
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    n_chunks = -(-args.rows // args.chunk_rows)
    # One chunk's worth of random rows, reused with a per-chunk offset: generating 1 GiB of
    # normals would dominate the run.
    base_NxD = rng.standard_normal((args.chunk_rows, args.dim), dtype=np.float32)
    chunks = []
    for c in range(n_chunks):
        lo, hi = c * args.chunk_rows, min((c + 1) * args.chunk_rows, args.rows)
        chunks.append((np.arange(lo, hi, dtype=np.int64), base_NxD[: hi - lo] + np.float32(c)))
    nbytes = args.rows * args.dim * 4
    print(f"{args.rows} rows x {args.dim} float32 = {nbytes / 2**20:.0f} MiB, {n_chunks} chunks")
    results: dict[str, float] = {}
    sink = [0.0]

    def consume(vectors_NxD: np.ndarray) -> None:
        sink[0] += float(vectors_NxD[0, 0])  # Touch the data so nothing is lazily skipped.

    # raw
    raw_dir = os.path.join(root, "raw")
    os.makedirs(raw_dir, exist_ok=True)

    def raw_write() -> None:
        for c, (ids, vec) in enumerate(chunks):
            vec.tofile(os.path.join(raw_dir, f"{c}.vec"))
            ids.tofile(os.path.join(raw_dir, f"{c}.ids"))

    def raw_read() -> None:
        for c in range(n_chunks):
            v = np.fromfile(os.path.join(raw_dir, f"{c}.vec"), np.float32).reshape(-1, args.dim)
            np.fromfile(os.path.join(raw_dir, f"{c}.ids"), np.int64)
            consume(v)

    _timed("raw write (tofile)", nbytes, raw_write, results)
    _drop_caches(args.drop_caches)
    _timed("raw read (fromfile)", nbytes, raw_read, results)

    # ts_raw
    ts_dir = os.path.join(root, "ts")
    ctx = ts.Context()

    def ts_write() -> None:
        for c, (_, vec) in enumerate(chunks):
            spec = _zarr_spec(os.path.join(ts_dir, str(c)), vec.shape, "float32")
            arr = ts.open(spec, create=True, delete_existing=True, context=ctx).result()
            arr.write(vec).result()

    def ts_read() -> None:
        for c in range(n_chunks):
            spec = _zarr_spec(os.path.join(ts_dir, str(c)))
            consume(ts.open(spec, open=True, context=ctx).result().read().result())

    _timed("tensorstore zarr3 write", nbytes, ts_write, results)
    _drop_caches(args.drop_caches)
    _timed("tensorstore zarr3 read", nbytes, ts_read, results)

    # store
    store_dir = os.path.join(root, "store")
    shutil.rmtree(store_dir, ignore_errors=True)
    meta = StoreMeta(
        kind="train",
        dim=args.dim,
        dtype="float32",
        num_examples=args.rows,
        chunk_size=args.chunk_rows,
        model_fingerprint="bench",
        optimizer_fingerprint="bench",
        projection={"mode": "dense", "seed": 0, "dim": args.dim},
        output_fn="train_loss",
        correction="none",
    )

    def store_write() -> None:
        store = VectorStore.create(store_dir, meta)
        for c, (ids, vec) in enumerate(chunks):
            store.write_chunk(c, ids, vec)
        store.finalize()

    def store_read(prefetch: int) -> None:
        for _, vec in VectorStore.open(store_dir).iter_chunks(prefetch=prefetch):
            consume(vec)

    _timed("VectorStore write_chunk", nbytes, store_write, results)
    _drop_caches(args.drop_caches)
    _timed("VectorStore read prefetch=0", nbytes, lambda: store_read(0), results)
    _drop_caches(args.drop_caches)
    _timed("VectorStore read prefetch=2", nbytes, lambda: store_read(2), results)

    # orbax
    if not args.skip_orbax:
        import orbax.checkpoint as ocp

        ckpt = ocp.PyTreeCheckpointer()
        orbax_dir = os.path.join(root, "orbax")
        shutil.rmtree(orbax_dir, ignore_errors=True)

        def orbax_write() -> None:
            for c, (ids, vec) in enumerate(chunks):
                ckpt.save(os.path.join(orbax_dir, str(c)), {"ids": ids, "vectors": vec})

        def orbax_read() -> None:
            for c in range(n_chunks):
                tree = ckpt.restore(os.path.join(orbax_dir, str(c)))
                consume(np.asarray(tree["vectors"]))

        _timed("orbax PyTreeCheckpointer save", nbytes, orbax_write, results)
        _drop_caches(args.drop_caches)
        _timed("orbax PyTreeCheckpointer restore", nbytes, orbax_read, results)

    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
