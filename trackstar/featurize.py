"""Featurize: examples -> per-example feature vectors -> a resumable store (docs/method.md).

The jitted feature kernel (gradients + correction + projection) runs batch by batch; rows are
grouped into store chunks and each chunk is committed atomically, so a killed run restarts at
the first missing chunk and the finished store equals an uninterrupted one. Store writes run on
a background thread so disk I/O overlaps the next chunk's compute.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from trackstar.store import VectorStore

FeatureFn = Callable[[object, np.ndarray, np.ndarray], object]


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
    return np.concatenate([np.asarray(v, dtype=np.float32)[:n] for n, v in pending])


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
) -> int:
    """Fills the store's missing chunks (or just ``chunks``); returns the rows written.

    Chunk ``c`` holds examples ``[c * chunk_size, (c + 1) * chunk_size)``. Examples with no
    counted tokens are refused up front, or skipped and listed with ``skip_bad_examples``. A
    chunk with a non-finite row is refused by the store (naming the example ids) before any of
    it is committed. Store writes overlap the next chunk's compute on a writer thread.
    """
    meta = store.meta
    if meta.num_examples != len(examples):
        raise BadExampleError(
            f"the store at {store.path} expects {meta.num_examples} examples, got "
            f"{len(examples)}; featurize into a new store path"
        )
    bad = skipped_examples(examples, skip_bad_examples)
    todo = list(store.missing_chunks() if chunks is None else chunks)
    total = sum(meta.chunk_range(c)[1] - meta.chunk_range(c)[0] for c in todo)
    written = 0
    with (
        tqdm(total=total, desc=desc, unit="ex", disable=not progress, smoothing=0.1) as bar,
        concurrent.futures.ThreadPoolExecutor(max_workers=1) as writer,
    ):
        pending = None
        for c in todo:
            lo, hi = meta.chunk_range(c)
            ids = np.array([i for i in range(lo, hi) if i not in bad], np.int64)
            skipped = [{"id": i, "reason": bad[i]} for i in range(lo, hi) if i in bad]
            vectors = (
                compute_vectors(feature_fn, params, examples.take(ids), batch_size)
                if len(ids)
                else np.zeros((0, meta.dim), np.float32)
            )
            if pending is not None:
                pending.result()  # surfaces a refused chunk before more work is queued
            pending = writer.submit(store.write_chunk, c, ids, vectors, skipped)
            written += len(ids)
            bar.update(hi - lo)
        if pending is not None:
            pending.result()
    return written
