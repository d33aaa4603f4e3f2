"""Vector store: projected, optimizer-corrected per-example vectors on disk.

Vectors are stored *before* R and before normalization, so the Hessian mix and the scoring
preset can change without recomputing gradients.

Layout of a store directory::

    meta.json                    StoreMeta, written once at create (never rewritten)
    chunks/00000000/             chunk 0: examples [0, chunk_size)
        vectors/                 zarr3 array (rows, dim), float32 or bfloat16, one zarr chunk
        ids/                     zarr3 array (rows,), int64 example positions, ascending
        chunk.json               rows, dtype, the chunk's skipped examples, and the size and
                                 CRC-32 of each data file (vectors/c/0/0, ids/c/0)
    chunks/.tmp-00000003-.../    a chunk being written (ignored by readers)
    complete.json                written last by finalize(): row count and all skipped examples

Example ids are example *positions* 0..num_examples-1 in the sequence that was featurized
(map them back to world ids through that sequence). Chunk c accounts for every position in
[c*chunk_size, (c+1)*chunk_size): each is either a row or a skipped entry, so finalize() can
prove that no example was lost and none was written twice.

Integrity: every read of a chunk's data (read_chunk, iter_chunks, read_all, read_ids, and
finalize, which reads the whole store once) checks that each data file exists, has the size
chunk.json records and the same CRC-32, and raises CorruptStoreError naming the store, the chunk
and the fix otherwise. The arrays are written with ``store_data_equal_to_fill_value`` so a chunk
with rows always has its data files: a missing file is damage, never an all-zero chunk that
tensorstore elided. CRC-32 (zlib) because it is the fastest stdlib checksum measured
(scripts/store_read_benchmark.py --checksums, 64 MiB buffer, 2 shared cores, two runs, MiB/s):
crc32 3,700-4,000, adler32 2,700-3,400, sha1 1,300-1,800, sha256 1,200-1,700, blake2b 670-900,
md5 630-730; a memcpy runs at 8,700-9,300. It detects accidental damage (flipped bytes, torn or
truncated writes, a file swapped in from another chunk), which is the threat here; it is not a
defense against deliberate tampering.

Atomic commit: a chunk is written under a temporary name and renamed (``os.replace``) to its
final name once its arrays and ``chunk.json`` are on disk, so a killed writer leaves only a
temporary, never a chunk that looks finished. Chunk c's temporaries are removed by the next
writer of chunk c and by finalize(). Writers of disjoint chunk sets (process p writes chunks
with ``c % n == p``, see ``chunks_for_process``) need no coordination; one process then calls
finalize(). Renaming a directory is atomic on local POSIX filesystems, which is what this
layout assumes.

Why raw tensorstore arrays rather than one Orbax checkpoint per chunk: measured with
scripts/store_read_benchmark.py, 65,536 rows x 4,096 float32 (1 GiB) in 16 chunks of 4,096 rows,
local disk, 2 CPU cores shared with other jobs (load average 7-9, so single figures vary up to
2x between runs; the ranges are over 3-5 runs, page cache dropped or warm; the read order held
in every run). MiB/s:

    method                                         write      read
    np.tofile / np.fromfile (the floor)          100-279   519-1386
    tensorstore zarr3, one array per chunk        113-285    244-518
    VectorStore (zarr3 + checks + atomic commit)   70-189   578-1402  (fromfile read path)
    VectorStore, reading through tensorstore          -      371-695
    orbax PyTreeCheckpointer save/restore           64-99    138-188

The CRC-32 checks (schema 2) cost, measured the same way at 16,384 rows (256 MiB, page cache
warm, the previous and this module run back to back, two runs each): iter_chunks with prefetch
1,010-1,023 MiB/s (1,728-2,139 without checks), write_chunk 102-119 MiB/s (149-156; each file is
read back and checksummed before the commit). Scoring hides most of it: at d = 4,096 the checks
add about 10 ms to a 0.87 s streamed scoring pass over 32 MiB, and run in the prefetch thread
(zlib releases the GIL).

Reads decide (scoring streams the whole train store for every query block): the VectorStore
reads 3-7x faster than Orbax restores, and writes about as fast or faster. Orbax's
PyTreeCheckpointer runs on the same tensorstore driver but adds its own metadata and commit
protocol to every save and restore, which buys nothing here: a chunk is two fixed arrays, and
this module needs its own commit record and coverage check anyway (Orbax's directory-level
commit does not know which example positions a chunk covers). The arrays stay ordinary zarr3,
so any tensorstore or zarr reader can open them; this module reads the single uncompressed zarr
chunk of each array with np.fromfile (about half the cost of reading through tensorstore) and
checksums the bytes it read.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import re
import shutil
import socket
import threading
import uuid
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import ml_dtypes
import numpy as np
import tensorstore as ts

from trackstar import correction as _correction
from trackstar.files import write_json

try:
    from trackstar import __version__
except ImportError:  # An editable install that resolves `trackstar` as a namespace package.
    from importlib.metadata import version as _dist_version

    __version__ = _dist_version("trackstar")

# 2: chunk.json records each data file's size and CRC-32; StoreMeta.correction_settings.
SCHEMA_VERSION = 2
KINDS = ("train", "query")
DTYPES = ("float32", "bfloat16")
# The registered corrections' labels (trackstar.correction.CORRECTIONS) and "none".
CORRECTIONS = (*_correction.CORRECTIONS, "none")

_META = "meta.json"
_COMPLETE = "complete.json"
_CHUNKS = "chunks"
_CHUNK_INFO = "chunk.json"
_CHUNK_RE = re.compile(r"^\d{8}$")
_TMP_PREFIX = ".tmp-"
_NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
# The data file of each array, relative to the chunk directory: the zarr3 key of the array's one
# chunk under the default chunk key encoding.
_DATA_FILES = {
    "vectors": os.path.join("vectors", "c", "0", "0"),
    "ids": os.path.join("ids", "c", "0"),
}


class StoreError(ValueError):
    """A store that cannot be used as asked; the message says what to do instead."""


class StoreMismatchError(StoreError):
    """Two stores (or a store and its requested metadata) disagree on fields that must match."""


class IncompleteStoreError(StoreError):
    """A store whose featurize run has not finished (missing chunks or no finalize)."""


class SchemaVersionError(StoreError):
    """A store written by another version of the on-disk format."""


class NonFiniteVectorError(StoreError):
    """Rows with NaN or inf values; nothing was committed."""


class CorruptStoreError(StoreError):
    """A committed chunk whose files are missing, short, or differ from their recorded checksums."""


@dataclasses.dataclass(frozen=True)
class StoreMeta:
    """What a store holds and how its vectors were made (``meta.json``).

    ``skipped`` lists examples known to be skipped at create time; examples skipped while
    writing are passed to ``write_chunk`` and merged in by ``finalize``; ``VectorStore.meta`` of
    a finished store returns the merged list. ``correction_settings`` records the effective
    optimizer-correction settings (optimizer, b2, eps, step count, V floor, ...) the vectors
    were corrected with.
    """

    kind: str  # "train" or "query".
    dim: int  # Vector length d.
    dtype: str  # Row dtype on disk: "float32" or "bfloat16".
    num_examples: int  # Example positions covered: rows + skipped.
    chunk_size: int  # Example positions per chunk.
    model_fingerprint: str
    optimizer_fingerprint: str
    projection: dict  # mode, seed, k_in, k_out, dim, structure_hash.
    # losses.TRAIN_OUTPUT_FN ("train") for training examples; "loss", "margin", "logit" for
    # queries (trackstar.losses; "train" is the "loss" quantity under its stored name).
    output_fn: str
    correction: str  # "adam", "adafactor" or "none".
    # The effective optimizer-correction settings the vectors were made with, as read from the
    # checkpoint and config (e.g. {"optimizer": "adamw", "b2": 0.98, "eps": 1e-8, "count": 1500,
    # "v_floor": ...}); empty when unknown or for correction="none". Part of what makes two
    # stores' vectors comparable: a resume with other settings and check_compatible both refuse.
    correction_settings: dict = dataclasses.field(default_factory=dict)
    created_by: str = __version__
    skipped: list = dataclasses.field(default_factory=list)  # [{"id": int, "reason": str}]
    extra: dict = dataclasses.field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    @property
    def num_chunks(self) -> int:
        """Number of chunks that cover ``num_examples`` positions."""
        return -(-self.num_examples // self.chunk_size)

    def chunk_range(self, chunk: int) -> tuple[int, int]:
        """Example positions ``[lo, hi)`` that chunk ``chunk`` accounts for."""
        lo = chunk * self.chunk_size
        return lo, min(lo + self.chunk_size, self.num_examples)

    def validate(self) -> None:
        """Raises ``StoreError`` naming the first field with an unusable value."""
        if self.schema_version != SCHEMA_VERSION:
            raise SchemaVersionError(
                f"schema_version {self.schema_version} is not this library's {SCHEMA_VERSION}"
            )
        checks = [
            (self.kind in KINDS, f"kind must be one of {KINDS}, got {self.kind!r}"),
            (self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}"),
            (
                self.correction in CORRECTIONS,
                f"correction must be one of {CORRECTIONS}, got {self.correction!r}",
            ),
            (_is_int(self.dim) and self.dim > 0, f"dim must be a positive int, got {self.dim!r}"),
            (
                _is_int(self.num_examples) and self.num_examples >= 0,
                f"num_examples must be an int >= 0, got {self.num_examples!r}",
            ),
            (
                _is_int(self.chunk_size) and self.chunk_size > 0,
                f"chunk_size must be a positive int, got {self.chunk_size!r}",
            ),
            (isinstance(self.projection, dict), "projection must be a dict"),
            (isinstance(self.correction_settings, dict), "correction_settings must be a dict"),
            (isinstance(self.extra, dict), "extra must be a dict"),
        ]
        for ok, message in checks:
            if not ok:
                raise StoreError(f"bad StoreMeta: {message}")
        _check_skipped(self.skipped, 0, self.num_examples, "StoreMeta.skipped")

    def to_dict(self) -> dict:
        """A JSON-ready dict (round-trips through ``from_dict``)."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=_json_default))

    @classmethod
    def from_dict(cls, d: dict, where: str = "meta") -> StoreMeta:
        """Builds a ``StoreMeta``; other schema versions and unknown fields are refused."""
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise SchemaVersionError(
                f"{where} uses store schema version {version}, but this trackstar "
                f"({__version__}) reads version {SCHEMA_VERSION}. Rerun featurize with this "
                "version into a new store path, or read it with the trackstar version that "
                f"wrote it (created_by={d.get('created_by')!r})."
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise StoreError(
                f"{where} has unknown fields {unknown}; was it written by this schema?"
            )
        return cls(**d)


def _json_default(x: Any) -> Any:
    if isinstance(x, np.integer | np.floating | np.bool_):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"{type(x).__name__} is not JSON serializable (in store metadata)")


