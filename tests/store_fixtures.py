"""A small, valid ``StoreMeta`` for tests that build vector stores by hand, and an in-memory
stand-in for a store."""

from __future__ import annotations

import numpy as np

from trackstar.store import StoreMeta


def store_meta(dim: int, num_examples: int, chunk_size: int, **fields) -> StoreMeta:
    """A train-store ``StoreMeta`` with fixed fingerprints and projection; ``fields`` override."""
    base = dict(
        kind="train",
        dim=dim,
        dtype="float32",
        num_examples=num_examples,
        chunk_size=chunk_size,
        model_fingerprint="m0",
        optimizer_fingerprint="o0",
        projection={"mode": "global", "seed": 0, "k_in": 2, "k_out": 4, "dim": dim, "hash": "h"},
        output_fn="train_loss",
        correction="adam",
    )
    base.update(fields)
    return StoreMeta(**base)


class ArrayStore:
    """The parts of ``VectorStore`` that scoring and the Hessian fit read (``iter_chunks``,
    ``num_rows``, ``meta``) over in-memory rows; ids default to ``0..N-1``."""

    def __init__(self, vectors, meta=None, chunk: int = 8, ids=None):
        self.vectors, self.meta, self.chunk = vectors, meta, chunk
        self.ids = np.arange(len(vectors)) if ids is None else np.asarray(ids)

    @property
    def num_rows(self) -> int:
        return len(self.ids)

    def iter_chunks(self, rows_per_step=None, prefetch=2):
        step = rows_per_step or self.chunk
        for s in range(0, len(self.ids), step):
            yield self.ids[s : s + step], self.vectors[s : s + step]
