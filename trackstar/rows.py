"""Row streams on a mesh: what scoring and the Gauss-Newton sum read, and how rows reach devices.

A vector source is an array ``vectors_NxD`` (ids ``0..N-1``), an iterable of
``(ids_N, vectors_NxD)`` chunks in ascending id order, or a store (``trackstar.store.VectorStore``
or anything with ``iter_chunks``). Kernels stream it in blocks, cut each block into pieces of a
fixed row count (so the step compiles once), pad a piece to a multiple of the mesh's local
devices and hand it over as one row-sharded global array.

When the mesh spans several processes, each process reads its own part of a store in lockstep
rounds: round r gives process p chunk ``r * P + p`` (an empty block past the end), and every
process runs the same number of steps per round, so the collectives line up without any other
coordination. A mesh of this process's devices reads the whole source, whatever the number of
processes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from trackstar.sharding import row_sharding

Blocks = Iterator[tuple[np.ndarray, np.ndarray]]


# ----------------------------------------------------------------------------- sources


def iter_vector_chunks(
    source: Any, rows_per_step: int | None = None, error: type[Exception] = ValueError
) -> Blocks:
    """Yields ``(ids_N int64, vectors_NxD)`` from an array, a chunk iterable, or a store.

    A plain array gets ids ``0..N-1`` and is cut into ``rows_per_step`` rows (all at once when
    None). A store is read with ``source.iter_chunks(rows_per_step)``. Malformed input raises
    ``error``.
    """
    if hasattr(source, "iter_chunks"):
        yield from source.iter_chunks(rows_per_step=rows_per_step)
        return
    if isinstance(source, np.ndarray) or hasattr(source, "__array__") and hasattr(source, "shape"):
        arr = np.asarray(source)
        if arr.ndim != 2:
            raise error(f"expected vectors of shape (N, D), got shape {arr.shape}")
        step = rows_per_step or max(len(arr), 1)
        for start in range(0, len(arr), step):
            stop = min(start + step, len(arr))
            yield np.arange(start, stop, dtype=np.int64), arr[start:stop]
        return
    for item in source:
        if not (isinstance(item, tuple | list) and len(item) == 2):
            raise error(
                "a chunk source must yield (ids_N, vectors_NxD) pairs; pass a plain array "
                "of shape (N, D) for vectors without ids"
            )
        ids, vecs = np.asarray(item[0]), np.asarray(item[1])
        if vecs.ndim != 2 or ids.shape != (vecs.shape[0],):
            raise error(
                f"chunk has ids of shape {ids.shape} and vectors of shape {vecs.shape}; "
                "expected (N,) and (N, D)"
            )
        yield ids.astype(np.int64, copy=False), vecs


def source_num_rows(source: Any) -> int | None:
    """The row count of a store or array, or None for a plain iterable (unknown up front)."""
    if hasattr(source, "num_rows"):
        return int(source.num_rows)
    if hasattr(source, "shape"):
        return int(source.shape[0])
    return None


def source_meta(source: Any) -> dict | None:
    """The store metadata of ``source`` as a plain dict, or None when it carries none."""
    meta = getattr(source, "meta", None)
    if meta is None:
        return None
    if dataclasses.is_dataclass(meta) and not isinstance(meta, type):
        return dataclasses.asdict(meta)
    if isinstance(meta, Mapping):
        return dict(meta)
    return dict(vars(meta))


# ----------------------------------------------------------------------------- mesh streams


def spans_processes(mesh: Mesh) -> bool:
    """Whether ``mesh`` holds devices of more than one process."""
    return len({d.process_index for d in mesh.devices.flat}) > 1


def local_mesh_devices(mesh: Mesh) -> int:
    """The number of ``mesh`` devices this process drives."""
    return sum(d.process_index == jax.process_index() for d in mesh.devices.flat)


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def local_blocks(
    source: Any, rows_per_step: int | None, mesh: Mesh, error: type[Exception] = ValueError
) -> tuple[Blocks, int]:
    """``(blocks, fixed_rows)``: this process's share of ``source``, in stream order.

    On a mesh of this process's devices, the whole source (``iter_vector_chunks``) and
    ``fixed_rows = 0``. On a mesh spanning processes, ``source`` must be a finished store:
    round r gives process p chunk ``r * P + p`` (an empty block once past the end) and
    ``fixed_rows`` is the chunk size, the rows every process steps over per round.
    """
    if not spans_processes(mesh):
        return iter_vector_chunks(source, rows_per_step, error), 0
    if {d.process_index for d in mesh.devices.flat} != set(range(jax.process_count())):
        raise error("a mesh that spans processes must span all of them; use the global mesh")
    if not (hasattr(source, "read_chunk") and hasattr(source, "meta")):
        raise error(
            "with a mesh over several processes, pass a VectorStore (each process reads its "
            "own chunks); arrays and iterables are single-process only"
        )
    if not getattr(source, "is_complete", True):
        raise error(f"the store at {source.path} is incomplete; finish featurize first")
    meta = source.meta
    n_chunks, n_proc, me = meta.num_chunks, jax.process_count(), jax.process_index()

    def blocks() -> Blocks:
        for r in range(-(-n_chunks // n_proc)):
            c = r * n_proc + me
            if c < n_chunks:
                yield source.read_chunk(c)
            else:
                yield np.zeros(0, np.int64), np.zeros((0, meta.dim), np.float32)

    return blocks(), int(meta.chunk_size)


def pieces(
    ids: np.ndarray, vecs: np.ndarray, step_rows: int, fixed_rows: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``ids`` / ``vecs`` cut into ``step_rows`` rows; at least ``fixed_rows / step_rows``
    pieces (trailing ones empty), so every process of a lockstep round steps alike."""
    n = max(len(ids), fixed_rows)
    for start in range(0, n, step_rows):
        yield ids[start : start + step_rows], vecs[start : start + step_rows]


