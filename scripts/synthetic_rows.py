"""Large synthetic index rows with the neighbourhood structure of real featurized rows.

Approximate top-k and large-N latency need N far beyond a real run's candidates (the demo has
14,903), and random Gaussian rows have no neighbourhood structure (every row is about
equidistant from every query, which makes any approximate index look bad). So each synthetic
row is a real row plus noise:

  base   the unit rows of a finished store (a scoring index or a candidate store), optionally
         mapped to ``dim`` by a seeded Gaussian map (Johnson-Lindenstrauss: cosines are kept to
         about 1/sqrt(dim)) and renormalized;
  row i  base[i mod B] + noise * g_i / sqrt(dim), g_i standard Gaussian, renormalized: a
         replica of base row i mod B at cosine about 1 / sqrt(1 + noise^2) from it.

Rows come in deterministic blocks (each block's noise from its own seed), so N = 1M rows need
no more memory than one block plus what the caller keeps.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def unit(x_NxD: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32; zero rows stay zero)."""
    x = np.asarray(x_NxD, np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def base_rows(
    store_path: str, dim: int | None = None, seed: int = 0, max_rows: int | None = None
) -> np.ndarray:
    """The unit rows of the finished store at ``store_path`` (its first ``max_rows``), mapped
    to ``dim`` by a seeded Gaussian map when ``dim`` is given and differs from the store's."""
    from trackstar.store import VectorStore

    _, x = VectorStore.open(store_path).read_all()
    x = unit(x[:max_rows])
    if dim is not None and dim != x.shape[1]:
        rng = np.random.default_rng([seed, x.shape[1], dim])
        x = unit(x @ rng.standard_normal((x.shape[1], dim), dtype=np.float32))
    return x


def synthetic_blocks(
    base_BxD: np.ndarray, n_rows: int, noise: float = 0.3, seed: int = 0, block: int = 65536
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(ids_N, rows_NxD float32)`` blocks of ``n_rows`` synthetic unit rows (see the module
    docstring); block b's noise comes from seed ``(seed, b)``, so blocks are reproducible."""
    base = unit(base_BxD)
    n_base, d = base.shape
    for b, start in enumerate(range(0, n_rows, block)):
        ids = np.arange(start, min(start + block, n_rows), dtype=np.int64)
        rng = np.random.default_rng([seed, b])
        x = base[ids % n_base] + rng.standard_normal((len(ids), d), dtype=np.float32) * (
            noise / np.sqrt(d)
        )
        yield ids, unit(x)


def synthetic_rows(
    base_BxD: np.ndarray, n_rows: int, noise: float = 0.3, seed: int = 0
) -> np.ndarray:
    """All ``n_rows`` synthetic rows as one float32 array (``synthetic_blocks`` concatenated)."""
    out = np.empty((n_rows, base_BxD.shape[1]), np.float32)
    for ids, x in synthetic_blocks(base_BxD, n_rows, noise, seed):
        out[ids] = x
    return out
