"""Scoring index: a candidate store's rows finished once for a preset, then scored by one matmul.

``score.score_preset`` streams the raw candidate rows through the preset's d×d train transform
(R^{-1/2}) and unit-normalizes them on every call. An index does that once: ``build_index``
writes the finished rows ``T_m u_m`` (unit length when the preset normalizes; float32 or
bfloat16) to a ``VectorStore`` laid out chunk for chunk like its source store, and
``score_index`` transforms a query batch once (``T_q u_q``, normalized as the preset says) and
streams the index through ``score.top_k_scores`` with no transform: a streamed matmul and the
same running top-k, merge and non-finite checks as every other scoring call. A preset without
R (``grad_dot``, ``exp_opt_norm``, ...) indexes the corrected (or raw) rows, normalized as the
preset says; TRAK's rows stay as they are (its R_train^{-1} is on the query side).

An index is an ordinary ``VectorStore`` (same checksummed chunks, atomic commits, resume): its
metadata is the source store's (model, optimizer, projection, correction: a query store that
matches the source matches the index) with the index's row dtype and an ``extra["index"]``
record (``IndexInfo``): the preset, the transform names, the source store's fingerprint
(``store_fingerprint``: its metadata and every chunk's recorded size and CRC-32) and the fit's
(``fit_fingerprint``: the bytes of the transforms the preset uses). ``ScoringIndex.check``
refuses an index opened against another store, fit or preset, naming each mismatch and the fix
(rebuild it: ``trackstar index`` / ``stages.stage_index``). An index is not a candidate store:
score it with ``score_index`` only (``score_preset`` on it would apply the transform twice).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from trackstar import rows, score, store
from trackstar.hessian import HessianError, HessianFit
from trackstar.multihost import barrier, is_main_process
from trackstar.sharding import default_mesh, make_mesh, replicated, row_sharding
from trackstar.store import StoreError, StoreMeta, VectorStore

# Version of the ``extra["index"]`` record; an index of another format is rebuilt.
INDEX_FORMAT = 1
# The ``StoreMeta.extra`` key that marks a store as a scoring index.
INDEX_KEY = "index"


class ScoringIndexError(ValueError):
    """An index that cannot be built or used as asked; the message says what to do instead."""


class IndexMismatchError(ScoringIndexError):
    """An index opened against another store, Hessian fit or preset than it was built from."""


# ----------------------------------------------------------------------------- fingerprints


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def store_fingerprint(vs: VectorStore) -> str:
    """A short hash of a finished store's content: its metadata (with every skipped example),
    row count, and each chunk's recorded data-file sizes and CRC-32s.

    Reads only the chunks' commit records (``chunk.json``), never the rows: the CRC-32s already
    pin the bytes, so two stores share a fingerprint only when their rows do.
    """
    if not vs.is_complete:
        raise ScoringIndexError(
            f"the store at {vs.path} is incomplete; finish featurize before indexing it"
        )
    records = []
    for c in range(vs.num_chunks):
        # The commit record the store's own reads check against (validated there).
        files = vs._chunk_info(c)["files"]
        records.append([[files[n]["nbytes"], files[n]["crc32"]] for n in sorted(files)])
    return _sha({"meta": vs.meta.to_dict(), "rows": vs.num_rows, "chunks": records})


def _transform_names(spec: score.PresetSpec) -> list[str]:
    return sorted({n for n in spec.transform_names() if n is not None})


def fit_fingerprint(fit: HessianFit | None, preset: str | score.PresetSpec) -> str | None:
    """A short hash of the transforms ``preset`` takes from ``fit`` (their float32 bytes, names
    and shapes); None for a preset without R.

    Raises:
      ScoringIndexError: the preset needs a fit and ``fit`` is None or lacks the transform.
    """
    spec = score.get_preset(preset)
    names = _transform_names(spec)
    if not names:
        return None
    if fit is None:
        raise ScoringIndexError(
            f"preset {_preset_name(preset)!r} needs a Hessian fit ({spec.hessian} R); fit one "
            "(trackstar hessian) and pass it"
        )
    # Hashing the transforms reads d² floats (64 MiB at d = 4096): once per fit, not per query.
    cache = getattr(fit, "derived", {})
    key = ("index_fingerprint", tuple(names))
    if key not in cache:
        cache[key] = _hash_transforms(fit, names)
    return cache[key]


def _hash_transforms(fit: HessianFit, names: Sequence[str]) -> str:
    h = hashlib.sha256(f"dim={fit.dim}".encode())
    for name in names:
        try:
            factors = _low_rank_factors(fit, name)
            parts = [fit.transform(name)] if factors is None else list(factors)
        except HessianError as e:
            raise ScoringIndexError(str(e)) from None
        h.update(f"|{name}:{'dense' if factors is None else 'low_rank'}|".encode())
        for part in parts:
            a = np.ascontiguousarray(part, dtype="<f8" if factors is not None else "<f4")
            h.update(f"{a.shape}".encode())
            h.update(a.reshape(-1).view(np.uint8))
    return h.hexdigest()[:16]


def _low_rank_factors(fit: HessianFit, name: str) -> tuple | None:
    """``(scale, Q, coef)`` of a transform held in low-rank form, None for a d×d one (and for
    fits of a ``HessianFit`` without low-rank support)."""
    if not getattr(fit, "is_low_rank", False):
        return None
    return fit.low_rank_factors(name)


def _preset_name(preset: str | score.PresetSpec) -> str:
    return preset if isinstance(preset, str) else "custom"


# ----------------------------------------------------------------------------- the record


@dataclasses.dataclass(frozen=True)
class IndexInfo:
    """What an index was built from (``StoreMeta.extra["index"]`` of the index store).

    preset / spec: the preset's name ("custom" for a ``PresetSpec``) and its fields.
    train_transform / query_transform: the ``HessianFit`` transform names (None: identity).
    normalize: the rows are unit length (and queries are scaled to unit length when scored).
    store_fingerprint / fit_fingerprint: ``store_fingerprint`` of the source store and
    ``fit_fingerprint`` of the fit (None for a preset without R).
    source_store: the source store's path when built (for messages; not compared).
    dtype: the index rows' dtype ("float32" or "bfloat16").
    """

    preset: str
    spec: dict
    train_transform: str | None
    query_transform: str | None
    normalize: bool
    store_fingerprint: str
    fit_fingerprint: str | None
    source_store: str
    dtype: str
    format: int = INDEX_FORMAT

    @classmethod
    def make(
        cls,
        source: VectorStore,
        fit: HessianFit | None,
        preset: str | score.PresetSpec,
        dtype: str = "float32",
    ) -> IndexInfo:
        """The record an index of ``source`` with ``fit`` and ``preset`` gets (checks them)."""
        spec = score.get_preset(preset)
        if dtype not in store.DTYPES:
            raise ScoringIndexError(f"index dtype must be one of {store.DTYPES}, got {dtype!r}")
        meta = source.meta
        has_correction = meta.correction != "none"
        if has_correction != spec.corrected:
            want = "with" if spec.corrected else "without"
            raise ScoringIndexError(
                f"preset {_preset_name(preset)!r} scores vectors {want} the optimizer "
                f"correction, but the store at {source.path} has correction = "
                f"{meta.correction!r}; index a store featurized {want} it"
            )
        if _transform_names(spec):
            if fit is None:
                fit_fingerprint(None, preset)  # Raises, naming what to fit.
            try:
                fit.check_dim(meta.dim, "the store")
                fit.check_compatible(meta.to_dict(), "the store")
            except HessianError as e:
                raise ScoringIndexError(str(e)) from None
        train_name, query_name = spec.transform_names()
        return cls(
            preset=_preset_name(preset),
            spec=spec.record(),
            train_transform=train_name,
            query_transform=query_name,
            normalize=bool(spec.normalize),
            store_fingerprint=store_fingerprint(source),
            fit_fingerprint=fit_fingerprint(fit, preset),
            source_store=os.path.abspath(source.path),
            dtype=dtype,
        )

    def to_dict(self) -> dict:
        """A JSON-ready dict (``from_dict`` reads it back)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str) -> IndexInfo:
        """Reads a record; another format or unknown fields is an error that says to rebuild."""
        names = {f.name for f in dataclasses.fields(cls)}
        if d.get("format") != INDEX_FORMAT or set(d) != names:
            raise ScoringIndexError(
                f"{where} holds an index record of format {d.get('format')!r}, not this "
                f"library's {INDEX_FORMAT}; delete it and rebuild the index (trackstar index)"
            )
        return cls(**d)

    @property
    def preset_spec(self) -> score.PresetSpec:
        """The preset the index was built for."""
        return score.PresetSpec(**self.spec)