def _is_int(x: Any) -> bool:
    return isinstance(x, int | np.integer) and not isinstance(x, bool)


def _check_skipped(skipped: Any, lo: int, hi: int, where: str) -> list[int]:
    if not isinstance(skipped, list | tuple):
        raise StoreError(f"{where} must be a list of {{'id', 'reason'}} dicts")
    ids = []
    for s in skipped:
        if not isinstance(s, dict) or set(s) != {"id", "reason"} or not _is_int(s["id"]):
            raise StoreError(f"{where} entries must be {{'id': int, 'reason': str}}, got {s!r}")
        if not lo <= s["id"] < hi:
            raise StoreError(f"{where} id {s['id']} is outside the positions [{lo}, {hi})")
        ids.append(int(s["id"]))
    if len(set(ids)) != len(ids):
        raise StoreError(f"{where} lists an id more than once: {sorted(ids)}")
    return ids


def _diff_fields(a: dict, b: dict, fields: Sequence[str], names: tuple[str, str]) -> list[str]:
    out = []
    for f in fields:
        va, vb = a.get(f), b.get(f)
        if isinstance(va, dict) and isinstance(vb, dict):
            for k in sorted(set(va) | set(vb)):
                if va.get(k) != vb.get(k):
                    out.append(f"{f}.{k}: {names[0]}={va.get(k)!r}, {names[1]}={vb.get(k)!r}")
        elif va != vb:
            out.append(f"{f}: {names[0]}={va!r}, {names[1]}={vb!r}")
    return out


