"""Random projection of per-example gradients (docs/method.md, Random projection).

Each parameter tensor ``G_l`` is viewed as a matrix ``(n_in, n_out)`` (``ndim >= 2``:
``(prod(shape[:-1]), shape[-1])``; vector: ``(n, 1)``; scalar: ``(1, 1)``) and projected two-sided,
``A_l^T G_l B_l``, with Gaussian ``A_l`` (``n_in x k_in``, variance ``1/k_in``) and ``B_l``
(``n_out x k_out``, variance ``1/k_out``), so ``E[P^T P] = I`` and inner products are preserved
in expectation. In row-major ``vec``, ``vec(A^T G B) = (A^T kron B^T) vec(G)``.

``A_l`` and ``B_l`` come from ``fold_in(PRNGKey(seed), stable_hash(path))``, split into one key
per side; each side's rows are drawn in chunks of 64 keyed by ``fold_in(side_key, chunk)``.
They are regenerated inside every call (cheap: ``(n_in + n_out) * k`` normals per tensor),
never stored, so every host and run reproduces them.

Modes: ``"global"`` sums all blocks into one ``k_in x k_out`` grid (``d = k_in * k_out``);
``"per_tensor"`` concatenates them (``d = L * k_in * k_out``); ``"dense"`` uses a Gaussian
``d x n_l`` matrix per leaf (variance ``1/d``), for tests and tiny models only.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from trackstar.tree import named_leaves, stable_hash

PyTree = Any

MODES = ("global", "per_tensor", "dense")
# Dense mode holds d x |theta| floats per call; beyond this it is the wrong tool.
MAX_DENSE_ELEMENTS = 1 << 26


class ProjectionError(ValueError):
    """A projector that cannot be built or applied; the message says how to fix it."""


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The ``(n_in, n_out)`` matrix view of a tensor shape."""
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return int(shape[0]), 1
    return math.prod(shape[:-1]), int(shape[-1])


def fold_scales(
    factors: tuple[jax.Array, jax.Array],
    row_scale: jax.Array | None,
    col_scale: jax.Array | None,
) -> tuple[jax.Array, jax.Array]:
    """``(diag(row) A, diag(col) B)``: a factored correction folded into Kronecker factors, so
    projecting ``G`` with them projects ``diag(row) G diag(col)``. ``None`` leaves a factor."""
    a, b = factors
    if row_scale is not None:
        a = a * jnp.reshape(row_scale, (a.shape[0], 1)).astype(jnp.float32)
    if col_scale is not None:
        b = b * jnp.reshape(col_scale, (b.shape[0], 1)).astype(jnp.float32)
    return a, b


