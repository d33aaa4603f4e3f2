"""Featurize: examples -> per-example feature vectors -> a resumable store (docs/method.md).

The feature kernel (gradients + correction + projection, ``trackstar.gradients``) runs on a
mesh (``make_mesh_feature_fn``; one device is a 1-device mesh) batch by batch; rows are grouped
into store chunks and each chunk is committed atomically, so a killed run restarts at the first
missing chunk and the finished store equals an uninterrupted one. With several processes each
writes its own chunks (``c % P == p``) into the one store and process 0 finalizes it. On a mesh
that spans processes (``mesh.featurize_scope = "global"``) every kernel call is a collective, so
the processes featurize in lockstep rounds instead (``featurize_into_store``). Store writes run
on a background thread so disk I/O overlaps the next chunk's compute.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from tqdm.auto import tqdm

from trackstar import multihost
from trackstar.gradients import make_feature_fn
from trackstar.rows import spans_processes
from trackstar.sharding import (
    DATA,
    ShardingError,
    batch_sharding,
    default_mesh,
    matched_shardings,
    replicated,
)
from trackstar.store import VectorStore

FeatureFn = Callable[[object, np.ndarray, np.ndarray], object]
PyTree = Any


class BadExampleError(ValueError):
    """An example that cannot be featurized (no counted tokens, non-finite gradient, ...)."""


@dataclass(frozen=True)
class Examples:
    """Encoded examples: ``tokens_NxT`` int32 and ``weights_NxT`` float32.

    An example's id is its position ``0..N-1`` (candidate id, document id or query index).
    """

    tokens_NxT: np.ndarray
    weights_NxT: np.ndarray
    # Positions that could not be encoded (kept as zero-weight rows) and why.
    skipped: Mapping[int, str] = field(default_factory=dict)

    def __post_init__(self):
        if self.weights_NxT.shape != self.tokens_NxT.shape or self.tokens_NxT.ndim != 2:
            raise ValueError(
                f"tokens {self.tokens_NxT.shape} and weights {self.weights_NxT.shape} must be "
                "equal N x T arrays"
            )

    def __len__(self) -> int:
        return self.tokens_NxT.shape[0]

    def take(self, index: np.ndarray) -> Examples:
        return Examples(self.tokens_NxT[index], self.weights_NxT[index])


def skipped_examples(examples: Examples, skip: bool) -> dict[int, str]:
    """``{id: reason}`` of examples that cannot be featurized; an error unless ``skip``.

    A zero-weight example would featurize to an all-zero vector and, once normalized, to NaN or
    an arbitrary direction; it must never enter a store silently. Checked before any work.
    """
    bad = {int(i): "no counted tokens" for i in np.flatnonzero(examples.weights_NxT.sum(1) <= 0)}
    bad.update(examples.skipped)
    if bad and not skip:
        ids = sorted(bad)
        raise BadExampleError(
            f"{len(ids)} example(s) cannot be featurized (e.g. id {ids[0]}: {bad[ids[0]]}; ids "
            f"{ids[:10]}{' ...' if len(ids) > 10 else ''}); remove them, or set "
            "featurize.skip_bad_examples=True to skip them (they are listed in the store's "
            "metadata)"
        )
    return bad


def make_mesh_feature_fn(
    apply_fn: Callable,
    output_fn: str,
    projector: Any,
    preconditioner: PyTree | None = None,
    mesh: Mesh | None = None,
    shardings: PyTree | None = None,
    *,
    fast: bool | None = None,
) -> FeatureFn:
    """``fn(params, tokens_BxT, weights_BxT) -> vectors_BxD`` jitted on ``mesh``.

    The kernel of ``trackstar.gradients.make_feature_fn`` (same math, same compiled body) with
    explicit shardings: batch rows over the ``data`` axis, ``params`` and the preconditioner by
    ``shardings`` (``trackstar.sharding.param_shardings``; None: replicated), vectors out over
    ``data``. GSPMD then partitions the per-example gradients like the parameters, and the
    projection contracts the sharded dimensions with partial sums and one all-reduce of
    ``B x d``, so a per-example gradient of a sharded model is never gathered onto one device.
    ``mesh`` None is ``single_device_mesh()``.

    Pass params placed with ``trackstar.sharding.place(params, fn.shardings)`` (host arrays
    are transferred on every call). The batch size must be a multiple of the data axis size.
    ``fn.jitted`` is the sharded jit (for ``.lower(...)``), ``fn.precond`` the placed
    preconditioner, ``fn.fast`` the gradient path taken, ``fn.mesh`` the mesh. On a mesh that
    spans processes each process passes the rows of its own devices (processes holding the same
    ``data`` positions pass the same rows) and every call is a collective.
    """
    base = make_feature_fn(apply_fn, output_fn, projector, preconditioner, fast=fast)
    mesh = default_mesh(mesh)
    if shardings is None:
        shardings = jax.tree.map(lambda _: replicated(mesh), projector.params_like)
    data_size = mesh.shape[DATA]
    batch = batch_sharding(mesh)
    precond_sh = precond = None
    if preconditioner is not None:
        precond_sh = matched_shardings(preconditioner, projector.params_like, shardings, mesh)
        precond = jax.device_put(preconditioner, precond_sh)
    jitted = jax.jit(
        base.jitted, in_shardings=(shardings, precond_sh, batch, batch), out_shardings=batch
    )

    def feature_fn(params: PyTree, tokens_BxT: Any, weights_BxT: Any) -> jax.Array:
        if np.shape(tokens_BxT)[0] % data_size:
            raise ShardingError(
                f"batch of {np.shape(tokens_BxT)[0]} rows cannot be split over the data axis of "
                f"size {data_size}; set featurize.batch_size to a multiple of {data_size}"
            )
        tokens_BxT, weights_BxT = (_to_global(x, batch) for x in (tokens_BxT, weights_BxT))
        return jitted(params, precond, tokens_BxT, weights_BxT)

    feature_fn.jitted = jitted
    feature_fn.precond = precond
    feature_fn.shardings = shardings
    feature_fn.fast = base.fast
    feature_fn.mesh = mesh
    return feature_fn


def feed_groups(mesh: Mesh) -> list[list[int]]:
    """Processes of ``mesh`` grouped by the batch rows they feed, ascending by ``data`` position.

    A process feeds the rows of the ``data`` positions its devices hold; processes holding the
    same positions (a ``model`` axis across processes) are one group and must pass the same
    rows. A mesh of one process is one group. Groups that overlap only partly, or a mesh that
    leaves out a process, cannot be fed from per-process rows (``ShardingError``).
    """
    axis = mesh.axis_names.index(DATA)
    held: dict[int, set[int]] = {}
    for index, device in np.ndenumerate(mesh.devices):
        held.setdefault(device.process_index, set()).add(index[axis])
    if len(held) > 1 and set(held) != set(range(jax.process_count())):
        raise ShardingError(
            "a featurize mesh that spans processes must span all of them; use "
            "mesh.featurize_scope = 'global' (every device) or 'local'"
        )
    groups: dict[frozenset[int], list[int]] = {}
    for proc in sorted(held):
        groups.setdefault(frozenset(held[proc]), []).append(proc)
    keys = sorted(groups, key=min)
    for i, a in enumerate(keys):
        for b in (b for b in keys[i + 1 :] if a & b):
            raise ShardingError(
                f"processes {groups[a]} and {groups[b]} hold overlapping but different data "
                "positions of the featurize mesh; lay it out so that processes share all their "
                "data positions or none (trackstar.sharding.make_mesh over jax.devices() does)"
            )
    return [groups[k] for k in keys]


def _to_global(x: Any, sharding: NamedSharding) -> jax.Array:
    """Host rows -> a sharded array (multi-process JAX refuses numpy with a sharded jit input).

    On a mesh of this process's devices the rows are the whole batch; on a mesh spanning
    processes they are this process's share.
    """
    if isinstance(x, jax.Array):
        return x
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    return jax.make_array_from_process_local_data(sharding, np.asarray(x))


def _host_rows(v: Any) -> np.ndarray:
    """Feature vectors as host rows: this process's share of a batch on a multi-process mesh."""
    if isinstance(v, jax.Array) and not v.is_fully_addressable:
        shards = {s.index[0].start or 0: s.data for s in v.addressable_shards}
        return np.concatenate([np.asarray(shards[i]) for i in sorted(shards)])
    return np.asarray(v)