# What must agree for two stores' vectors to live in one space (projection includes its seed,
# widths and factors_hash; correction_settings the optimizer state's b2, eps, step count, ...).
_COMPATIBLE_FIELDS = (
    "model_fingerprint",
    "optimizer_fingerprint",
    "projection",
    "correction",
    "correction_settings",
    "dim",
)


def check_compatible(
    reference: StoreMeta,
    other: StoreMeta,
    names: tuple[str, str] = ("train", "query"),
    same_output_fn: bool = False,
) -> None:
    """The compatibility check every store passes before it enters R, scoring or tail-patch.

    Refuses ``other`` unless it was featurized like ``reference``: same model and optimizer
    fingerprints, every projection field (seed, widths, factors_hash, ...), correction,
    correction_settings and dim; and the same output_fn when ``same_output_fn`` (e.g. two train
    stores meant to be mixed into one R). ``kind``, ``dtype`` and, by default, ``output_fn`` may
    differ: queries use their own output function, and bfloat16 rows score against float32.

    Args:
      reference: the store the others must match (usually the train store).
      other: the store to check.
      names: how the message names ``reference`` and ``other`` (e.g. a role or a path).
      same_output_fn: also require equal ``output_fn``.

    Raises:
      StoreMismatchError: listing every differing field with both values, and the fix.
    """
    fields = _COMPATIBLE_FIELDS + (("output_fn",) if same_output_fn else ())
    diffs = _diff_fields(reference.to_dict(), other.to_dict(), fields, names)
    if diffs:
        raise StoreMismatchError(
            f"the {names[0]} and {names[1]} stores were not featurized the same way, so their "
            "vectors do not belong together:\n  " + "\n  ".join(diffs) + "\nFeaturize both "
            "from the same checkpoint with the same featurize config (projection, correction"
            + (", output function" if same_output_fn else "")
            + "), each into a new store path."
        )


def _write_json(path: str, obj: Any) -> None:
    write_json(path, obj, sort_keys=True)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _zarr_spec(path: str, shape: tuple[int, ...] | None = None, dtype: str | None = None) -> dict:
    spec: dict[str, Any] = {"driver": "zarr3", "kvstore": {"driver": "file", "path": path}}
    if shape is not None:
        # Always write the data file, even for an all-zero chunk: otherwise tensorstore elides
        # it, and a deleted file would be indistinguishable from a chunk of zeros.
        spec["store_data_equal_to_fill_value"] = True
        # One zarr chunk per store chunk, raw little-endian bytes: projected vectors do not
        # compress, and a single uncompressed chunk reads at memcpy speed.
        spec["metadata"] = {
            "shape": list(shape),
            "data_type": dtype,
            "chunk_grid": {
                "name": "regular",
                "configuration": {"chunk_shape": [max(s, 1) for s in shape]},
            },
            "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
        }
    return spec


def _chunk_name(chunk: int) -> str:
    return f"{chunk:08d}"