class Projector:
    """Projects per-example gradient pytrees to ``B x dim`` vectors.

    Args:
      params_like: a pytree with the parameters' paths and shapes (arrays or ShapeDtypeStructs).
      mode: ``"global"``, ``"per_tensor"`` or ``"dense"``.
      k_in, k_out: Kronecker factor widths (``global``/``per_tensor``).
      seed: projection seed (an int; a traced integer works inside jit/vmap).
      dense_dim: ``d`` in ``dense`` mode.
      max_dense_elements: refuse ``dense`` mode when ``d * |theta|`` exceeds this.
    """

    def __init__(
        self,
        params_like: PyTree,
        mode: str = "global",
        k_in: int = 64,
        k_out: int = 64,
        seed: int = 0,
        dense_dim: int = 4096,
        max_dense_elements: int = MAX_DENSE_ELEMENTS,
    ):
        if mode not in MODES:
            raise ProjectionError(
                f"unknown projection mode {mode!r}; choose one of {', '.join(MODES)}"
            )
        if min(k_in, k_out, dense_dim) < 1:
            raise ProjectionError(
                f"projection widths must be >= 1, got k_in={k_in}, k_out={k_out}, "
                f"dense_dim={dense_dim}"
            )
        self.params_like = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)), params_like
        )
        self.mode, self.k_in, self.k_out = mode, int(k_in), int(k_out)
        # A traced seed is allowed (e.g. vmapping over seeds in statistical checks).
        self.seed = seed if isinstance(seed, jax.Array) else int(seed)
        self.dense_dim = int(dense_dim)
        self.shapes = {path: tuple(leaf.shape) for path, leaf in named_leaves(self.params_like)}
        self.paths = list(self.shapes)
        if not self.paths:
            raise ProjectionError("params_like has no leaves; pass the model's params pytree")
        self.n_params = sum(math.prod(s) for s in self.shapes.values())
        if mode == "dense" and self.dense_dim * self.n_params > max_dense_elements:
            raise ProjectionError(
                f"dense projection would hold {self.dense_dim} x {self.n_params} = "
                f"{self.dense_dim * self.n_params:,} floats (limit {max_dense_elements:,}); "
                "use mode='global' or 'per_tensor' for models this size"
            )
        # Folding diagonal scales into A and B only exists for the Kronecker modes.
        self.can_fold = mode != "dense"

    @property
    def dim(self) -> int:
        """Output dimension ``d``."""
        block = self.k_in * self.k_out
        if self.mode == "global":
            return block
        if self.mode == "per_tensor":
            return block * len(self.paths)
        return self.dense_dim

    def leaf_factors(self, paths: list[str] | None = None) -> dict[str, tuple[jax.Array, ...]]:
        """Regenerates the random factors of ``paths`` (default: all tensors) in one batch.

        Returns ``{path: (A_l, B_l)}`` in the Kronecker modes and ``{path: (M_l,)}`` with the
        ``d x n_l`` block in ``dense`` mode. Call it once per traced function and hand the
        entries to ``project_leaf``: one batched generator compiles far faster than one per
        tensor, and each tensor's values still depend only on (seed, path).
        """
        paths = self.paths if paths is None else list(paths)
        shapes = [matrix_shape(self._shape(p)) for p in paths]
        keys = jax.vmap(lambda h: jax.random.fold_in(jax.random.PRNGKey(self.seed), h))(
            jnp.asarray([stable_hash(p) for p in paths], jnp.uint32)
        )
        if self.mode == "dense":
            sizes = [n_in * n_out for n_in, n_out in shapes]
            blocks = _chunked_normal(keys, sizes, self.dense_dim, 1.0 / math.sqrt(self.dense_dim))
            return {p: (blk.T,) for p, blk in zip(paths, blocks, strict=True)}
        key_a, key_b = jnp.moveaxis(jax.vmap(jax.random.split)(keys), 1, 0)
        a_rows = [n_in for n_in, _ in shapes]
        b_rows = [n_out for _, n_out in shapes]
        if self.k_in == self.k_out:  # one generator for both sides
            both = _chunked_normal(
                jnp.concatenate([key_a, key_b]), a_rows + b_rows, self.k_in, self.k_in**-0.5
            )
            a_list, b_list = both[: len(paths)], both[len(paths) :]
        else:
            a_list = _chunked_normal(key_a, a_rows, self.k_in, self.k_in**-0.5)
            b_list = _chunked_normal(key_b, b_rows, self.k_out, self.k_out**-0.5)
        return {p: (a, b) for p, a, b in zip(paths, a_list, b_list, strict=True)}

    def factors(self, path: str) -> tuple[jax.Array, ...]:
        """``(A_l, B_l)`` (or dense mode's ``(M_l,)``) for one tensor."""
        return self.leaf_factors([path])[path]

    def project_leaf(
        self,
        path: str,
        g_Bx: jax.Array,
        row_scale: jax.Array | None = None,
        col_scale: jax.Array | None = None,
        factors: tuple[jax.Array, ...] | None = None,
    ) -> jax.Array:
        """Projects one tensor's per-example gradients ``g`` (``B x shape``) to its block.

        Returns ``B x (k_in * k_out)`` (Kronecker modes) or ``B x d`` (``dense``). With
        ``row_scale`` (``n_in``) / ``col_scale`` (``n_out``) it projects
        ``diag(row) G diag(col)`` by folding the scales into the factors
        (``A' = diag(row) A``, ``B' = diag(col) B``), which is how a factored (Adafactor)
        preconditioner is applied without materializing the scaled gradient. ``factors``:
        this tensor's entry of ``leaf_factors()`` (regenerated here when omitted).
        """
        shape = self._shape(path)
        if tuple(g_Bx.shape[1:]) != shape:
            raise ProjectionError(
                f"gradient for {path!r} has shape {tuple(g_Bx.shape)}, expected (B, *{shape})"
            )
        batch = g_Bx.shape[0]
        g = g_Bx.astype(jnp.float32)
        if factors is None:
            factors = self.factors(path)
        if self.mode == "dense":
            if row_scale is not None or col_scale is not None:
                raise ProjectionError(
                    "dense mode cannot fold row/col scales; multiply the gradient first"
                )
            return g.reshape(batch, -1) @ factors[0].T
        n_in, n_out = matrix_shape(shape)
        g_BxIxO = g.reshape(batch, n_in, n_out)
        a, b = fold_scales(factors, row_scale, col_scale)
        # Contract the cheaper side first; both orders give the same k_in x k_out block.
        cost_b_first = n_in * n_out * self.k_out + n_in * self.k_in * self.k_out
        cost_a_first = n_in * n_out * self.k_in + n_out * self.k_in * self.k_out
        if cost_b_first <= cost_a_first:
            out = jnp.einsum("bio,ik->bko", g_BxIxO @ b, a)
        else:
            out = jnp.einsum("ik,bio->bko", a, g_BxIxO) @ b
        return out.reshape(batch, self.k_in * self.k_out)

    def project_corrected(
        self,
        path: str,
        g_Bx: jax.Array,
        scale: Any = None,
        factors: tuple[jax.Array, ...] | None = None,
    ) -> jax.Array:
        """``project_leaf`` of ``g * scale`` for one parameter's correction ``scale``.

        ``scale`` is a ``trackstar.correction.Scale`` (or ``None``: no correction). A scale
        with ``in_out_factors()`` is folded into the Kronecker factors where the mode can
        fold; otherwise the gradient is multiplied by its dense factor (``apply``) first.
        """
        g = g_Bx.astype(jnp.float32)
        if scale is None:
            return self.project_leaf(path, g, factors=factors)
        in_out = scale.in_out_factors() if self.can_fold else None
        if in_out is not None:
            row_scale, col_scale = in_out
            return self.project_leaf(
                path, g, row_scale=row_scale, col_scale=col_scale, factors=factors
            )
        return self.project_leaf(path, scale.apply(g, jnp.float32), factors=factors)

    def combine(self, blocks: list[jax.Array]) -> jax.Array:
        """Combines per-leaf blocks (in parameter order) into ``B x dim`` vectors."""
        if len(blocks) != len(self.paths):
            raise ProjectionError(f"expected {len(self.paths)} blocks, got {len(blocks)}")
        if self.mode == "per_tensor":
            return jnp.concatenate(blocks, axis=1)
        total = blocks[0]
        for block in blocks[1:]:
            total = total + block
        return total

    def project(self, grads: PyTree) -> jax.Array:
        """Projects a gradient pytree with a leading batch axis to ``B x dim`` (float32)."""
        named = named_leaves(grads)
        got = [p for p, _ in named]
        if got != self.paths:
            raise ProjectionError(
                "gradient paths do not match the projector's parameters: missing "
                f"{sorted(set(self.paths) - set(got))}, extra {sorted(set(got) - set(self.paths))}"
            )
        factors = self.leaf_factors()
        return self.combine([self.project_leaf(p, g, factors=factors[p]) for p, g in named])

    def dense_matrix(self) -> jax.Array:
        """The full ``dim x |theta|`` matrix (columns: leaves in order, each flattened row-major).

        Built from the same factors (``A_l^T kron B_l^T`` per block); for tests on small models.
        """
        cols = []
        factors = self.leaf_factors()
        for path in self.paths:
            if self.mode == "dense":
                cols.append(factors[path][0])
                continue
            a, b = factors[path]
            block = jnp.kron(a.T, b.T)
            if self.mode == "per_tensor":
                i = self.paths.index(path)
                block_rows = self.k_in * self.k_out
                full = jnp.zeros((self.dim, block.shape[1]), jnp.float32)
                block = full.at[i * block_rows : (i + 1) * block_rows].set(block)
            cols.append(block)
        return jnp.concatenate(cols, axis=1)

    def config(self) -> dict[str, Any]:
        """What identifies this projection, for store metadata and compatibility checks."""
        h = hashlib.sha256()
        for path, shape in self.shapes.items():
            h.update(f"{path}:{shape};".encode())
        return {
            "mode": self.mode,
            "seed": int(self.seed),
            "k_in": self.k_in,
            "k_out": self.k_out,
            "dense_dim": self.dense_dim if self.mode == "dense" else None,
            "dim": self.dim,
            "params_hash": h.hexdigest()[:16],
            "factors_hash": self.factors_fingerprint(),
        }

    def factors_fingerprint(self) -> str:
        """A hash of the generated factors of the smallest tensor.

        Seed, mode and widths do not pin the values: a change in how factors are generated
        (key derivation, chunking) gives uncorrelated vectors for the same example. Hashing
        real generated values makes stores from another generator refuse each other.
        """
        path = min(self.paths, key=lambda p: (sum(matrix_shape(self.shapes[p])), p))
        h = hashlib.sha256(path.encode())
        for factor in self.factors(path):
            # A few values at 2 decimals: a new generator changes them all, while last-ulp
            # differences between backends almost never cross a rounding boundary.
            sample = np.asarray(factor, np.float64).reshape(-1)[:8] * np.sqrt(self.k_in)
            h.update(np.round(sample, 2).tobytes())
        return h.hexdigest()[:16]

    def _shape(self, path: str) -> tuple[int, ...]:
        try:
            return self.shapes[path]
        except KeyError:
            raise ProjectionError(
                f"no parameter {path!r} in this projector (it has {len(self.paths)} tensors, "
                f"e.g. {self.paths[:3]}); build the Projector from the same params"
            ) from None