def _index_meta(source: VectorStore, info: IndexInfo) -> StoreMeta:
    """The index store's metadata: the source's, with the index dtype and record, and no skipped
    examples at create time (each chunk passes its own to ``write_chunk``)."""
    meta = source.meta
    return dataclasses.replace(
        meta,
        dtype=info.dtype,
        skipped=[],
        created_by=store.__version__,
        extra={**meta.extra, INDEX_KEY: info.to_dict()},
    )


def read_info(path: str | os.PathLike) -> IndexInfo | None:
    """The ``IndexInfo`` of the index at ``path`` (finished or not); None when there is no
    readable index there (nothing, another store, a damaged or older one)."""
    try:
        vs = VectorStore.open(path, require_complete=False)
        raw = vs.meta.extra.get(INDEX_KEY)
        return None if raw is None else IndexInfo.from_dict(raw, os.fspath(path))
    except (StoreError, ScoringIndexError, OSError):
        return None


# ----------------------------------------------------------------------------- the index


class ScoringIndex:
    """A finished index store and its ``IndexInfo``; open with ``ScoringIndex.open``."""

    def __init__(self, vs: VectorStore, info: IndexInfo):
        self.store = vs
        self.info = info

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        source: VectorStore | None = None,
        fit: HessianFit | None = None,
        preset: str | score.PresetSpec | None = None,
    ) -> ScoringIndex:
        """Opens a finished index; with ``source`` / ``fit`` / ``preset`` also ``check``s it.

        Raises:
          ScoringIndexError: no finished index at ``path`` (says to build or resume it).
          IndexMismatchError: see ``check``.
        """
        path = os.fspath(path)
        try:
            # Read many times: each file's CRC-32 is checked on its first read in this process,
            # and chunks are memory maps the scorer hands to the device without a copy.
            vs = VectorStore.open(path, verify="once", mapped=True)
        except store.IncompleteStoreError:
            raise ScoringIndexError(
                f"the index at {path} is incomplete (its build was interrupted); rerun the "
                "same build (trackstar index, or build_index): it writes only missing chunks"
            ) from None
        except StoreError as e:
            raise ScoringIndexError(
                f"no scoring index at {path} ({' '.join(str(e).split())}); build one with "
                "trackstar index (or trackstar.index.build_index)"
            ) from None
        raw = vs.meta.extra.get(INDEX_KEY)
        if raw is None:
            raise ScoringIndexError(
                f"{path} is a vector store, not a scoring index; build an index of it with "
                "trackstar index (or trackstar.index.build_index)"
            )
        index = cls(vs, IndexInfo.from_dict(raw, path))
        index.check(source, fit, preset)
        return index

    @property
    def path(self) -> str:
        """The index store's directory."""
        return self.store.path

    @property
    def num_rows(self) -> int:
        """Rows indexed (the source store's rows)."""
        return self.store.num_rows

    @property
    def dim(self) -> int:
        """Vector length d."""
        return self.store.dim

    @property
    def meta(self) -> StoreMeta:
        """The index store's metadata (the source store's identity fields)."""
        return self.store.meta

    def check(
        self,
        source: VectorStore | None = None,
        fit: HessianFit | None = None,
        preset: str | score.PresetSpec | None = None,
    ) -> None:
        """Refuses an index used with another store, fit or preset than it was built from.

        Each argument given is compared (``fit`` always when the index's preset has R and a fit
        is given): ``source`` by ``store_fingerprint``, ``fit`` by ``fit_fingerprint`` of the
        index's preset, ``preset`` by name and fields.

        Raises:
          IndexMismatchError: listing every mismatch with both values, and the fix.
        """
        info = self.info
        diffs = []
        if preset is not None:
            spec = score.get_preset(preset)
            if _preset_name(preset) != info.preset or spec.record() != info.spec:
                diffs.append(
                    f"preset: the index is for {info.preset!r} {info.spec}, asked for "
                    f"{_preset_name(preset)!r} {spec.record()}"
                )
        if source is not None:
            got = store_fingerprint(source)
            if got != info.store_fingerprint:
                diffs.append(
                    f"store: the index was built from {info.source_store} (fingerprint "
                    f"{info.store_fingerprint}), not from {os.path.abspath(source.path)} "
                    f"(fingerprint {got}); a store refeaturized in place counts as another"
                )
        if fit is not None and info.fit_fingerprint is not None:
            try:
                got_fit = fit_fingerprint(fit, info.preset_spec)
            except ScoringIndexError as e:
                got_fit = f"unusable ({e})"
            if got_fit != info.fit_fingerprint:
                diffs.append(
                    f"Hessian fit: the index was built with a fit of fingerprint "
                    f"{info.fit_fingerprint}, this fit has {got_fit} (refit or another fit)"
                )
        if diffs:
            raise IndexMismatchError(
                f"the scoring index at {self.path} does not belong to what it is used with:\n  "
                + "\n  ".join(diffs)
                + "\nRebuild it from this store, fit and preset (trackstar index --preset "
                "NAME, stages.stage_index, or build_index into a new path), or use the ones it "
                "was built from"
            )


