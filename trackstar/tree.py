"""Parameter-path utilities shared by every stage.

A parameter path is the '/'-joined sequence of dict keys / sequence indices leading to a leaf,
e.g. ``"blocks/0/attn/qkv/kernel"``. Paths are the stable identity of a tensor: projection
matrices are derived from them, and optimizer state is matched to parameters by them.
"""

from __future__ import annotations

import hashlib
from typing import Any

import jax

PyTree = Any


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_name(path: tuple) -> str:
    """Turns a ``jax.tree_util`` key path into a '/'-joined name."""
    return "/".join(_key_name(k) for k in path)


def named_leaves(tree: PyTree) -> list[tuple[str, Any]]:
    """Returns ``[(path_name, leaf), ...]`` in ``jax.tree_util`` flattening order."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(path_name(p), leaf) for p, leaf in leaves]


def stable_hash(name: str) -> int:
    """A 31-bit hash of a string that is identical across processes and runs.

    Python's ``hash`` is salted per process, so it cannot seed anything shared by hosts.
    """
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little") & 0x7FFFFFFF


def tree_fingerprint(tree: PyTree) -> str:
    """A content hash of a pytree of arrays: paths, shapes, dtypes and bytes."""
    import numpy as np

    h = hashlib.sha256()
    for name, leaf in named_leaves(tree):
        arr = np.asarray(leaf)
        h.update(name.encode())
        h.update(str(arr.shape).encode())
        h.update(str(arr.dtype).encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()[:16]
