"""A small, valid ``StoreMeta`` for tests that build vector stores by hand."""

from __future__ import annotations

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
