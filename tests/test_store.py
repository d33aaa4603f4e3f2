"""Tests for trackstar.store: round trips, resume after a crash, refusals, concurrent writers."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest

from trackstar.store import (
    IncompleteStoreError,
    NonFiniteVectorError,
    SchemaVersionError,
    StoreError,
    StoreMeta,
    StoreMismatchError,
    VectorStore,
    check_compatible,
)

N, D, CHUNK = 10, 8, 4  # 3 chunks: [0, 4), [4, 8), [8, 10).
SKIPPED = {5: "no counted tokens"}


def _meta(**kw) -> StoreMeta:
    base = dict(
        kind="train",
        dim=D,
        dtype="float32",
        num_examples=N,
        chunk_size=CHUNK,
        model_fingerprint="m0",
        optimizer_fingerprint="o0",
        projection={"mode": "global", "seed": 0, "k_in": 2, "k_out": 4, "dim": D, "hash": "h"},
        output_fn="train_loss",
        correction="adam",
    )
    base.update(kw)
    return StoreMeta(**base)


def _vectors() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((N, D)).astype(np.float32) * 3.0


def _chunk(c: int, vectors_NxD: np.ndarray, skipped: dict = SKIPPED):
    lo, hi = c * CHUNK, min((c + 1) * CHUNK, N)
    ids = np.array([i for i in range(lo, hi) if i not in skipped], np.int64)
    skip = [{"id": i, "reason": r} for i, r in skipped.items() if lo <= i < hi]
    return ids, vectors_NxD[ids], skip


def _write(store: VectorStore, chunks, vectors_NxD: np.ndarray) -> None:
    for c in chunks:
        ids, vec, skip = _chunk(c, vectors_NxD)
        store.write_chunk(c, ids, vec, skipped=skip)


def _full_store(path, vectors_NxD, **kw) -> VectorStore:
    store = VectorStore.create(path, _meta(**kw))
    _write(store, range(store.num_chunks), vectors_NxD)
    store.finalize()
    return store


def test_round_trip_float32_exact_and_iteration(tmp_path):
    vectors = _vectors()
    _full_store(tmp_path / "s", vectors)
    store = VectorStore.open(tmp_path / "s")
    kept = np.array([i for i in range(N) if i not in SKIPPED])
    ids, got = store.read_all()
    np.testing.assert_array_equal(ids, kept)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, vectors[kept])
    np.testing.assert_array_equal(store.read_ids(), kept)
    assert store.num_rows == len(kept) and store.dim == D
    assert store.meta.skipped == [{"id": 5, "reason": "no counted tokens"}]
    # Blocks of any size, with or without the prefetch thread, concatenate to the same rows in
    # ascending id order.
    for rows, prefetch in [(None, 0), (None, 2), (1, 1), (3, 2), (100, 2)]:
        blocks = list(store.iter_chunks(rows_per_step=rows, prefetch=prefetch))
        if rows is not None:
            assert all(len(b[0]) == rows for b in blocks[:-1]) and 0 < len(blocks[-1][0]) <= rows
        bids = np.concatenate([b[0] for b in blocks])
        np.testing.assert_array_equal(bids, kept)
        np.testing.assert_array_equal(np.concatenate([b[1] for b in blocks]), vectors[kept])
    # A consumer that stops early does not hang the prefetch thread.
    it = store.iter_chunks(rows_per_step=1, prefetch=1)
    first = next(it)
    it.close()
    assert first[0].tolist() == [0]


def test_round_trip_bfloat16_within_tolerance(tmp_path):
    vectors = _vectors()
    store = _full_store(tmp_path / "s", vectors, dtype="bfloat16")
    ids, got = store.read_all()
    assert got.dtype == np.float32
    ref = vectors[ids]
    rel_err = np.max(np.abs(got - ref) / np.abs(ref))
    # bfloat16 keeps 8 significant bits: round-to-nearest error <= 2^-8 relative.
    assert 0 < rel_err <= 2.0**-8, rel_err
    np.testing.assert_array_equal(got, ref.astype(ml_dtypes.bfloat16).astype(np.float32))


def test_resume_after_crash_equals_uninterrupted(tmp_path):
    vectors = _vectors()
    ref_ids, ref_vec = _full_store(tmp_path / "ref", vectors).read_all()

    path = tmp_path / "s"
    store = VectorStore.create(path, _meta())
    _write(store, [0], vectors)
    # A writer killed while writing chunk 1: its temporary holds complete-looking data (even a
    # chunk.json) but was never renamed. Chunk 2 was never started.
    crashed = path / "chunks" / ".tmp-00000001-host-123-deadbeef"
    shutil.copytree(path / "chunks" / "00000000", crashed)
    with pytest.raises(IncompleteStoreError, match="Rerun the same featurize"):
        VectorStore.open(path)
    partial = VectorStore.open(path, require_complete=False)
    assert partial.committed_chunks() == [0] and partial.num_rows == 4
    with pytest.raises(IncompleteStoreError, match="missing"):
        partial.finalize()

    resumed = VectorStore.create(path, _meta())
    assert resumed.missing_chunks() == [1, 2]
    _write(resumed, resumed.missing_chunks(), vectors)
    assert not crashed.exists()  # Chunk 1's writer cleared its stale temporary.
    resumed.finalize()
    ids, vec = VectorStore.open(path).read_all()
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(vec, ref_vec)
    assert sorted(os.listdir(path / "chunks")) == ["00000000", "00000001", "00000002"]
    with pytest.raises(StoreError, match="already committed"):
        _write(resumed, [1], vectors)


def test_refuses_partial_chunk_dir_and_other_schema_version(tmp_path):
    vectors = _vectors()
    path = tmp_path / "s"
    _full_store(path, vectors)
    os.remove(path / "chunks" / "00000002" / "chunk.json")
    with pytest.raises(StoreError, match="partially written.*rerun featurize"):
        VectorStore.open(path)
    shutil.rmtree(path / "chunks" / "00000002")
    meta = json.loads((path / "meta.json").read_text())
    meta["schema_version"] = 99
    (path / "meta.json").write_text(json.dumps(meta))
    for call in (lambda: VectorStore.open(path), lambda: VectorStore.create(path, _meta())):
        with pytest.raises(SchemaVersionError, match="schema version 99.*Rerun featurize"):
            call()


def test_non_finite_rows_refused_naming_ids_nothing_committed(tmp_path):
    vectors = _vectors()
    store = VectorStore.create(tmp_path / "s", _meta())
    ids, vec, skip = _chunk(1, vectors)  # ids 4, 6, 7.
    vec[1, 3] = np.nan
    vec[2, 0] = -np.inf
    with pytest.raises(NonFiniteVectorError, match=r"ids \[6, 7\]"):
        store.write_chunk(1, ids, vec, skipped=skip)
    assert store.committed_chunks() == []
    assert os.listdir(tmp_path / "s" / "chunks") == []
    # Finite in float32 but beyond bfloat16's range: overflows to inf when stored.
    bf = VectorStore.create(tmp_path / "bf", _meta(dtype="bfloat16"))
    ids, vec, skip = _chunk(0, vectors)
    vec[2, 1] = np.float32(3.4e38)
    with pytest.raises(NonFiniteVectorError, match=r"ids \[2\]"):
        bf.write_chunk(0, ids, vec, skipped=skip)
    assert bf.committed_chunks() == []


def test_bad_shapes_and_ids_refused(tmp_path):
    vectors = _vectors()
    store = VectorStore.create(tmp_path / "s", _meta())
    ids, vec, skip = _chunk(0, vectors)
    cases = [
        (dict(chunk=3), "outside"),
        (dict(vectors=vec[:, :5]), r"shape \(len\(ids\), dim\)"),
        (dict(ids=ids[:3]), r"shape \(len\(ids\), dim\)"),
        (dict(ids=ids[::-1].copy(), vectors=vec[::-1]), "strictly ascending"),
        (dict(ids=ids + 4), "strictly ascending"),
        (dict(ids=ids[:3], vectors=vec[:3]), "missing \\[3\\]"),
        (dict(skipped=[{"id": 0, "reason": "x"}]), "both row and skipped \\[0\\]"),
        (dict(vectors=vec.astype(np.int32)), "floating point"),
    ]
    for change, message in cases:
        args = dict(chunk=0, ids=ids, vectors=vec, skipped=skip) | change
        with pytest.raises(StoreError, match=message):
            store.write_chunk(**args)
    assert store.committed_chunks() == []
    with pytest.raises(StoreError, match="kind must be"):
        VectorStore.create(tmp_path / "bad", _meta(kind="eval"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(StoreError, match="not a vector store"):
        VectorStore.create(tmp_path / "other", _meta())


def test_create_with_different_meta_refused(tmp_path):
    VectorStore.create(tmp_path / "s", _meta())
    other = _meta(dim=16, projection={**_meta().projection, "seed": 1})
    with pytest.raises(StoreMismatchError) as err:
        VectorStore.create(tmp_path / "s", other)
    msg = str(err.value)
    assert "dim: existing=8, requested=16" in msg
    assert "projection.seed: existing=0, requested=1" in msg
    assert "new store path" in msg


def test_check_compatible_lists_every_difference():
    train = _meta()
    query = _meta(kind="query", output_fn="margin")
    check_compatible(train, query)  # kind and output_fn may differ.
    bad = dataclasses.replace(
        query,
        model_fingerprint="m1",
        optimizer_fingerprint="o1",
        projection={**train.projection, "k_in": 4, "hash": "h2"},
        correction="none",
        dim=16,
    )
    with pytest.raises(StoreMismatchError) as err:
        check_compatible(train, bad)
    msg = str(err.value)
    for field in (
        "model_fingerprint",
        "optimizer_fingerprint",
        "projection.k_in",
        "projection.hash",
        "correction",
        "dim",
    ):
        assert field in msg, field
    assert "output_fn" not in msg and "kind" not in msg


_WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from trackstar.store import StoreMeta, VectorStore
    path, p, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    meta = StoreMeta(**__import__("json").loads(sys.argv[4]))
    store = VectorStore.create(path, meta)
    vectors = np.arange(meta.num_examples * meta.dim, dtype=np.float32).reshape(-1, meta.dim)
    for c in store.chunks_for_process(p, n):
        lo, hi = meta.chunk_range(c)
        store.write_chunk(c, np.arange(lo, hi), vectors[lo:hi])
    """
)