# Rows per generated chunk: a tensor's factor is its chunks' rows, cut to length, so its values
# depend only on its own key while all tensors share one batched normal() call.
_CHUNK_ROWS = 64


def _chunked_normal(
    keys_Px2: jax.Array, n_rows: list[int], width: int, std: float
) -> list[jax.Array]:
    """One ``n_rows[i] x width`` Gaussian matrix per parent key, from a single batched call."""
    n_chunks = [-(-n // _CHUNK_ROWS) for n in n_rows]
    parents = jnp.repeat(keys_Px2, np.asarray(n_chunks), axis=0, total_repeat_length=sum(n_chunks))
    chunk_ids = jnp.asarray(np.concatenate([np.arange(c) for c in n_chunks]), jnp.uint32)
    chunk_keys = jax.vmap(jax.random.fold_in)(parents, chunk_ids)
    z_CxRxW = jax.vmap(lambda k: jax.random.normal(k, (_CHUNK_ROWS, width), jnp.float32))(
        chunk_keys
    )
    out, start = [], 0
    for n, c in zip(n_rows, n_chunks, strict=True):
        out.append(z_CxRxW[start : start + c].reshape(c * _CHUNK_ROWS, width)[:n] * std)
        start += c
    return out


def from_meta(params: Any, projection: dict) -> Projector:
    """The projector a store's vectors were made with, rebuilt from ``StoreMeta.projection``
    over ``params`` (the factors are regenerated from the seed; ``store.check_compatible`` then
    compares their fingerprint with the store's). Raises ``ValueError`` naming the settings when
    they cannot be rebuilt."""
    try:
        return Projector(
            params,
            projection.get("mode"),
            int(projection.get("k_in") or 1),
            int(projection.get("k_out") or 1),
            int(projection.get("seed") or 0),
            int(projection.get("dense_dim") or 1),
        )
    except (TypeError, ValueError) as e:
        raise ValueError(f"the store's projection {projection} cannot be rebuilt: {e}") from e