def _pad_batch(tokens: np.ndarray, weights: np.ndarray, batch_size: int):
    """Pads a short final batch with zero-weight rows so the kernel compiles once."""
    n = tokens.shape[0]
    if n == batch_size:
        return tokens, weights
    pad = batch_size - n
    tokens = np.concatenate([tokens, np.zeros((pad, tokens.shape[1]), tokens.dtype)])
    weights = np.concatenate([weights, np.zeros((pad, weights.shape[1]), weights.dtype)])
    return tokens, weights


def compute_vectors(
    feature_fn: FeatureFn, params, examples: Examples, batch_size: int
) -> np.ndarray:
    """Runs the feature kernel over ``examples`` in fixed-size batches -> ``vectors_NxD``."""
    # Dispatch every batch before reading any result back: JAX's async dispatch then keeps the
    # device busy while the host pads the next batch (no host round trip inside the loop).
    pending = []
    for start in range(0, len(examples), batch_size):
        tok = examples.tokens_NxT[start : start + batch_size]
        wts = examples.weights_NxT[start : start + batch_size]
        tok_p, wts_p = _pad_batch(tok, wts, batch_size)
        pending.append((tok.shape[0], feature_fn(params, tok_p, wts_p)))
    if not pending:
        return np.zeros((0, 0), np.float32)
    return np.concatenate([_host_rows(v).astype(np.float32, copy=False)[:n] for n, v in pending])


