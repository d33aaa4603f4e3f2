"""Approximate top-k over a scoring index with faiss (optional: ``pip install 'trackstar[ann]'``).

``index.score_index`` streams every index row through one exact matmul per query batch: its cost
grows with N. An ANN index trades a little recall for far fewer dot products: ``build_ann``
reads a finished ``ScoringIndex`` once (chunk by chunk, rows kept under their example ids, so
skipped examples keep theirs) into a faiss index, and ``score_ann`` prepares queries exactly as
``score_index`` does (``index.prepare_queries``) and searches it.

Kinds (both inner product, which is cosine on the index's unit rows):
  flat  ``IndexFlatIP``: exact, every row scored (the baseline; same ranking as ``score_index``
        up to float32 rounding and ties).
  ivf   ``IndexIVFFlat``: rows grouped into ``nlist`` cells by spherical k-means (trained on a
        seeded sample of rows, so a build is reproducible); a search scores only the rows of
        the ``nprobe`` cells nearest the query. ``nprobe = nlist`` is exact; smaller is faster
        and may miss true neighbours.

``AnnIndex.save`` writes the faiss file (atomically) and a JSON record beside it naming the
scoring index it was built from (its fingerprints, preset, dtype and shape); ``AnnIndex.load``
refuses a file built from another index. faiss is imported only when one of these is called.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from trackstar import files, score
from trackstar import index as index_lib
from trackstar.index import ScoringIndex

# Version of the JSON record saved beside an ANN file; another version is rebuilt.
ANN_FORMAT = 1
KINDS = ("flat", "ivf")
# faiss warns below 39 training rows per cell (its k-means min_points_per_centroid); the default
# nlist stays under N / 39 so a small index trains without that warning.
_MIN_ROWS_PER_CELL = 39
# Default training sample: this many rows per cell (faiss itself subsamples above 256 per cell).
_TRAIN_ROWS_PER_CELL = 64

Blocks = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]


class AnnError(ValueError):
    """An ANN index that cannot be built, loaded or searched as asked; the message says the fix."""


class AnnMismatchError(AnnError):
    """An ANN file loaded against another scoring index than it was built from."""


# ----------------------------------------------------------------------------- faiss


_threads_checked = False


def _faiss() -> Any:
    """The faiss module (imported here so the library works without it), threads set once."""
    try:
        import faiss
    except ImportError:
        raise AnnError(
            "approximate top-k needs faiss, which is not installed: pip install "
            "'trackstar[ann]' (or pip install faiss-cpu)"
        ) from None
    _set_threads(faiss)
    return faiss


def _set_threads(faiss: Any) -> None:
    """Gives faiss the CPUs this process may use, unless the user chose a thread count.

    OpenMP starts at the machine's core count, which overcommits a process limited to fewer
    cores (a container, taskset). OMP_NUM_THREADS, or a count already changed from that start
    (``faiss.omp_set_num_threads`` by the user), is left alone.
    """
    global _threads_checked
    if _threads_checked:
        return
    _threads_checked = True
    if os.environ.get("OMP_NUM_THREADS"):
        return
    cores = os.cpu_count() or 1
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # Not on Linux: os.cpu_count is all we know.
        usable = cores
    if faiss.omp_get_max_threads() == cores and usable != cores:
        faiss.omp_set_num_threads(usable)


# ----------------------------------------------------------------------------- build


def default_nlist(num_rows: int) -> int:
    """IVF cells for ``num_rows`` rows: about 4·sqrt(N), at most N / 39 (faiss's minimum of
    training rows per cell), at least 1."""
    return max(1, min(round(4 * math.sqrt(num_rows)), num_rows // _MIN_ROWS_PER_CELL))


def default_nprobe(nlist: int) -> int:
    """Cells searched by default: about sqrt(nlist) (a few percent of the rows for large N).
    ``scripts/ann_benchmark.py`` measures the recall / speed trade-off for a given N."""
    return max(1, min(nlist, round(math.sqrt(nlist))))


def _sample_rows(
    blocks: Blocks, num_rows: int, n: int, dim: int, seed: int, progress: Any
) -> np.ndarray:
    """Rows at ``n`` seeded positions of the stream (positions, not ids: skipped ids do not
    matter), gathered in one pass so only the sample is held."""
    rng = np.random.default_rng([seed, num_rows])
    picks = np.sort(rng.choice(num_rows, size=n, replace=False)) if n < num_rows else None
    out = np.empty((n, dim), np.float32)
    for pos, _, x in _counted(blocks, num_rows, "ann sample", progress):
        m = len(x)
        if picks is None:
            out[pos : pos + m] = x
        else:
            lo, hi = np.searchsorted(picks, [pos, pos + m])
            out[lo:hi] = x[picks[lo:hi] - pos]
    return out


def _counted(
    blocks: Blocks, num_rows: int, desc: str, progress: Any
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """``(rows before this block, ids, rows)`` of a fresh ``blocks()`` pass, with a progress
    bar; a stream that does not hold ``num_rows`` rows raises ``AnnError`` at its end."""
    pos = 0
    update, close = score.progress_bar(progress, num_rows, desc=desc)
    try:
        for ids, x in blocks():
            yield pos, ids, x
            pos += len(x)
            if update is not None:
                update(pos, num_rows)
    finally:
        close()
    if pos != num_rows:
        raise AnnError(f"the rows stream held {pos} rows, expected {num_rows}")


def build_faiss(
    blocks: Blocks,
    num_rows: int,
    dim: int,
    kind: str = "ivf",
    *,
    nlist: int | None = None,
    train_rows: int | None = None,
    seed: int = 0,
    progress: Any = True,
) -> Any:
    """A faiss inner-product index of the rows ``blocks()`` yields, under their ids.

    The one builder behind ``build_ann`` (rows from a scoring index) and the benchmark (rows
    generated block by block): rows are added block by block, so only the index itself, one
    block and (IVF) the training sample are held.

    Args:
      blocks: a callable returning a fresh iterator of ``(ids_N int, rows_NxD)`` blocks (called
        twice for "ivf": once for the training sample, once to add the rows).
      num_rows, dim: the rows the stream holds and their length.
      kind: "flat" (exact) or "ivf".
      nlist: IVF cells (default ``default_nlist(num_rows)``).
      train_rows: rows sampled to train the IVF k-means (default 64 per cell, at most N).
      seed: the training sample's and k-means' seed (same seed and rows: same index).
      progress: True for tqdm bars, or a callback ``(rows_done, total)``.
    """
    faiss = _faiss()
    if kind not in KINDS:
        raise AnnError(f"ANN kind must be one of {KINDS}, got {kind!r}")
    if num_rows <= 0:
        raise AnnError("cannot build an ANN index of an empty index")
    if kind == "flat":
        # IndexFlatIP stores rows by position; the id map keeps each row's example id.
        ann = faiss.IndexIDMap(faiss.IndexFlatIP(dim))
    else:
        nlist = default_nlist(num_rows) if nlist is None else int(nlist)
        if not 1 <= nlist <= num_rows:
            raise AnnError(f"nlist must lie in [1, {num_rows}] (the rows indexed), got {nlist}")
        n_train = train_rows if train_rows is not None else _TRAIN_ROWS_PER_CELL * nlist
        n_train = min(num_rows, max(int(n_train), nlist))
        sample = _sample_rows(blocks, num_rows, n_train, dim, seed, progress)
        ann = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        ann.cp.seed = seed
        # Unit centroids: a row's nearest centroid by inner product is then its nearest by
        # cosine, which is what the rows are compared by.
        ann.cp.spherical = True
        ann.train(sample)
        del sample
    for _, ids, x in _counted(blocks, num_rows, "ann add", progress):
        x = np.ascontiguousarray(x, dtype=np.float32)  # bfloat16 rows, if any, as float32
        if x.ndim != 2 or x.shape[1] != dim:
            raise AnnError(f"rows must have shape (N, {dim}), got {x.shape}")
        ann.add_with_ids(x, np.ascontiguousarray(ids, dtype=np.int64))
    return ann


def _identity(index: ScoringIndex, rows: bool = True) -> dict:
    """What an ANN file must be searched with: the scoring index's record fields, its shape and
    (``rows``) the fingerprint of its own rows (reads each chunk's commit record only)."""
    info = index.info
    out = {
        "store_fingerprint": info.store_fingerprint,
        "fit_fingerprint": info.fit_fingerprint,
        "preset": info.preset,
        "spec": info.spec,
        "dtype": info.dtype,
        "num_rows": index.num_rows,
        "dim": index.dim,
    }
    if rows:
        out["index_fingerprint"] = index_lib.store_fingerprint(index.store)
    return out


def _diffs(want: dict, got: dict) -> list[str]:
    return [
        f"{name}: the ANN file was built from {want.get(name)!r}, this index has {got[name]!r}"
        for name in got
        if want.get(name) != got[name]
    ]


@dataclasses.dataclass
class AnnIndex:
    """A faiss index of a scoring index's rows (``build_ann``, ``AnnIndex.load``).

    faiss_index: the faiss index (``IndexIDMap(IndexFlatIP)`` or ``IndexIVFFlat``).
    kind: "flat" or "ivf". nlist: IVF cells (None for flat).
    nprobe: cells a search scans by default (None for flat).
    identity: the scoring index it was built from (``_identity``).
    source_index: that index's path (for messages).
    """

    faiss_index: Any
    kind: str
    nlist: int | None
    nprobe: int | None
    identity: dict
    source_index: str

    @property
    def num_rows(self) -> int:
        """Rows indexed."""
        return int(self.faiss_index.ntotal)

    @property
    def dim(self) -> int:
        """Vector length d."""
        return int(self.faiss_index.d)

    def search(
        self, queries_QxD: np.ndarray, k: int, nprobe: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` rows per prepared query (``index.prepare_queries``) by inner product.

        Args:
          queries_QxD: prepared queries (float32 or castable).
          k: rows kept per query (fewer when the index holds fewer rows).
          nprobe: IVF cells scanned (default ``self.nprobe``; ``nlist`` is exact).

        Returns:
          ``(ids_QxK int64, scores_QxK float32)``, best first. An IVF search whose scanned
          cells hold fewer than k rows pads with id -1 and score -inf.
        """
        faiss = _faiss()
        q = np.ascontiguousarray(queries_QxD, dtype=np.float32)
        if q.ndim != 2 or q.shape[0] == 0 or q.shape[1] != self.dim:
            raise AnnError(f"queries must have shape (Q, {self.dim}) with Q > 0, got {q.shape}")
        if not np.isfinite(q).all():
            raise AnnError("the queries hold NaN/inf; prepare them with index.prepare_queries")
        if not isinstance(k, int | np.integer) or k <= 0:
            raise AnnError(f"k must be a positive integer, got {k!r}")
        k = min(int(k), self.num_rows)
        if self.kind == "ivf":
            probe = self.nprobe if nprobe is None else int(nprobe)
            if not 1 <= probe <= self.nlist:
                raise AnnError(f"nprobe must lie in [1, nlist = {self.nlist}], got {probe}")
            # Per-call parameters: the index is not mutated, so concurrent searches are safe.
            params = faiss.SearchParametersIVF(nprobe=probe)
            scores, ids = self.faiss_index.search(q, k, params=params)
        else:
            scores, ids = self.faiss_index.search(q, k)
        ids = ids.astype(np.int64, copy=False)
        scores = scores.astype(np.float32, copy=False)
        scores[ids < 0] = -np.inf  # faiss marks a missing result with -FLT_MAX
        return ids, scores

    def save(self, path: str | os.PathLike) -> None:
        """Writes the faiss index to ``path`` and its record to ``path + ".json"``, each
        atomically (the record last: it names the faiss file's size, so a save interrupted
        between the two is refused by ``load``)."""
        faiss = _faiss()
        path = os.fspath(path)

        def write(f: Any) -> None:
            # Streams the index into the open temporary file (no in-memory copy of it).
            writer = faiss.PyCallbackIOWriter(f.write)
            faiss.write_index(self.faiss_index, writer)
            del writer  # Flushes its buffer into f before atomic_write syncs it.

        files.atomic_write(path, write, binary=True)
        record = {
            "format": ANN_FORMAT,
            "kind": self.kind,
            "nlist": self.nlist,
            "nprobe": self.nprobe,
            "metric": "inner_product",
            "num_rows": self.num_rows,
            "faiss_bytes": os.path.getsize(path),
            "faiss_version": faiss.__version__,
            "source_index": self.source_index,
            "index": self.identity,
        }
        files.write_json(_record_path(path), record)

    @classmethod
    def load(cls, path: str | os.PathLike, index: ScoringIndex) -> AnnIndex:
        """Reads an ANN file saved by ``save``, checked against the scoring index ``index``.

        Raises:
          AnnError: no ANN file at ``path``, or one of another format or damaged.
          AnnMismatchError: the file was built from another scoring index (names each
            difference; rebuild it with ``build_ann``).
        """
        faiss = _faiss()
        path = os.fspath(path)
        fix = "rebuild it: build_ann(index, ...).save(path)"
        try:
            with open(_record_path(path)) as f:
                record = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise AnnError(f"no readable ANN record at {_record_path(path)} ({e}); {fix}") from None
        if not isinstance(record, dict) or record.get("format") != ANN_FORMAT:
            got = record.get("format") if isinstance(record, dict) else None
            raise AnnError(f"{path} is an ANN file of format {got!r}, not {ANN_FORMAT}; {fix}")
        diffs = _diffs(record.get("index", {}), _identity(index))
        if diffs:
            raise AnnMismatchError(
                f"the ANN file at {path} was built from another scoring index than "
                f"{index.path}:\n  " + "\n  ".join(diffs) + f"\nRebuild it from this index "
                "(build_ann(index, ...).save(path)), or load it with the index it was built from "
                f"({record.get('source_index')})"
            )
        size = os.path.getsize(path) if os.path.exists(path) else None
        if size != record.get("faiss_bytes"):
            raise AnnError(
                f"the faiss file at {path} has {size} bytes, its record says "
                f"{record.get('faiss_bytes')} (an interrupted save?); {fix}"
            )
        ann = faiss.read_index(path)
        if ann.ntotal != index.num_rows or ann.d != index.dim:
            raise AnnError(
                f"the faiss file at {path} holds {ann.ntotal} rows of d = {ann.d}, the index "
                f"{index.num_rows} of d = {index.dim}; {fix}"
            )
        return cls(
            faiss_index=ann,
            kind=record["kind"],
            nlist=record["nlist"],
            nprobe=record["nprobe"],
            identity=record["index"],
            source_index=index.path,
        )


def _record_path(path: str) -> str:
    return path + ".json"


def build_ann(
    index: ScoringIndex,
    kind: str = "ivf",
    *,
    nlist: int | None = None,
    nprobe: int | None = None,
    train_rows: int | None = None,
    seed: int = 0,
    progress: Any = True,
) -> AnnIndex:
    """An ANN index of the scoring index ``index``'s finished rows (see the module docstring).

    Rows are streamed from the index store chunk by chunk (twice for "ivf": the training sample,
    then the rows), cast to float32 and added under their example ids.

    Args:
      index: a finished ``ScoringIndex``.
      kind: "flat" (exact ``IndexFlatIP``) or "ivf" (``IndexIVFFlat``).
      nlist: IVF cells (default ``default_nlist``: about 4·sqrt(N)).
      nprobe: cells a search scans by default (default ``default_nprobe(nlist)``).
      train_rows: rows sampled (seeded) to train the k-means (default 64 per cell, at most N).
      seed: the sample's and k-means' seed: the same index and seed build the same ANN index.
      progress: True for tqdm bars, or a callback ``(rows_done, total)``.

    Raises:
      AnnError: faiss missing (names the install), an unknown kind, or nlist out of range.
    """
    if kind == "ivf":
        # Checked before the build, which is the slow part.
        nlist = default_nlist(index.num_rows) if nlist is None else int(nlist)
        nprobe = default_nprobe(nlist) if nprobe is None else int(nprobe)
        if not 1 <= nprobe <= nlist:
            raise AnnError(f"nprobe must lie in [1, nlist = {nlist}], got {nprobe}")
    else:
        nlist = nprobe = None
    ann = build_faiss(
        lambda: index.store.iter_chunks(),
        index.num_rows,
        index.dim,
        kind,
        nlist=nlist,
        train_rows=train_rows,
        seed=seed,
        progress=progress,
    )
    return AnnIndex(ann, kind, nlist, nprobe, _identity(index), index.path)


def score_ann(
    ann: AnnIndex,
    index: ScoringIndex,
    query_vectors: Any,
    k: int,
    *,
    fit: Any = None,
    nprobe: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Approximate ``index.score_index``: the queries prepared as it does
    (``index.prepare_queries``: the preset's query transform, unit length), then ``ann``
    searched.

    Args:
      ann: an ANN index of ``index`` (``build_ann`` or ``AnnIndex.load``).
      index: the scoring index (its preset and fit prepare the queries).
      query_vectors: ``(Q, D)`` raw query vectors, or a query store (read whole).
      k: rows kept per query.
      fit: the Hessian fit the index was built with (when its preset has R on the query side).
      nprobe: IVF cells scanned (default ``ann.nprobe``).

    Returns:
      ``(ids_QxK int64, scores_QxK float32)`` best first, as ``score_index`` (see ``search``).

    Raises:
      AnnMismatchError: ``ann`` was built from another scoring index.
      ScoringIndexError: bad queries or a missing / mismatched fit (as ``score_index``).
    """
    # The cheap part of the identity (no chunk records read): what ``load`` checks in full.
    diffs = _diffs(ann.identity, _identity(index, rows=False))
    if diffs:
        raise AnnMismatchError(
            f"this ANN index was built from {ann.source_index}, not from {index.path}:\n  "
            + "\n  ".join(diffs)
            + "\nRebuild it from this index with build_ann"
        )
    q = index_lib.query_rows(index, query_vectors)
    return ann.search(index_lib.prepare_queries(index, q, fit), k, nprobe=nprobe)