def _read_json(path: str, fix: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise CorruptStoreError(f"{path} is not valid JSON ({e}). {fix}.") from e


def _crc32(data: np.ndarray) -> int:
    """CRC-32 of a C-contiguous array's bytes (hashed through a zero-copy uint8 view, so the
    result depends on the bytes only, never on how a dtype exports its buffer)."""
    return zlib.crc32(data.reshape(-1).view(np.uint8))


def _read_raw(path: str, dtype: np.dtype, mapped: bool = False) -> np.ndarray:
    """A whole data file as a flat array: one read and one copy, or (``mapped``) a private
    copy-on-write memory map of the file (no copy; pages load on first touch, writes to the
    array never reach the file). A short tail is dropped."""
    if mapped:
        return np.memmap(path, dtype=dtype, mode="c").view(np.ndarray)
    return np.fromfile(path, dtype=dtype)


# CRC-32s verified in this process, by (data file, inode, size, mtime, recorded CRC): a store
# opened with verify="once" skips the check for a file whose identity and record are unchanged.
_VERIFIED: set[tuple] = set()
# VectorStore.open(verify=...): check every read, or each data file once per process.
VERIFY_MODES = ("always", "once")


def _file_record(chunk_dir: str, name: str, data: np.ndarray, chunk: int) -> dict:
    """``{"path", "nbytes", "crc32"}`` of data file ``name`` as written under ``chunk_dir``.

    The checksum is of the bytes read back from disk, and they must equal ``data``'s
    little-endian bytes, so a chunk is never committed with a checksum that blesses bytes
    other than the rows it was given.
    """
    expected = np.ascontiguousarray(data, dtype=data.dtype.newbyteorder("<"))
    record = {"path": _DATA_FILES[name], "nbytes": expected.nbytes, "crc32": _crc32(expected)}
    if expected.nbytes:
        path = os.path.join(chunk_dir, _DATA_FILES[name])
        written = _read_raw(path, expected.dtype) if os.path.exists(path) else expected[:0]
        if written.nbytes != expected.nbytes or _crc32(written) != record["crc32"]:
            raise StoreError(
                f"chunk {chunk}: the {name} file tensorstore wrote ({path}, {written.nbytes} "
                f"bytes) is not the {expected.nbytes} raw little-endian bytes of the rows given, "
                "so this store's layout assumption does not hold for this tensorstore version; "
                "nothing was committed. Pin the tensorstore version the store was developed with."
            )
    return record


class VectorStore:
    """A chunked, resumable on-disk store of per-example vectors; see the module docstring.

    Build with ``VectorStore.create`` (writers) or ``VectorStore.open`` (readers).
    """

    def __init__(self, path: str, meta: StoreMeta, complete: dict | None) -> None:
        self.path = os.fspath(path)
        self._meta = meta
        self._complete = complete
        self._context = ts.Context()
        self._verify_once = False
        self._mapped = False
        # Mapped reads: (data file, identity) -> its map, kept so that a store scored many
        # times maps and page-faults each file once per process, not once per pass.
        self._maps: dict[tuple, np.ndarray] = {}

    # ----- construction -------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike, meta: StoreMeta) -> VectorStore:
        """Creates a store at ``path``, or opens the one there for resume if its meta is equal.

        Raises:
          StoreMismatchError: ``path`` holds a store made with different metadata.
          StoreError: ``path`` exists and is not a store, or ``meta`` is invalid.
        """
        path = os.fspath(path)
        meta.validate()
        meta_path = os.path.join(path, _META)
        if not os.path.exists(meta_path):
            # Entries a concurrent create() of the same store may have made already.
            foreign = [
                n
                for n in (os.listdir(path) if os.path.isdir(path) else [])
                if n != _CHUNKS and not n.startswith(_META + ".tmp-")
            ]
            if foreign:
                raise StoreError(
                    f"{path} exists, holds {sorted(foreign)[:5]} and no {_META}, so it is not a "
                    "vector store; choose another path or delete it"
                )
            os.makedirs(path, exist_ok=True)
            tmp = f"{meta_path}.tmp-{uuid.uuid4().hex}"
            _write_json(tmp, meta.to_dict())
            try:
                # link() fails if meta.json exists: of several processes creating the store at
                # once, exactly one defines it and the others compare against it below.
                os.link(tmp, meta_path)
            except FileExistsError:
                pass
            finally:
                os.remove(tmp)
        os.makedirs(os.path.join(path, _CHUNKS), exist_ok=True)
        store = cls._load(path)
        diffs = _diff_fields(
            store._raw_meta.to_dict(),
            meta.to_dict(),
            [f.name for f in dataclasses.fields(StoreMeta)],
            ("existing", "requested"),
        )
        if diffs:
            raise StoreMismatchError(
                f"the store at {path} was created with different metadata:\n  "
                + "\n  ".join(diffs)
                + f"\nWrite to a new store path, or delete {path} to start this store over."
            )
        return store

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        require_complete: bool = True,
        *,
        verify: str = "always",
        mapped: bool = False,
    ) -> VectorStore:
        """Opens an existing store for reading.

        Args:
          path: the store directory.
          require_complete: refuse a store that was never finalized.
          verify: "always" checks each data file's CRC-32 on every read; "once" checks a file
            on its first read in this process and skips the check while the file's inode,
            size and mtime are unchanged (for stores read many times, e.g. a scoring index;
            damage to the bytes after that first read goes unnoticed until the next process).
          mapped: chunks are private copy-on-write memory maps of their files instead of
            copies (no read copy; the OS page cache serves repeated reads), each file mapped
            once and the same array returned by every later read of it (treat them as
            read-only). For stores that are never rewritten while open: a file truncated under
            a live map faults the process.

        Raises:
          IncompleteStoreError: ``require_complete`` and the store was never finalized.
          SchemaVersionError: the store uses another on-disk schema version.
          StoreError: ``verify`` is not one of ``VERIFY_MODES``.
        """
        path = os.fspath(path)
        if verify not in VERIFY_MODES:
            raise StoreError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
        if not os.path.exists(os.path.join(path, _META)):
            raise StoreError(f"no vector store at {path} (no {_META}); run featurize to make one")
        store = cls._load(path)
        store._verify_once = verify == "once"
        store._mapped = bool(mapped)
        if require_complete and store._complete is None:
            missing = store.missing_chunks()
            raise IncompleteStoreError(
                f"the store at {path} is incomplete ({len(missing)} of {store.num_chunks} chunks "
                "missing, or never finalized): its featurize run was interrupted. Rerun the same "
                "featurize command; it resumes and writes only the missing chunks."
            )
        return store

    @classmethod
    def _load(cls, path: str) -> VectorStore:
        meta_path = os.path.join(path, _META)
        meta = StoreMeta.from_dict(
            _read_json(meta_path, f"Delete {path} and rerun featurize into it"), where=meta_path
        )
        meta.validate()
        complete = None
        complete_path = os.path.join(path, _COMPLETE)
        if os.path.exists(complete_path):
            complete = _read_json(
                complete_path,
                f"Delete {complete_path} and rerun the same featurize command; it finalizes "
                "the store again",
            )
        store = cls(path, meta, complete)
        committed = store._scan()  # Refuses final-named chunk directories without a commit record.
        if complete is not None and set(range(meta.num_chunks)) - set(committed):
            # A chunk directory was deleted after finalize (the fix for a corrupt chunk): the
            # store is incomplete again, so featurize resumes it and finalize runs again.
            store._complete = None
        return store

    # ----- metadata -----------------------------------------------------------------------

    @property
    def _raw_meta(self) -> StoreMeta:
        return self._meta

    @property
    def meta(self) -> StoreMeta:
        """The store's metadata; for a finished store, ``skipped`` lists every skipped example."""
        if self._complete is None:
            return self._meta
        return dataclasses.replace(self._meta, skipped=list(self._complete["skipped"]))

    @property
    def dim(self) -> int:
        """Vector length d."""
        return self._meta.dim

    @property
    def num_chunks(self) -> int:
        """Chunks the finished store holds."""
        return self._meta.num_chunks

    @property
    def is_complete(self) -> bool:
        """Whether finalize() has succeeded."""
        return self._complete is not None

    @property
    def num_rows(self) -> int:
        """Rows stored (examples minus skipped); counts committed chunks if not finished."""
        if self._complete is not None:
            return int(self._complete["num_rows"])
        return sum(self._chunk_info(c)["rows"] for c in self.committed_chunks())

    def _chunks_dir(self) -> str:
        return os.path.join(self.path, _CHUNKS)

    def _scan(self) -> list[int]:
        committed = []
        chunks_dir = self._chunks_dir()
        names = os.listdir(chunks_dir) if os.path.isdir(chunks_dir) else []
        for name in names:
            if not _CHUNK_RE.match(name):
                continue
            if not os.path.exists(os.path.join(chunks_dir, name, _CHUNK_INFO)):
                raise CorruptStoreError(
                    f"chunk directory {os.path.join(chunks_dir, name)} has no {_CHUNK_INFO}: it "
                    "is partially written (not by this store's atomic writer, e.g. an "
                    "interrupted copy). Delete that directory and rerun featurize, which "
                    "rewrites missing chunks only."
                )
            committed.append(int(name))
        return sorted(committed)

    def committed_chunks(self) -> list[int]:
        """Indices of chunks that are fully written, ascending."""
        return self._scan()

    def missing_chunks(self) -> list[int]:
        """Indices of chunks still to write, ascending."""
        done = set(self._scan())
        return [c for c in range(self.num_chunks) if c not in done]

    def chunks_for_process(self, process_index: int, process_count: int) -> list[int]:
        """Missing chunks that process ``process_index`` of ``process_count`` should write."""
        if not 0 <= process_index < process_count:
            raise StoreError(f"process_index {process_index} not in [0, {process_count})")
        return [c for c in self.missing_chunks() if c % process_count == process_index]

    def _chunk_dir(self, chunk: int) -> str:
        return os.path.join(self._chunks_dir(), _chunk_name(chunk))

    def _corrupt(self, chunk: int, problem: str) -> CorruptStoreError:
        """The error for a damaged committed chunk: what is wrong, where, and the fix."""
        return CorruptStoreError(
            f"chunk {chunk} of the store {self.path} {problem}; delete that chunk directory "
            f"({self._chunk_dir(chunk)}) and rerun the same featurize command, which rewrites "
            "only missing chunks and finalizes the store again"
        )

    def _chunk_info(self, chunk: int) -> dict:
        """chunk.json of committed chunk ``chunk``, with its fields checked for shape."""
        path = os.path.join(self._chunk_dir(chunk), _CHUNK_INFO)
        try:
            with open(path) as f:
                info = json.load(f)
        except FileNotFoundError:
            raise self._corrupt(
                chunk, f"has no {_CHUNK_INFO} (its directory was removed or partially deleted)"
            ) from None
        except (OSError, ValueError) as e:
            raise self._corrupt(chunk, f"has an unreadable {_CHUNK_INFO} ({e})") from e
        files = info.get("files") if isinstance(info, dict) else None
        if (
            not isinstance(files, dict)
            or info.get("chunk") != chunk
            or not _is_int(info.get("rows"))
            or not isinstance(info.get("skipped"), list)
            or any(
                not isinstance(files.get(name), dict)
                or not _is_int(files[name].get("nbytes"))
                or not _is_int(files[name].get("crc32"))
                for name in _DATA_FILES
            )
        ):
            raise self._corrupt(
                chunk,
                f"has a {_CHUNK_INFO} that is not a schema-{SCHEMA_VERSION} commit record of "
                f"this chunk (chunk index, rows, skipped, and each data file's nbytes and crc32 "
                f"expected): {_preview_json(info)}",
            )
        return info

    def _read_verified(self, chunk: int, info: dict, name: str) -> np.ndarray:
        """Reads data file ``name`` of a committed chunk; its size and CRC-32 must match."""
        rows = info["rows"]
        if name == "vectors":
            dtype = _NP_DTYPES[self._meta.dtype].newbyteorder("<")
            shape: tuple[int, ...] = (rows, self.dim)
        else:
            dtype, shape = np.dtype("<i8"), (rows,)
        expected = rows * (self.dim if name == "vectors" else 1) * dtype.itemsize
        record = info["files"][name]
        if record["nbytes"] != expected:
            raise self._corrupt(
                chunk,
                f"has a {_CHUNK_INFO} that contradicts itself: {rows} rows need {expected} bytes "
                f"of {name}, but it records {record['nbytes']}",
            )
        if expected == 0:
            return np.zeros(shape, dtype)  # No rows: tensorstore writes no data file.
        path = os.path.join(self._chunk_dir(chunk), _DATA_FILES[name])
        try:
            # The size first, from the file system: np.fromfile would drop a partial last item.
            st = os.stat(path)
            size = st.st_size
            key = (os.path.abspath(path), st.st_ino, st.st_dev, size, st.st_mtime_ns)
            key += (record["crc32"],)
            if size != expected:
                data = None
            elif self._mapped:
                data = self._maps.get(key)
                if data is None:
                    data = self._maps[key] = _read_raw(path, dtype, mapped=True)
            else:
                data = _read_raw(path, dtype)
        except FileNotFoundError:
            raise self._corrupt(
                chunk, f"is missing its {name} data file {path} ({rows} rows were committed)"
            ) from None
        if data is None or data.nbytes != expected:
            raise self._corrupt(
                chunk,
                f"has a {name} data file {path} of {size} bytes, but {expected} were "
                "committed (the file was truncated or overwritten)",
            )
        if self._verify_once and key in _VERIFIED:
            return data.reshape(shape)
        crc = _crc32(data)
        if crc != record["crc32"]:
            raise self._corrupt(
                chunk,
                f"has a {name} data file {path} whose CRC-32 is {crc:#010x}, not the "
                f"{record['crc32']:#010x} recorded at commit: its bytes were damaged after "
                "the chunk was written",
            )
        _VERIFIED.add(key)
        return data.reshape(shape)

    # ----- writing ------------------------------------------------------------------------

    def write_chunk(
        self,
        chunk: int,
        ids: np.ndarray,
        vectors: np.ndarray,
        skipped: Sequence[dict] = (),
    ) -> None:
        """Validates and atomically commits chunk ``chunk``.

        Args:
          chunk: chunk index in ``[0, num_chunks)``; must not be committed yet.
          ids: ``ids_N`` int example positions, ascending, inside the chunk's range.
          vectors: ``vectors_NxD`` float rows (cast to the store dtype).
          skipped: ``{"id", "reason"}`` for the chunk's positions that have no row; rows and
            skipped together must cover the chunk's positions exactly once.

        Raises:
          NonFiniteVectorError: naming the ids of rows with NaN/inf (also after a bfloat16
            cast overflows); nothing is committed.
          StoreError: wrong shapes, dims, ids, or an already committed chunk.
        """
        meta = self._meta
        if not (_is_int(chunk) and 0 <= chunk < meta.num_chunks):
            raise StoreError(f"chunk index {chunk!r} is outside [0, {meta.num_chunks})")
        lo, hi = meta.chunk_range(chunk)
        ids_N = np.asarray(ids)
        vectors_NxD = np.asarray(vectors)
        if ids_N.ndim != 1 or not np.issubdtype(ids_N.dtype, np.integer):
            raise StoreError(f"ids must be a 1-D integer array, got {ids_N.dtype}{ids_N.shape}")
        if vectors_NxD.ndim != 2 or vectors_NxD.shape != (len(ids_N), meta.dim):
            raise StoreError(
                f"vectors must have shape (len(ids), dim) = ({len(ids_N)}, {meta.dim}), got "
                f"{vectors_NxD.shape}"
            )
        if not np.issubdtype(vectors_NxD.dtype, np.floating):
            raise StoreError(f"vectors must be floating point, got {vectors_NxD.dtype}")
        ids_N = ids_N.astype(np.int64)
        if len(ids_N) and (np.any(np.diff(ids_N) <= 0) or ids_N[0] < lo or ids_N[-1] >= hi):
            raise StoreError(
                f"ids of chunk {chunk} must be strictly ascending positions in [{lo}, {hi}), got "
                f"{_preview(ids_N)}"
            )
        skipped = list(skipped)
        skipped_ids = _check_skipped(skipped, lo, hi, f"skipped of chunk {chunk}")
        skipped = [{"id": int(s["id"]), "reason": str(s["reason"])} for s in skipped]
        covered = np.sort(np.concatenate([ids_N, np.asarray(skipped_ids, np.int64)]))
        if len(covered) != hi - lo or np.any(covered != np.arange(lo, hi)):
            missing = sorted(set(range(lo, hi)) - set(covered.tolist()))
            twice = sorted(set(ids_N.tolist()) & set(skipped_ids))
            raise StoreError(
                f"chunk {chunk} must account for each position in [{lo}, {hi}) once, as a row or "
                f"a skipped entry: missing {missing[:20]}, both row and skipped {twice[:20]}"
            )
        stored_NxD = vectors_NxD.astype(_NP_DTYPES[meta.dtype], copy=False)
        # Checked after the cast too: finite float32 beyond bfloat16's range becomes inf.
        bad = ~np.isfinite(stored_NxD).all(axis=1)
        if stored_NxD is not vectors_NxD:
            bad |= ~np.isfinite(vectors_NxD).all(axis=1)
        if bad.any():
            raise NonFiniteVectorError(
                f"non-finite values (NaN/inf, or beyond the {meta.dtype} range) in the vectors of "
                f"{int(bad.sum())} example(s), ids {_preview(ids_N[bad])}; chunk {chunk} was not "
                "written. Check those examples (empty or too long?) and the model/optimizer state."
            )
        final = os.path.join(self._chunks_dir(), _chunk_name(chunk))
        if os.path.exists(final):
            raise StoreError(
                f"chunk {chunk} is already committed in {self.path}; write only missing_chunks()"
            )
        self._remove_temporaries(chunk)
        tmp = os.path.join(
            self._chunks_dir(),
            f"{_TMP_PREFIX}{_chunk_name(chunk)}-{socket.gethostname()}-{os.getpid()}-"
            f"{uuid.uuid4().hex[:8]}",
        )
        os.makedirs(tmp)
        try:
            n = len(ids_N)
            vec_arr = ts.open(
                _zarr_spec(os.path.join(tmp, "vectors"), (n, meta.dim), meta.dtype),
                create=True,
                context=self._context,
            ).result()
            ids_arr = ts.open(
                _zarr_spec(os.path.join(tmp, "ids"), (n,), "int64"),
                create=True,
                context=self._context,
            ).result()
            if n:
                futures = [vec_arr.write(stored_NxD), ids_arr.write(ids_N)]
                for fut in futures:
                    fut.result()
            files = {
                "vectors": _file_record(tmp, "vectors", stored_NxD, chunk),
                "ids": _file_record(tmp, "ids", ids_N, chunk),
            }
            info = {
                "chunk": chunk,
                "rows": n,
                "dtype": meta.dtype,
                "skipped": skipped,
                "files": files,
            }
            # The info file is written last inside the temporary, so a final-named directory
            # without it can only come from outside this writer (see _scan).
            _write_json(os.path.join(tmp, _CHUNK_INFO), info)
            _fsync_dir(tmp)
            try:
                os.replace(tmp, final)  # The commit point.
            except OSError as e:
                raise StoreError(
                    f"chunk {chunk} was committed by another writer while this one wrote it; "
                    "give each process a disjoint chunk set (chunks_for_process)"
                ) from e
            _fsync_dir(self._chunks_dir())
        finally:
            if os.path.exists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)

    def _remove_temporaries(self, chunk: int | None = None) -> None:
        prefix = _TMP_PREFIX + ("" if chunk is None else _chunk_name(chunk) + "-")
        for name in os.listdir(self._chunks_dir()):
            if name.startswith(prefix):
                shutil.rmtree(os.path.join(self._chunks_dir(), name), ignore_errors=True)

    def finalize(self) -> None:
        """Checks every chunk is present, intact and covers its positions, then marks complete.

        Reads every chunk's data files once and checks their sizes and checksums, so a store
        marked complete was intact when marked. Call from one process after all writers
        finished. Idempotent.

        Raises:
          IncompleteStoreError: chunks are missing (says which, and to rerun featurize).
          CorruptStoreError: a chunk's files are missing, short or fail their checksum.
          StoreError: a chunk's contents contradict the metadata.
        """
        meta = self._meta
        committed = self._scan()
        missing = self.missing_chunks()
        if missing:
            raise IncompleteStoreError(
                f"cannot finalize {self.path}: {len(missing)} chunk(s) missing, e.g. "
                f"{missing[:10]}. Rerun featurize; it writes only the missing chunks."
            )
        extra = [c for c in committed if c >= meta.num_chunks]
        if extra:
            raise StoreError(f"{self.path} has chunks {extra} beyond num_chunks {meta.num_chunks}")
        num_rows = 0
        skipped = [dict(s) for s in meta.skipped]
        for c in range(meta.num_chunks):
            info = self._chunk_info(c)
            lo, hi = meta.chunk_range(c)
            ids_N = self._read_verified(c, info, "ids")
            self._read_verified(c, info, "vectors")  # Checked here, not kept: one chunk at a time.
            covered = np.concatenate([ids_N, np.asarray([s["id"] for s in info["skipped"]], int)])
            if not np.array_equal(np.sort(covered), np.arange(lo, hi)):
                raise self._corrupt(
                    c, f"does not cover positions [{lo}, {hi}) exactly once (rows + skipped)"
                )
            num_rows += info["rows"]
            skipped.extend(info["skipped"])
        skipped.sort(key=lambda s: s["id"])
        _check_skipped(skipped, 0, meta.num_examples, "skipped examples")
        self._remove_temporaries()
        complete = {"num_rows": num_rows, "num_chunks": meta.num_chunks, "skipped": skipped}
        _write_json(os.path.join(self.path, _COMPLETE), complete)
        self._complete = complete

    # ----- reading ------------------------------------------------------------------------

    def read_chunk(self, chunk: int) -> tuple[np.ndarray, np.ndarray]:
        """Returns chunk ``chunk`` as ``(ids_N int64, vectors_NxD float32)``, verified.

        Each array is one uncompressed little-endian zarr3 chunk whose file is the C-order
        array itself, read with np.fromfile (one copy, about twice tensorstore's rate) and
        checked against the size and CRC-32 recorded in chunk.json.

        Raises:
          CorruptStoreError: a file is missing, short, or fails its checksum, or chunk.json is
            missing or damaged; the message names the chunk directory to delete before
            rerunning featurize.
        """
        info = self._chunk_info(chunk)
        ids_N = self._read_verified(chunk, info, "ids").astype(np.int64, copy=False)
        vectors_NxD = self._read_verified(chunk, info, "vectors")
        return ids_N, vectors_NxD.astype(np.float32, copy=False)

    @property
    def is_mapped(self) -> bool:
        """Whether chunks are memory maps kept for the store's life (``open(mapped=True)``)."""
        return self._mapped

    def _require_complete(self, what: str) -> None:
        if self._complete is None:
            raise IncompleteStoreError(
                f"{what} needs a finished store; {self.path} is incomplete. Rerun featurize."
            )

    def _blocks(self, rows_per_step: int | None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if rows_per_step is None:
            for c in range(self.num_chunks):
                yield self.read_chunk(c)
            return
        ids_buf: list[np.ndarray] = []
        vec_buf: list[np.ndarray] = []
        held = 0
        for c in range(self.num_chunks):
            ids_N, vectors_NxD = self.read_chunk(c)
            ids_buf.append(ids_N)
            vec_buf.append(vectors_NxD)
            held += len(ids_N)
            while held >= rows_per_step:
                ids_all = np.concatenate(ids_buf) if len(ids_buf) > 1 else ids_buf[0]
                vec_all = np.concatenate(vec_buf) if len(vec_buf) > 1 else vec_buf[0]
                yield ids_all[:rows_per_step], vec_all[:rows_per_step]
                ids_buf, vec_buf = [ids_all[rows_per_step:]], [vec_all[rows_per_step:]]
                held -= rows_per_step
        if held:
            yield np.concatenate(ids_buf), np.concatenate(vec_buf)

    def iter_chunks(
        self, rows_per_step: int | None = None, prefetch: int = 2
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yields ``(ids_N int64, vectors_NxD float32)`` blocks in ascending id order.

        Args:
          rows_per_step: rows per block (the last may be shorter); None = one store chunk.
          prefetch: blocks read ahead by a background thread, so disk reads overlap the
            caller's compute; 0 reads synchronously (as a ``mapped`` store always does).
        """
        self._require_complete("iter_chunks")
        if rows_per_step is not None and rows_per_step <= 0:
            raise StoreError(f"rows_per_step must be positive or None, got {rows_per_step}")
        # A mapped store's reads are O(1) after the first (no copy; the CRC once per file):
        # a reader thread would only add its hand-off to every block.
        if prefetch <= 0 or self._mapped:
            yield from self._blocks(rows_per_step)
            return
        q: queue.Queue = queue.Queue(maxsize=prefetch)
        stop = threading.Event()
        done = object()

        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                for block in self._blocks(rows_per_step):
                    if not put(block):
                        return
                put(done)
            except BaseException as e:  # Re-raised in the consumer's thread.
                put(e)

        thread = threading.Thread(target=produce, name="vector-store-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()  # Lets the producer exit if the consumer stopped early.
            thread.join()

    def read_ids(self) -> np.ndarray:
        """All stored example ids ``ids_N`` (int64, ascending), each chunk's file verified.

        Raises:
          CorruptStoreError: an ids file is missing, short or fails its checksum.
        """
        self._require_complete("read_ids")
        parts = [self._read_verified(c, self._chunk_info(c), "ids") for c in range(self.num_chunks)]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def read_all(self, max_bytes: int = 2**31) -> tuple[np.ndarray, np.ndarray]:
        """All rows as ``(ids_N, vectors_NxD float32)``; for small stores only.

        Raises:
          StoreError: the float32 result would exceed ``max_bytes`` (use ``iter_chunks``).
        """
        self._require_complete("read_all")
        nbytes = self.num_rows * self.dim * 4
        if nbytes > max_bytes:
            raise StoreError(
                f"read_all would load {nbytes / 2**20:.0f} MiB (> max_bytes); stream the store "
                "with iter_chunks() instead, or raise max_bytes"
            )
        ids_parts, vec_parts = [np.zeros(0, np.int64)], [np.zeros((0, self.dim), np.float32)]
        for ids_N, vectors_NxD in self.iter_chunks(prefetch=0):
            ids_parts.append(ids_N)
            vec_parts.append(vectors_NxD)
        return np.concatenate(ids_parts), np.concatenate(vec_parts)


def _preview(ids: np.ndarray, n: int = 20) -> str:
    ids = np.asarray(ids).tolist()
    more = f" ... ({len(ids)} in all)" if len(ids) > n else ""
    return f"{ids[:n]}{more}"


def _preview_json(obj: Any, n: int = 300) -> str:
    text = json.dumps(obj, default=str)
    return text if len(text) <= n else text[:n] + " ..."