def featurize_into_store(
    feature_fn: FeatureFn,
    params,
    examples: Examples,
    store: VectorStore,
    batch_size: int,
    chunks: Sequence[int] | None = None,
    skip_bad_examples: bool = False,
    progress: bool = True,
    desc: str = "featurize",
    finalize: bool = False,
) -> int:
    """Fills this process's missing chunks (or just ``chunks``); returns the rows it wrote.

    Chunk ``c`` holds examples ``[c * chunk_size, (c + 1) * chunk_size)``; of P processes,
    process p writes the missing chunks with ``c % P == p`` (one process: all of them). Examples
    with no counted tokens are refused up front, or skipped and listed with
    ``skip_bad_examples``. A chunk with a non-finite row is refused by the store (naming the
    example ids) before any of it is committed. Store writes overlap the next chunk's compute
    on a writer thread. ``finalize``: after a barrier, process 0 finalizes the store (which
    proves every example position is covered once), then a second barrier.

    When ``feature_fn.mesh`` spans processes (``make_mesh_feature_fn`` on a global mesh), every
    call is a collective, so the processes run in lockstep: they agree on the missing chunks
    (a chunk committed in any process's view is done), missing chunk i goes to feed group
    ``i % G`` (``feed_groups``; one process per group unless a ``model`` axis crosses
    processes; the group's first process writes it), and in every round each process makes as
    many calls as the round's longest chunk needs, on all-padding batches when it has fewer
    rows. ``batch_size`` is then the rows each group feeds per call; ``chunks`` must be None.
    """
    meta = store.meta
    if meta.num_examples != len(examples):
        raise BadExampleError(
            f"the store at {store.path} expects {meta.num_examples} examples, got "
            f"{len(examples)}; featurize into a new store path"
        )
    bad = skipped_examples(examples, skip_bad_examples)
    me, n_proc = jax.process_index(), jax.process_count()
    mesh = getattr(feature_fn, "mesh", None)
    if mesh is not None and spans_processes(mesh):
        if chunks is not None:
            raise ValueError(
                "featurize_into_store(chunks=...) on a mesh that spans processes: the processes "
                "split the missing chunks between them in lockstep; pass chunks=None"
            )
        plan = _lockstep_plan(store, bad, batch_size, feed_groups(mesh), me)
    else:
        todo = list(store.chunks_for_process(me, n_proc) if chunks is None else chunks)
        plan = [(c, None, True) for c in todo]
    progress = progress and me == 0
    total = sum(meta.chunk_range(c)[1] - meta.chunk_range(c)[0] for c, _, _ in plan if c >= 0)
    lockstep = any(calls is not None for _, calls, _ in plan)
    written, refused = 0, None
    with (
        tqdm(total=total, desc=desc, unit="ex", disable=not progress, smoothing=0.1) as bar,
        concurrent.futures.ThreadPoolExecutor(max_workers=1) as writer,
    ):
        pending = None
        for c, calls, write in plan:
            lo, hi = meta.chunk_range(c) if c >= 0 else (0, 0)
            ids = np.array([i for i in range(lo, hi) if i not in bad], np.int64)
            skipped = [{"id": i, "reason": bad[i]} for i in range(lo, hi) if i in bad]
            if calls is not None:  # lockstep: exactly `calls` kernel calls, padding included
                vectors = _lockstep_vectors(
                    feature_fn, params, examples.take(ids), batch_size, calls, meta.dim
                )
            elif len(ids):
                vectors = compute_vectors(feature_fn, params, examples.take(ids), batch_size)
            else:
                vectors = np.zeros((0, meta.dim), np.float32)
            if c < 0 or not write:
                continue
            if pending is not None:
                refused = _write_result(pending, lockstep, refused)
            pending = writer.submit(store.write_chunk, c, ids, vectors, skipped)
            written += len(ids)
            bar.update(hi - lo)
        if pending is not None:
            refused = _write_result(pending, lockstep, refused)
    if refused is not None:
        raise refused
    if finalize:
        name = os.path.basename(store.path)
        multihost.barrier(f"trackstar-featurized-{name}")
        if me == 0:
            store.finalize()
        multihost.barrier(f"trackstar-finalized-{name}")
    return written