# ----------------------------------------------------------------------------- build


@functools.cache
def _finish_step(mesh: Mesh, normalize: bool, has_transform: bool) -> Callable:
    """The jitted row step: ``T_m u_m`` (rows sharded over ``mesh``), unit length if asked —
    the per-row part of ``score.top_k_scores``'s step."""

    def finish(vecs_NxD: jax.Array, t_DxD: jax.Array) -> jax.Array:
        if has_transform:
            vecs_NxD = vecs_NxD @ t_DxD.T
        return score.unit_rows(vecs_NxD) if normalize else vecs_NxD

    return jax.jit(
        finish,
        in_shardings=(row_sharding(mesh), replicated(mesh)),
        out_shardings=row_sharding(mesh),
    )


def _read_ahead(
    source: VectorStore, chunks: Sequence[int], depth: int = 2
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """``(chunk, ids_N, vectors_NxD)`` of ``chunks`` in order, ``depth`` chunks read ahead by a
    background thread (the CRC-32 checks release the GIL)."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="index-read") as pool:
        todo = iter(chunks)
        pending: collections.deque[tuple[int, Future]] = collections.deque()
        for c in todo:
            pending.append((c, pool.submit(source.read_chunk, c)))
            if len(pending) >= depth:
                break
        while pending:
            c, fut = pending.popleft()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(source.read_chunk, nxt)))
            ids_N, vecs_NxD = fut.result()
            yield c, ids_N, vecs_NxD


def _chunk_skipped(meta: StoreMeta, chunk: int, ids_N: np.ndarray, reasons: dict) -> list[dict]:
    lo, hi = meta.chunk_range(chunk)
    missing = np.setdiff1d(np.arange(lo, hi, dtype=np.int64), ids_N, assume_unique=True)
    return [{"id": int(i), "reason": reasons.get(int(i), "skipped")} for i in missing]


def build_index(
    source: VectorStore,
    fit: HessianFit | None,
    preset: str | score.PresetSpec,
    out_path: str | os.PathLike,
    dtype: str = "float32",
    *,
    mesh: Mesh | None = None,
    progress: bool | Callable[[int, int | None], None] | None = True,
    rows_per_step: int | None = None,
) -> ScoringIndex:
    """Writes the scoring index of ``source`` for ``preset`` to ``out_path`` and opens it.

    Chunk c of the index holds chunk c of ``source`` as finished rows (``T_m u_m``, unit length
    when the preset normalizes, cast to ``dtype``), so skipped examples and ids carry over.
    Chunks are read ahead in a background thread, finished on ``mesh`` (rows sharded over its
    devices; None: one device) and committed one at a time; an interrupted build resumes (only
    missing chunks are written). On a mesh over several processes each process finishes its own
    chunks on its local devices and process 0 finalizes the index.

    Args:
      source: the finished candidate store.
      fit: the Hessian fit the preset scores with (None for a preset without R).
      preset: a name from ``score.PRESETS`` or a ``PresetSpec``.
      out_path: the index directory (a new path, or an index of the same inputs to resume).
      dtype: the rows' dtype on disk, "float32" or "bfloat16" (half the bytes to stream).
      mesh: the mesh whose devices transform the rows.
      progress: True for a tqdm bar, or a callback ``(rows_done, total)``.
      rows_per_step: rows per jitted step (default: the store's chunk size; padded so the step
        compiles once).

    Raises:
      ScoringIndexError: the store, fit and preset do not belong together (the correction, a
        missing or mismatched fit) or ``dtype`` is unknown.
      IndexMismatchError: ``out_path`` holds an index of other inputs (delete it or use
        another path).
      store.NonFiniteVectorError: finished rows with NaN/inf (names their ids).
    """
    info = IndexInfo.make(source, fit, preset, dtype)
    out_path = os.fspath(out_path)
    try:
        out = VectorStore.create(out_path, _index_meta(source, info))
    except store.StoreMismatchError:
        old = read_info(out_path)
        what = "a vector store that is not an index" if old is None else "an index of other inputs"
        raise IndexMismatchError(
            f"{out_path} holds {what} (another store, fit, preset or dtype); delete it or build "
            "into another path"
        ) from None
    spec = info.preset_spec
    t, host = _transform_parts(fit, info.train_transform)
    mesh = default_mesh(mesh)
    if rows.spans_processes(mesh):
        mine = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
        mesh = make_mesh(-1, 1, mine)
        chunks = out.chunks_for_process(jax.process_index(), jax.process_count())
    else:
        chunks = out.missing_chunks()
    if chunks:
        _write_chunks(source, out, chunks, t, host, spec.normalize, mesh, progress, rows_per_step)
    barrier("trackstar-index-written")
    if is_main_process() and not out.is_complete:
        out.finalize()
    barrier("trackstar-index-finalized")
    return ScoringIndex.open(out_path)


def _transform_parts(
    fit: HessianFit | None, name: str | None
) -> tuple[np.ndarray | None, Callable[[np.ndarray], np.ndarray] | None]:
    """``(T_DxD, None)`` for a d×d transform (applied on the mesh, as the scorer does), or
    ``(None, rows -> T rows)`` for a low-rank one (``HessianFit.apply``: O(d·r) per row on the
    host, no d×d matrix); ``(None, None)`` for the identity."""
    if name is None:
        return None, None
    if _low_rank_factors(fit, name) is not None:
        return None, lambda x: np.asarray(fit.apply(name, x), np.float32)
    return np.asarray(fit.transform(name), np.float32), None


def _write_chunks(
    source: VectorStore,
    out: VectorStore,
    chunks: Sequence[int],
    t_DxD: np.ndarray | None,
    host_transform: Callable[[np.ndarray], np.ndarray] | None,
    normalize: bool,
    mesh: Mesh,
    progress: bool | Callable[[int, int | None], None] | None,
    rows_per_step: int | None,
) -> None:
    """Finishes ``chunks`` of ``source`` into ``out``; the previous chunk's commit (disk) runs
    in a background thread while the next chunk is transformed."""
    meta = source.meta
    d = meta.dim
    reasons = {int(s["id"]): str(s["reason"]) for s in meta.skipped}
    step = _finish_step(mesh, bool(normalize), t_DxD is not None)
    t = jax.device_put(
        np.asarray(np.zeros((1, 1)) if t_DxD is None else t_DxD, np.float32), replicated(mesh)
    )
    n_local = rows.local_mesh_devices(mesh)
    step_rows = int(rows_per_step or meta.chunk_size)
    padded = rows.round_up(step_rows, n_local)
    # Rows to write, from the chunks' commit records (no row is read for it).
    total = sum(int(source._chunk_info(c)["rows"]) for c in chunks)
    update, close = score.progress_bar(progress, total, desc="index")
    done = 0
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="index-write") as writer:
            pending: Future | None = None
            for c, ids_N, vecs_NxD in _read_ahead(source, chunks):
                if host_transform is not None and len(ids_N):
                    vecs_NxD = host_transform(vecs_NxD)
                parts = []
                for piece_ids, piece in rows.pieces(ids_N, vecs_NxD, step_rows):
                    _, _, g = rows.global_rows(mesh, padded, piece_ids, piece, d)
                    parts.append(np.asarray(step(g, t))[: len(piece_ids)])
                finished = np.concatenate(parts) if parts else np.zeros((0, d), np.float32)
                if pending is not None:
                    pending.result()  # One commit in flight: errors surface in chunk order.
                skipped = _chunk_skipped(meta, c, ids_N, reasons)
                pending = writer.submit(out.write_chunk, c, ids_N, finished, skipped)
                done += len(ids_N)
                if update is not None:
                    update(done, total)
            if pending is not None:
                pending.result()
    finally:
        close()


# ----------------------------------------------------------------------------- score


@functools.cache
def _prepare_step(normalize: bool, has_transform: bool) -> Callable:
    def prepare(q_QxD: jax.Array, t_DxD: jax.Array) -> jax.Array:
        if has_transform:
            q_QxD = q_QxD @ t_DxD.T
        return score.unit_rows(q_QxD) if normalize else q_QxD

    return jax.jit(prepare)


def _query_transform(
    fit: HessianFit, name: str
) -> tuple[jax.Array | None, Callable[[np.ndarray], np.ndarray] | None]:
    """``_transform_parts`` for the queries, checked finite and (d×d) put on the device once
    per fit: every query batch after the first pays only its matmul."""
    cache = getattr(fit, "derived", {})
    key = ("index_query_transform", name)
    if key not in cache:
        t, host = _transform_parts(fit, name)
        score.check_finite_inputs(np.zeros((1, 1)), {"query_transform": t}, ScoringIndexError)
        cache[key] = (None if t is None else jax.device_put(t), host)
    return cache[key]


def prepare_queries(
    index: ScoringIndex, query_vectors_QxD: np.ndarray, fit: HessianFit | None
) -> np.ndarray:
    """``T_q u_q`` of the queries (unit length when the index's preset normalizes), float32:
    what ``score_index`` dots with the index rows."""
    info = index.info
    q = np.asarray(query_vectors_QxD, np.float32)
    if q.ndim != 2 or q.shape[0] == 0:
        raise ScoringIndexError(f"query vectors must have shape (Q, D) with Q > 0, got {q.shape}")
    if q.shape[1] != index.dim:
        raise ScoringIndexError(
            f"the queries have d = {q.shape[1]} but the index at {index.path} has d = "
            f"{index.dim}; featurize the queries with the index's projection"
        )
    t = host = None
    if info.query_transform is not None:
        if fit is None:
            raise ScoringIndexError(
                f"the index at {index.path} is for preset {info.preset!r}, whose queries need "
                f"the Hessian fit's {info.query_transform!r}; pass the fit it was built with"
            )
        index.check(fit=fit)
        t, host = _query_transform(fit, info.query_transform)
    score.check_finite_inputs(q, {}, ScoringIndexError)
    if host is not None:  # A low-rank root, applied on the host (overflow is checked below).
        q = host(q)
    # One row would be a matrix-vector product, several times slower on XLA's CPU backend than
    # two rows (see score.top_k_scores): transform it twice, keep one.
    n = len(q)
    q = np.concatenate([q, q]) if n == 1 else q
    out = np.asarray(
        _prepare_step(info.normalize, t is not None)(
            q, np.zeros((1, 1), np.float32) if t is None else t
        )
    )[:n]
    score.check_finite_inputs(out, {}, ScoringIndexError, prepared=True)
    return out


def query_rows(index: ScoringIndex, query_vectors: Any) -> Any:
    """The ``(Q, D)`` query vectors of ``query_vectors``: an array as given, or a query store
    read whole after ``score.check_query_meta`` with the index's metadata (the source store's)
    for the index's preset."""
    if getattr(query_vectors, "meta", None) is not None and hasattr(query_vectors, "read_all"):
        score.check_query_meta(
            index.info.preset_spec, index.meta, query_vectors.meta, ("index", "query")
        )
    return score.query_array(query_vectors)


def score_index(
    index: ScoringIndex | str | os.PathLike,
    query_vectors: Any,
    k: int,
    *,
    fit: HessianFit | None = None,
    source: VectorStore | None = None,
    rows_per_step: int | None = None,
    progress: bool | Callable[[int, int | None], None] | None = None,
    mesh: Mesh | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` index rows per query: the queries prepared once (``prepare_queries``), then the
    index streamed through ``score.top_k_scores`` with no transform (one matmul per step, the
    running top-k on ``mesh``, one merge; ties to the lower example id).

    Args:
      index: a ``ScoringIndex`` or its path.
      query_vectors: ``(Q, D)`` query vectors, or a query store (read whole; its metadata must
        match the index's source store, ``store.check_compatible``).
      k: proponents kept per query.
      fit: the Hessian fit the index was built with (needed when the preset has R on the query
        side; checked by fingerprint).
      source: the candidate store, to check the index was built from it (optional: costs one
        read of each chunk's commit record).
      rows_per_step, progress, mesh: as ``score.top_k_scores``.

    Returns:
      ``(ids_QxK int64, scores_QxK float32)``, best first: ``score.score_preset``'s ranking.

    Raises:
      IndexMismatchError: the fit or source is not what the index was built from.
      ScoringIndexError / score.ScoreError: bad queries (shape, NaN/inf) or index rows.
    """
    if not isinstance(index, ScoringIndex):
        index = ScoringIndex.open(index)
    if source is not None:
        index.check(source=source)
    q_prepared = prepare_queries(index, query_rows(index, query_vectors), fit)
    return score.top_k_scores(
        index.store,
        q_prepared,
        None,
        None,
        False,
        k,
        rows_per_step=rows_per_step,
        progress=progress,
        mesh=mesh,
    )