def test_two_processes_write_disjoint_chunks_into_one_store(tmp_path):
    meta = _meta(num_examples=21, chunk_size=3)  # 7 chunks.
    path = str(tmp_path / "s")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, path, str(p), "2", json.dumps(meta.to_dict())],
            stderr=subprocess.PIPE,
            text=True,
        )
        for p in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    store = VectorStore.open(path, require_complete=False)
    store.finalize()
    ids, vec = VectorStore.open(path).read_all()
    np.testing.assert_array_equal(ids, np.arange(21))
    np.testing.assert_array_equal(vec, np.arange(21 * D, dtype=np.float32).reshape(21, D))


def test_zero_and_empty_chunks_and_reader_errors_propagate(tmp_path):
    vectors = _vectors()
    vectors[:4] = 0.0  # All fill value: tensorstore may elide such chunks.
    skipped = {np.int64(8): "too long", 9: "too long"}  # Chunk 2 has no rows at all.
    store = VectorStore.create(tmp_path / "s", _meta())
    for c in range(3):
        ids, vec, skip = _chunk(c, vectors, skipped)
        store.write_chunk(c, ids, vec, skipped=skip)
    store.finalize()
    ids, got = store.read_all()
    np.testing.assert_array_equal(ids, np.arange(8))
    np.testing.assert_array_equal(got, vectors[:8])
    assert [s["id"] for s in store.meta.skipped] == [8, 9]
    # A chunk damaged after finalize: the prefetch thread's error reaches the consumer.
    info_path = tmp_path / "s" / "chunks" / "00000001" / "chunk.json"
    info = json.loads(info_path.read_text())
    info_path.write_text(json.dumps(info | {"rows": 3}))
    with pytest.raises(StoreError, match="chunk 1 .* delete that chunk directory"):
        list(store.iter_chunks(prefetch=2))