def _write_result(
    pending: concurrent.futures.Future, lockstep: bool, refused: Exception | None
) -> Exception | None:
    """Waits for a chunk write. A refused chunk raises at once (before more work is queued),
    except in lockstep, where this process must still make its calls of the remaining rounds
    (its peers are waiting in the collectives): the first refusal is then returned, to be
    raised after the last round."""
    if not lockstep:
        pending.result()
        return None
    try:
        pending.result()
    except Exception as e:  # re-raised after the last round
        return refused or e
    return refused


def _lockstep_plan(
    store: VectorStore,
    bad: Mapping[int, str],
    batch_size: int,
    groups: list[list[int]],
    me: int,
) -> list[tuple[int, int, bool]]:
    """This process's rounds: ``(chunk or -1, kernel calls, whether it writes the chunk)``.

    Every process gets the same number of rounds and the same calls per round, so the
    collectives of the feature kernel line up. The missing chunks are agreed on by gathering
    every process's view of the store before anyone writes; a chunk committed in any view is
    done (commits are atomic, a view that lacks it is stale).
    """
    meta = store.meta
    missing = np.zeros(meta.num_chunks, np.int8)
    missing[store.missing_chunks()] = 1
    views = multihost_utils.process_allgather(missing).reshape(-1, meta.num_chunks)
    todo = [int(c) for c in np.flatnonzero(views.min(axis=0))]
    group = next(g for g, procs in enumerate(groups) if me in procs)
    writes = groups[group][0] == me

    def calls(c: int) -> int:
        lo, hi = meta.chunk_range(c)
        return -(-sum(i not in bad for i in range(lo, hi)) // batch_size)

    n_groups = len(groups)
    plan = []
    for start in range(0, len(todo), n_groups):
        round_chunks = todo[start : start + n_groups]
        mine = round_chunks[group] if group < len(round_chunks) else -1
        plan.append((mine, max(calls(c) for c in round_chunks), writes))
    return plan


def _lockstep_vectors(
    feature_fn: FeatureFn, params, examples: Examples, batch_size: int, calls: int, dim: int
) -> np.ndarray:
    """``compute_vectors`` in exactly ``calls`` kernel calls: batches past the examples are all
    padding (token 0, weight 0) and their outputs are dropped."""
    assert -(-len(examples) // batch_size) <= calls, (len(examples), batch_size, calls)
    pending = []
    for k in range(calls):
        tok = examples.tokens_NxT[k * batch_size : (k + 1) * batch_size]
        wts = examples.weights_NxT[k * batch_size : (k + 1) * batch_size]
        tok_p, wts_p = _pad_batch(tok, wts, batch_size)
        pending.append((tok.shape[0], feature_fn(params, tok_p, wts_p)))
    rows = [_host_rows(v).astype(np.float32, copy=False)[:m] for m, v in pending if m]
    return np.concatenate(rows) if rows else np.zeros((0, dim), np.float32)