def global_rows(
    mesh: Mesh,
    local_rows: int,
    ids: np.ndarray,
    vecs: np.ndarray,
    dim: int,
    alias: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(ids, valid, vectors)`` row-sharded over ``mesh``: this process's rows padded to
    ``local_rows`` (a multiple of its mesh devices) with id -1, ``valid`` False, zero rows.

    ``alias``: the rows may be handed to a one-device CPU mesh without a copy (``_device_rows``);
    only for host buffers that outlive the step (a mapped store's chunks), and the caller
    deletes the returned vectors once its steps are done (``release_rows``).
    """
    n = len(ids)
    pad = local_rows - n
    valid = np.zeros(local_rows, bool)
    valid[:n] = True
    ids_p = np.concatenate([np.asarray(ids, np.int32), np.full(pad, -1, np.int32)])
    vecs = np.asarray(vecs, np.float32).reshape(n, dim)
    # A full piece goes as it is: padding would copy every row once more on the host.
    vecs_p = vecs if pad == 0 else np.concatenate([vecs, np.zeros((pad, dim), np.float32)])
    sh = row_sharding(mesh)
    mk = jax.make_array_from_process_local_data
    vec_arr = _device_rows(mesh, sh, vecs_p) if alias else mk(sh, vecs_p)
    return mk(sh, ids_p), mk(sh, valid), vec_arr


def release_rows(arrays: list[jax.Array], after: Any) -> None:
    """Deletes the device arrays ``arrays`` once ``after`` (the output of the last step that
    read them) is ready.

    An array aliasing a host buffer through DLPack hands that buffer back through a Python
    callback when it is freed; freeing it here, in the caller's thread with no step still
    reading it, keeps that callback from running late on a runtime thread (at interpreter exit
    it would abort the process).
    """
    if not arrays:
        return
    try:
        jax.block_until_ready(after)
    except RuntimeError:  # A step failed (its error is already raised): nothing runs.
        pass
    for a in arrays:
        a.delete()
    arrays.clear()


def _device_rows(mesh: Mesh, sharding: Any, vecs_NxD: np.ndarray) -> jax.Array:
    """``vecs_NxD`` as a global array of ``sharding``: on a one-device CPU mesh without a copy
    when the buffer allows it (DLPack aliases a C-contiguous, writable, 64-byte-aligned host
    array, e.g. a store's memory-mapped chunk); else one copy per device."""
    dev = mesh.devices.flat[0]
    if (
        mesh.devices.size == 1
        and dev.platform == "cpu"
        and dev.process_index == jax.process_index()
        and vecs_NxD.flags.c_contiguous
        and vecs_NxD.flags.writeable
        and vecs_NxD.ctypes.data % 64 == 0
    ):
        # The array keeps the host buffer alive; callers do not write to a piece once handed
        # over (the store's maps are private copies, and pieces are never reused).
        return jax.device_put(jax.dlpack.from_dlpack(vecs_NxD), sharding)
    return jax.make_array_from_process_local_data(sharding, vecs_NxD)


def gather_rows(x: jax.Array) -> np.ndarray:
    """A row-sharded global array as one host array on every process."""
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def sum_over_processes(n: int, mesh: Mesh) -> int:
    """``n`` summed over the processes of ``mesh`` (``n`` itself on a process-local mesh)."""
    if not spans_processes(mesh):
        return int(n)
    return int(np.sum(multihost_utils.process_allgather(np.asarray([n], np.int64))))


def fetch_replicated(x: jax.Array) -> np.ndarray:
    """A fully replicated global array as numpy (every process holds a full copy)."""
    return np.asarray(x.addressable_data(0))


class DispatchLimit:
    """Bounds how many jitted steps a streaming loop has queued on the devices.

    JAX dispatches asynchronously: a loop that only feeds steps (no value read back until the
    end) runs ahead of the devices, and every queued step keeps its input block alive, so memory
    would grow with the number of rows streamed. ``wait(out)`` after each step blocks on every
    ``every``-th step's output, so at most ``every`` steps are queued while the host prepares the
    next block.
    """

    def __init__(self, every: int = 2):
        self.every = max(int(every), 1)
        self.count = 0

    def wait(self, out: Any) -> None:
        self.count += 1
        if self.count % self.every == 0:
            jax.block_until_ready(out)
