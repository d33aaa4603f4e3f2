"""Gauss-Newton Hessian approximation on projected vectors and its inverse roots.

R_train is the mean of u uᵀ over a deterministic sample of training vectors, R_eval the mean over
query (task) vectors, and R = λ R_eval + (1 − λ) R_train. Scoring applies R^{-1/2} (or, for the
one-sided TRAK preset, R_train^{-1}) with one matmul per chunk, so this module produces those
d×d transforms once and saves them with the spectra and the chosen λ.

R_train is one reduction on a mesh (one device is a 1-device mesh): train rows sharded over
every device, each device summing its own u uᵀ terms in Kahan-compensated float32, one ``psum``
at the end; its result is float64 from there on. R_eval (the queries: few rows, read whole by
every process) is summed on the host in float64. λ, the eigendecompositions and the transforms
run on the host in float64 numpy (``numpy.linalg.eigh`` at d ≤ 16384 is a one-off cost next to
featurizing). Vectors arrive as any of: an array ``vectors_NxD``, an iterable of
``(ids_N, vectors_NxD)`` chunks, or a store object with ``iter_chunks()``
(``trackstar.store.VectorStore``); see ``trackstar.rows``.

Low rank: R built from r = n_t + n_e < d rows has rank ≤ r, and R = WᵀW with W the r stacked,
weighted rows. Then (R + δI)^p = δ^p I + Q diag((s + δ)^p − δ^p) Qᵀ exactly, with s, V from
the r × r Gram matrix W Wᵀ = V diag(s) Vᵀ and Q = Wᵀ V diag(s)^{-1/2} (d × r, orthonormal).
``hessian.low_rank`` ("auto": when r < d) fits that form (``LowRankRoot``) without any d × d
matrix: fit O(d·r² + r³), memory O(d·r), applying it O(d·r) per row.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from trackstar import rows, store
from trackstar.files import atomic_write
from trackstar.sharding import ALL_AXES, default_mesh, mesh_size, row_sharding

SCHEMA_VERSION = 1
# hessian.low_rank: "auto" = the low-rank form when n_t + n_e < d, "never" = always the d×d
# eigendecomposition, "always" = the low-rank form whatever r.
LOW_RANK_MODES = ("auto", "never", "always")
# Column (dimension) block of the host Gram / basis passes over the rows (contiguous copies of
# rows × this many columns at a time).
_GRAM_BLOCK = 2048
# Names of the d×d transforms a fit can carry; score.py picks the one its preset needs.
TRANSFORM_NAMES = ("train_inv_sqrt", "train_inv", "mixed_inv_sqrt")
# Store-metadata keys that identify the vector space; a fit is valid only for stores that agree.
_IDENTITY_KEYS = (
    "dim",
    "model_fingerprint",
    "optimizer_fingerprint",
    "projection",
    "correction",
    "correction_settings",
)


class HessianError(ValueError):
    """Bad input to the Hessian stage, or a fit that does not match the vectors it is used on."""


# ----------------------------------------------------------------------------- Gauss-Newton


def sample_rows(num_rows: int, n: int, seed: int) -> np.ndarray | None:
    """A deterministic sample of ``n`` row positions out of ``num_rows``, sorted ascending.

    Returns None (meaning: every row) when ``n <= 0`` or ``n >= num_rows``.
    """
    if num_rows <= 0:
        raise HessianError("cannot sample from an empty store; featurize some examples first")
    if n <= 0 or n >= num_rows:
        return None
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(num_rows)]))
    return np.sort(rng.choice(num_rows, size=int(n), replace=False)).astype(np.int64)


@functools.cache
def _gn_step(mesh: Mesh) -> Callable:
    """The jitted per-device step: add this device's u uᵀ terms to its compensated sum."""
    spec = P(ALL_AXES)

    def local(acc_1xDxD, comp_1xDxD, u_NxD):
        # Kahan-compensated float32 running sum of this device's u uᵀ terms.
        term = jax.lax.dot(u_NxD.T, u_NxD, precision=jax.lax.Precision.HIGHEST)[None]
        y = term - comp_1xDxD
        t = acc_1xDxD + y
        return t, (t - acc_1xDxD) - y

    return jax.jit(
        jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=(spec, spec)),
        donate_argnums=(0, 1),
    )


@functools.cache
def _psum_all(mesh: Mesh) -> Callable:
    def local(acc_1xDxD):
        return jax.lax.psum(acc_1xDxD[0], ALL_AXES)

    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(ALL_AXES),), out_specs=P()))


def gauss_newton(
    chunks: Any,
    sample_ids: np.ndarray | None = None,
    *,
    sample_positions: np.ndarray | None = None,
    rows_per_step: int | None = None,
    mesh: Mesh | None = None,
) -> tuple[np.ndarray, int]:
    """Returns ``(R_DxD float64, rows_used)``: the mean of u uᵀ over the selected rows.

    Rows are sharded over every device of ``mesh`` (None: ``single_device_mesh()``); each device
    sums its own u uᵀ terms in Kahan-compensated float32 and one ``psum`` combines the devices.

    Args:
      chunks: an array ``(N, D)``, an iterable of ``(ids, vectors)`` chunks, or a store (on a
        mesh spanning processes: a ``VectorStore``, each process reading its own chunks).
      sample_ids: keep only rows whose example id is in this set (None: all rows).
      sample_positions: keep only rows at these 0-based positions in stream order (as returned
        by ``sample_rows``); exclusive with ``sample_ids``.
      rows_per_step: rows per jitted step (and the chunk size to request from a store or to cut
        an array into); default: the first chunk's size.
      mesh: the mesh whose devices share the rows.
    """
    if sample_ids is not None and sample_positions is not None:
        raise HessianError("pass sample_ids or sample_positions, not both")
    mesh = default_mesh(mesh)
    blocks, fixed_rows = rows.local_blocks(chunks, rows_per_step, mesh, HessianError)
    if sample_positions is not None and fixed_rows:
        # Each process reads only its own chunks: map stream positions to example ids.
        sample_ids = chunks.read_ids()[np.asarray(sample_positions, np.int64)]
        sample_positions = None
    keep_ids = None if sample_ids is None else np.unique(np.asarray(sample_ids, np.int64))
    keep_pos = None if sample_positions is None else np.unique(np.asarray(sample_positions))
    n_local = rows.local_mesh_devices(mesh)
    step = _gn_step(mesh)
    limit = rows.DispatchLimit()
    step_rows = rows_per_step or fixed_rows or None
    acc = comp = None
    dim = None
    used = 0
    offset = 0
    for ids_N, vecs_NxD in blocks:
        n = len(ids_N)
        if keep_ids is not None:
            vecs_NxD = vecs_NxD[np.isin(ids_N, keep_ids)]
        elif keep_pos is not None:
            lo, hi = np.searchsorted(keep_pos, [offset, offset + n])
            vecs_NxD = vecs_NxD[keep_pos[lo:hi] - offset]
        offset += n
        if dim is None:
            dim = int(vecs_NxD.shape[1])
            zeros = np.zeros((n_local, dim, dim), np.float32)
            acc = jax.make_array_from_process_local_data(row_sharding(mesh), zeros)
            comp = jax.make_array_from_process_local_data(row_sharding(mesh), zeros)
        elif vecs_NxD.shape[1] != dim:
            raise HessianError(f"chunks disagree in dimension: {vecs_NxD.shape[1]} vs {dim}")
        if not np.all(np.isfinite(vecs_NxD)):
            raise HessianError("non-finite values in the vectors; re-featurize the store")
        if step_rows is None:
            if n == 0:
                continue
            step_rows = n
        padded = rows.round_up(step_rows, n_local)
        ids_kept = np.zeros(len(vecs_NxD), np.int64)  # ids are not needed by the sum
        for piece_ids, piece in rows.pieces(ids_kept, vecs_NxD, step_rows, fixed_rows):
            _, _, u = rows.global_rows(mesh, padded, piece_ids, piece, dim)
            acc, comp = step(acc, comp, u)
            limit.wait(acc)
        used += len(vecs_NxD)
    used = rows.sum_over_processes(used, mesh)
    if dim is None or used == 0:
        raise HessianError(
            "no rows selected for the Gauss-Newton matrix; check that the store is not empty "
            "and that the sample ids exist in it"
        )
    R = rows.fetch_replicated(_psum_all(mesh)(acc)).astype(np.float64)
    return R / used, used


# ----------------------------------------------------------------------------- lambda, roots


def _parse_rule(rule: Any) -> float | str:
    if isinstance(rule, bool):
        raise HessianError(
            f"lambda_mix must be a number in [0, 1], 'auto' or 'auto_trace'; got {rule!r}"
        )
    if isinstance(rule, int | float | np.floating | np.integer):
        value = float(rule)
    elif isinstance(rule, str) and rule.strip() in ("auto", "auto_trace"):
        return rule.strip()
    else:
        try:
            value = float(str(rule).strip())
        except ValueError:
            raise HessianError(
                f"lambda_mix must be a number in [0, 1], 'auto' or 'auto_trace'; got {rule!r}"
            ) from None
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise HessianError(f"lambda_mix = {value} is outside [0, 1]; use a value in [0, 1]")
    return value


def _descending_eigvals(R: np.ndarray) -> np.ndarray:
    return np.clip(np.linalg.eigvalsh(_symmetric(R))[::-1], 0.0, None)


def _symmetric(R: np.ndarray) -> np.ndarray:
    R = np.asarray(R, np.float64)
    if R.ndim != 2 or R.shape[0] != R.shape[1]:
        raise HessianError(f"expected a square matrix, got shape {R.shape}")
    if not np.all(np.isfinite(R)):
        raise HessianError("the matrix has non-finite entries; refit from finite vectors")
    return 0.5 * (R + R.T)


def crossing_component(d: int, crossing_per_65536: float) -> int:
    """The component index c = round(d · crossing_per_65536 / 65536), clipped to [0, d-1]."""
    if crossing_per_65536 < 0:
        raise HessianError(f"crossing_per_65536 must be >= 0, got {crossing_per_65536}")
    return int(min(max(round(d * crossing_per_65536 / 65536), 0), d - 1))


def mix_lambda(
    R_eval: np.ndarray | None,
    R_train: np.ndarray | None,
    rule: Any,
    d: int,
    crossing_per_65536: float = 1000,
    *,
    eig_eval: np.ndarray | None = None,
    eig_train: np.ndarray | None = None,
) -> float:
    """The mixing weight λ of R = λ R_eval + (1 − λ) R_train, in [0, 1].

    Args:
      R_eval, R_train: the two d×d Gauss-Newton matrices.
      rule: a number in [0, 1] (a numeric string such as "0.9" is accepted); ``"auto"``: λ so
        that the descending eigenvalue curves of λ R_eval and (1 − λ) R_train cross at
        component c = round(d · crossing_per_65536 / 65536); ``"auto_trace"``:
        λ tr R_eval = (1 − λ) tr R_train.
      d: the vector dimension (checked against the matrices).
      crossing_per_65536: see ``"auto"``.
      eig_eval, eig_train: precomputed eigenvalues (any order) to skip the decompositions.
    """
    parsed = _parse_rule(rule)
    if isinstance(parsed, float):
        return parsed
    for name, R in (("R_eval", R_eval), ("R_train", R_train)):
        if R is not None and np.shape(R) != (d, d):
            raise HessianError(f"{name} has shape {np.shape(R)}, expected ({d}, {d})")
    if parsed == "auto_trace":
        t_eval = float(np.trace(R_eval)) if R_eval is not None else float(np.sum(eig_eval))
        t_train = float(np.trace(R_train)) if R_train is not None else float(np.sum(eig_train))
        if t_eval + t_train <= 0:
            raise HessianError("both traces are zero; the stores hold only zero vectors")
        return t_train / (t_eval + t_train)
    e_eval = np.sort(eig_eval)[::-1] if eig_eval is not None else _descending_eigvals(R_eval)
    e_train = np.sort(eig_train)[::-1] if eig_train is not None else _descending_eigvals(R_train)
    if len(e_eval) != d or len(e_train) != d:
        raise HessianError(f"expected {d} eigenvalues, got {len(e_eval)} and {len(e_train)}")
    c = crossing_component(d, crossing_per_65536)
    a, b = max(float(e_eval[c]), 0.0), max(float(e_train[c]), 0.0)
    if a + b <= 0:
        raise HessianError(
            f"both spectra are zero at component c = {c}, so 'auto' has no crossing; use a "
            "numeric lambda_mix, 'auto_trace', a smaller crossing_per_65536 or more eval rows"
        )
    return b / (a + b)


def _check_damping(damping: float) -> None:
    if not (math.isfinite(damping) and damping >= 0):
        raise HessianError(f"damping must be a finite number >= 0, got {damping}")


_SINGULAR = (
    "R is singular and damping is 0, so its inverse does not exist; set "
    "hessian.damping > 0 (default 0.1) or use more rows"
)


def _damped_eigh(R: np.ndarray, damping: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns (eigenvalues ascending clipped, eigenvectors, damped eigenvalues)."""
    _check_damping(damping)
    evals, evecs = np.linalg.eigh(_symmetric(R))
    # R is a mean of outer products (PSD); negatives are round-off.
    evals = np.clip(evals, 0.0, None)
    damped = evals + damping * float(np.mean(evals))
    if np.any(damped <= 0):
        raise HessianError(_SINGULAR)
    return evals, evecs, damped


def inverse_sqrt(R: np.ndarray, damping: float) -> tuple[np.ndarray, np.ndarray]:
    """Returns ``(R^{-1/2} float64 d×d, eigenvalues of R descending)``.

    Symmetric eigendecomposition R = V diag(l) Vᵀ with l clipped at 0, then
    V diag((l + damping · mean l)^{-1/2}) Vᵀ.
    """
    evals, evecs, damped = _damped_eigh(R, damping)
    return (evecs * damped**-0.5) @ evecs.T, evals[::-1].copy()


# ----------------------------------------------------------------------------- low rank


def low_rank_mode(value: Any) -> str:
    """``hessian.low_rank`` checked: one of ``LOW_RANK_MODES``."""
    mode = str(value).strip() if isinstance(value, str) else value
    if mode not in LOW_RANK_MODES:
        raise HessianError(
            f"hessian.low_rank must be one of {', '.join(map(repr, LOW_RANK_MODES))}; got {value!r}"
        )
    return mode


def use_low_rank(mode: str, dim: int, n_rows: int | None) -> bool:
    """Whether a fit from ``n_rows`` = n_t + n_e rows takes the low-rank form.

    "auto": when the row count is known and below d (then the d·r basis is smaller than the
    d×d matrix and the r×r eigendecomposition cheaper than the d×d one); "never" / "always".
    """
    mode = low_rank_mode(mode)
    if mode != "auto":
        return mode == "always"
    return n_rows is not None and 0 < n_rows < int(dim)


def _descending_padded(s: np.ndarray, dim: int) -> np.ndarray:
    """Gram eigenvalues as R's spectrum: clipped at 0, descending, zero-padded to ``dim``."""
    s = np.sort(np.clip(np.asarray(s, np.float64), 0.0, None))[::-1]
    if len(s) >= dim:
        return s[:dim].copy()
    return np.concatenate([s, np.zeros(dim - len(s))])


def root_coefficients(s: np.ndarray, delta: float, power: float) -> tuple[np.ndarray, float]:
    """``(coef, scale)`` with (s + δ)^p = scale + coef, for p = -1/2 or -1, δ > 0.

    coef = (s + δ)^p − δ^p is written without the difference (no cancellation for s ≪ δ).
    """
    s = np.asarray(s, np.float64)
    if power == -0.5:
        a, b = np.sqrt(s + delta), math.sqrt(delta)
        return -s / (a * b * (a + b)), 1.0 / b
    if power == -1.0:
        return -s / (delta * (s + delta)), 1.0 / delta
    raise HessianError(f"power must be -0.5 or -1, got {power}")


@dataclasses.dataclass
class LowRankRoot:
    """(R + δI)^p = ``scale`` · I + Q diag(``coef``) Qᵀ, Q = ``basis`` (d × k, orthonormal).

    ``basis_name`` names the basis it shares with the fit's other roots ("train": R_train's,
    "mixed": the mixed R's). Q is float32 (like the dense transforms), computed in the rows' dtype;
    ``coef`` and ``scale`` are float64.
    """

    basis_name: str
    basis: np.ndarray
    coef: np.ndarray
    scale: float

    @property
    def dim(self) -> int:
        return int(self.basis.shape[0])

    def apply(self, vectors_NxD: Any) -> np.ndarray:
        """(R + δI)^p applied to each row: O(d·k) per row, no d×d matrix.

        float64 rows are transformed in float64, anything else in float32 (the scorer's
        precision).
        """
        x = np.asarray(vectors_NxD)
        dt = np.float64 if x.dtype == np.float64 else np.float32
        x = x.astype(dt, copy=False)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise HessianError(f"expected rows of shape (N, {self.dim}), got {x.shape}")
        Q = self.basis.astype(dt, copy=False)
        return self.scale * x + ((x @ Q) * self.coef.astype(dt)) @ Q.T

    def dense(self, block: int = 1024) -> np.ndarray:
        """The d×d float32 matrix (float64 arithmetic, ``block`` rows at a time)."""
        d = self.dim
        Q = self.basis.astype(np.float64)
        Qc = Q * self.coef
        out = np.empty((d, d), np.float32)
        for start in range(0, d, block):
            stop = min(start + block, d)
            piece = Qc[start:stop] @ Q.T
            piece[np.arange(stop - start), np.arange(start, stop)] += self.scale
            out[start:stop] = piece
        return out


class _DenseView(Mapping):
    """name → d×d float32 of a low-rank fit, materialized on first access and kept."""

    def __init__(self, roots: Mapping[str, LowRankRoot]):
        self._roots = roots
        self._cache: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._cache:
            self._cache[name] = self._roots[name].dense()
        return self._cache[name]

    def __contains__(self, name: object) -> bool:  # without materializing (Mapping's default)
        return name in self._roots

    def __iter__(self):
        return iter(self._roots)

    def __len__(self) -> int:
        return len(self._roots)


def _product_dtype(parts: Sequence[np.ndarray]) -> type:
    """The dtype of the Gram and basis products: float32 rows (every store's) multiply in
    float32 BLAS, twice float64's rate at half the memory; float64 rows stay float64."""
    return np.float64 if any(p.dtype == np.float64 for p in parts) else np.float32


def _column_block(parts: Sequence[np.ndarray], start: int, stop: int, dtype: type) -> np.ndarray:
    """Columns ``start:stop`` of the row-stacked ``parts``, as one contiguous array."""
    return np.concatenate([np.asarray(p[:, start:stop], dtype) for p in parts])


def _finite(G: np.ndarray) -> np.ndarray:
    """``G`` (exactly symmetric by construction) after a finiteness check, uncopied."""
    if not np.all(np.isfinite(G)):
        raise HessianError("the Gram matrix has non-finite entries; refit from finite vectors")
    return G


def _scale_both_sides(K: np.ndarray, w: np.ndarray) -> np.ndarray:
    """diag(w) K diag(w), in place (``K`` is not used afterwards)."""
    K *= w[:, None]
    K *= w[None, :]
    return K


def _gram(parts: Sequence[np.ndarray], block: int = _GRAM_BLOCK) -> np.ndarray:
    """U Uᵀ (N×N, float64) for U = the row-stacked ``parts``, over column blocks.

    Each block's product is in ``_product_dtype`` and the blocks sum in float64, so float32
    rows lose about sqrt(block) float32 roundings per entry, not sqrt(d).
    """
    n, d = sum(len(p) for p in parts), parts[0].shape[1]
    dtype = _product_dtype(parts)
    K = np.zeros((n, n), np.float64)
    for start in range(0, d, block):
        Uc = _column_block(parts, start, start + block, dtype)
        K += Uc @ Uc.T  # one operand transposed: numpy takes the symmetric (syrk) product
    return 0.5 * (K + K.T)


def _basis(
    parts: Sequence[np.ndarray],
    sqrt_w_N: np.ndarray,
    V_NxK: np.ndarray,
    s_K: np.ndarray,
    block: int,
) -> np.ndarray:
    """Q = Wᵀ V diag(s)^{-1/2} (d × k float32), W = diag(sqrt_w) U, the products in
    ``_product_dtype`` (float32 rows: float32, about 1e-6 relative to float64's Q).

    ``V`` is overwritten (with diag(sqrt_w) V diag(s)^{-1/2}).
    """
    V_NxK *= sqrt_w_N[:, None]
    V_NxK /= np.sqrt(s_K)[None, :]
    dtype = _product_dtype(parts)
    B_NxK = V_NxK.astype(dtype, copy=False)
    d = parts[0].shape[1]
    Q = np.empty((d, B_NxK.shape[1]), np.float32)
    for start in range(0, d, block):
        Q[start : start + block] = _column_block(parts, start, start + block, dtype).T @ B_NxK
    return Q


def _low_rank_roots(
    parts: Sequence[np.ndarray],
    sqrt_w_N: np.ndarray,
    G_NxN: np.ndarray,
    damping: float,
    dim: int,
    powers: Mapping[str, float],
    basis_name: str,
    block: int = _GRAM_BLOCK,
) -> tuple[np.ndarray, dict[str, LowRankRoot]]:
    """R's descending spectrum (length d) and its damped roots from the Gram matrix of W.

    ``G`` = W Wᵀ with W = diag(sqrt_w) U, U the row-stacked ``parts``; δ = damping · tr R / d
    as in the dense path (the mean of R's d eigenvalues). Gram eigenvalues at or below
    r · ε · max are left out of the basis (directions R has only to round-off; their
    coefficients would be ≈ 0 anyway).
    """
    _check_damping(damping)
    if not powers:
        s = np.linalg.eigvalsh(_finite(G_NxN))
        return _descending_padded(s, dim), {}
    s, V = np.linalg.eigh(_finite(G_NxN))
    s = np.clip(s, 0.0, None)
    delta = damping * float(np.sum(s)) / dim
    if delta <= 0:
        raise HessianError(_SINGULAR + " (the low-rank form needs damping > 0)")
    tol = float(s.max(initial=0.0)) * max(len(s), 1) * np.finfo(np.float64).eps
    keep = s > tol
    s_k, V_k = (s, V) if keep.all() else (s[keep], V[:, keep])
    del V
    Q = _basis(parts, sqrt_w_N, V_k, s_k, block)
    roots = {}
    for name, power in powers.items():
        coef, scale = root_coefficients(s_k, delta, power)
        roots[name] = LowRankRoot(basis_name, Q, coef, scale)
    return _descending_padded(s, dim), roots


# ----------------------------------------------------------------------------- the fit


@dataclasses.dataclass
class HessianFit:
    """A fitted Hessian approximation: λ, spectra, the transforms for scoring, provenance.

    ``transforms`` maps names in ``TRANSFORM_NAMES`` to d×d float32 matrices (symmetric, applied
    as ``vectors_NxD @ T``). Spectra are float64, descending.

    A low-rank fit (``low_rank`` non-empty; ``use_low_rank``) holds each transform as a
    ``LowRankRoot`` instead: ``apply`` uses it at O(d·r) per row, and ``transforms`` /
    ``transform`` materialize the d×d float32 matrix on first access (for the d×d scorer).
    """

    dim: int
    lambda_mix: float | None
    damping: float
    rule: str
    eigenvalues: np.ndarray
    eig_train: np.ndarray
    eig_eval: np.ndarray | None
    transforms: Mapping[str, np.ndarray]
    provenance: dict = dataclasses.field(default_factory=dict)
    low_rank: dict[str, LowRankRoot] = dataclasses.field(default_factory=dict)
    # Values computed from the fit once and reused by its readers (trackstar.index keeps the
    # fingerprint and the checked, device-resident query transform here): a fit is not
    # modified after it is made, so they stay valid. Not saved, not compared.
    derived: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.low_rank:
            if self.transforms and not isinstance(self.transforms, _DenseView):
                raise HessianError("a fit holds either d×d transforms or low-rank roots, not both")
            self.transforms = _DenseView(self.low_rank)

    @property
    def is_low_rank(self) -> bool:
        """Whether the transforms are held as ``LowRankRoot`` (no d×d matrix stored)."""
        return bool(self.low_rank)

    def _check_name(self, name: str) -> None:
        if name not in self.transforms:
            raise HessianError(
                f"this Hessian fit has no {name!r} transform (it has {sorted(self.transforms)}); "
                f"refit with scripts/fit_hessian.py including {name!r}"
                + (" and an eval (query) store" if name.startswith("mixed") else "")
            )

    def transform(self, name: str) -> np.ndarray:
        """The d×d matrix ``name``; a missing one is an error that says how to refit.

        On a low-rank fit this builds the d×d float32 matrix (d²·r work, d² memory); prefer
        ``apply`` or ``low_rank_factors`` there.
        """
        self._check_name(name)
        return self.transforms[name]

    def apply(self, name: str, vectors_NxD: Any) -> np.ndarray:
        """Transform ``name`` applied to each row (T u; T is symmetric), on the host.

        Low-rank fits: O(d·r) per row without a d×d matrix. float64 rows are transformed in
        float64, anything else in float32.
        """
        self._check_name(name)
        x = np.asarray(vectors_NxD)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise HessianError(f"expected rows of shape (N, {self.dim}), got {x.shape}")
        if name in self.low_rank:
            return self.low_rank[name].apply(x)
        dt = np.float64 if x.dtype == np.float64 else np.float32
        return x.astype(dt, copy=False) @ np.asarray(self.transforms[name], dt)

    def low_rank_factors(self, name: str) -> tuple[float, np.ndarray, np.ndarray] | None:
        """``(scale, Q_DxK float32, coef_K float64)`` with T = scale·I + Q diag(coef) Qᵀ, or
        None when ``name`` is held as a d×d matrix."""
        self._check_name(name)
        root = self.low_rank.get(name)
        return None if root is None else (root.scale, root.basis, root.coef)

    def check_dim(self, dim: int, what: str = "the vectors") -> None:
        """Refuses vectors whose dimension differs from the fit's."""
        if int(dim) != self.dim:
            raise HessianError(
                f"the Hessian fit has d = {self.dim} but {what} have d = {dim}; the store was "
                "featurized with another projection: refit with scripts/fit_hessian.py"
            )

    def check_compatible(self, meta: Mapping | None, what: str = "the store") -> None:
        """Refuses a store whose dim, model/optimizer fingerprints or projection differ.

        Only keys present in both the fit's train-store metadata and ``meta`` are compared, so
        vectors without metadata (plain arrays) are checked on dimension alone.
        """
        if meta is None:
            return
        if "dim" in meta:
            self.check_dim(meta["dim"], what)
        fitted = self.provenance.get("train_meta") or {}
        diffs = [
            f"{key}: fit {fitted[key]!r} vs {what} {meta[key]!r}"
            for key in _IDENTITY_KEYS
            if key in fitted and key in meta and fitted[key] != meta[key]
        ]
        if diffs:
            raise HessianError(
                "the Hessian fit was made from vectors of another model or projection ("
                + "; ".join(diffs)
                + "); refit with scripts/fit_hessian.py on the stores you score"
            )

    def save(self, path: str) -> None:
        """Writes ``path`` (.npz: arrays + metadata) and a readable ``.json`` beside it.

        Both files are written to temporaries and renamed, so a crash leaves either the old
        pair or the new npz; ``load`` reads the npz alone.
        """
        if not path.endswith(".npz"):
            raise HessianError(f"a Hessian fit is saved as .npz; got {path!r}")
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        meta = {
            "schema_version": SCHEMA_VERSION,
            "dim": self.dim,
            "lambda_mix": self.lambda_mix,
            "damping": self.damping,
            "rule": self.rule,
            "transforms": sorted(self.transforms),
            "has_eig_eval": self.eig_eval is not None,
            "provenance": self.provenance,
        }
        if self.low_rank:
            meta["low_rank"] = {
                name: {"basis": root.basis_name, "scale": float(root.scale), "rank": len(root.coef)}
                for name, root in self.low_rank.items()
            }
        meta_text = json.dumps(meta, indent=2, sort_keys=True, default=_json_default)
        arrays = {
            "eigenvalues": self.eigenvalues,
            "eig_train": self.eig_train,
            "meta_json": np.array(meta_text),
        }
        if self.eig_eval is not None:
            arrays["eig_eval"] = self.eig_eval
        if self.low_rank:
            for name, root in self.low_rank.items():
                arrays[f"basis_{root.basis_name}"] = np.asarray(root.basis, np.float32)
                arrays[f"coef_{name}"] = np.asarray(root.coef, np.float64)
        else:
            for name, mat in self.transforms.items():
                arrays[f"transform_{name}"] = np.asarray(mat, np.float32)
        atomic_write(path, lambda f: np.savez(f, **arrays), binary=True)
        atomic_write(path[: -len(".npz")] + ".json", lambda f: f.write(meta_text + "\n"))

    @staticmethod
    def read_meta(path: str) -> dict | None:
        """The metadata ``save`` recorded (λ, transforms, provenance) without reading the d×d
        arrays; None when there is no readable fit at ``path``."""
        try:
            with np.load(path, allow_pickle=False) as z:
                return json.loads(str(z["meta_json"]))
        except (OSError, KeyError, ValueError):
            return None

    @classmethod
    def load(cls, path: str) -> HessianFit:
        """Reads a fit written by ``save``; other schema versions are refused."""
        if not os.path.isfile(path):
            raise HessianError(f"no Hessian fit at {path!r}; run scripts/fit_hessian.py first")
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta_json"]))
            if meta.get("schema_version") != SCHEMA_VERSION:
                raise HessianError(
                    f"{path!r} has schema version {meta.get('schema_version')}, this code reads "
                    f"{SCHEMA_VERSION}; refit with scripts/fit_hessian.py"
                )
            low_rank: dict[str, LowRankRoot] = {}
            transforms: dict[str, np.ndarray] = {}
            if meta.get("low_rank"):
                bases: dict[str, np.ndarray] = {}
                for name, info in meta["low_rank"].items():
                    key = str(info["basis"])
                    if key not in bases:
                        bases[key] = z[f"basis_{key}"]
                    low_rank[name] = LowRankRoot(
                        key, bases[key], z[f"coef_{name}"], float(info["scale"])
                    )
            else:
                transforms = {name: z[f"transform_{name}"] for name in meta["transforms"]}
            return cls(
                dim=int(meta["dim"]),
                lambda_mix=meta["lambda_mix"],
                damping=float(meta["damping"]),
                rule=str(meta["rule"]),
                eigenvalues=z["eigenvalues"],
                eig_train=z["eig_train"],
                eig_eval=z["eig_eval"] if meta["has_eig_eval"] else None,
                transforms=transforms,
                provenance=meta["provenance"],
                low_rank=low_rank,
            )


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return str(obj)


def _read_eval_rows(source: Any, rows_per_step: int | None) -> np.ndarray:
    """Every query row of ``source`` (float32, or float64 when given so), checked finite."""
    chunks = rows.iter_vector_chunks(source, rows_per_step, HessianError)
    parts = [_as_float(v) for _, v in chunks]
    if not parts or sum(len(p) for p in parts) == 0:
        raise HessianError("the eval (query) store is empty; featurize the queries first")
    U_NxD = np.concatenate(parts)
    if not np.all(np.isfinite(U_NxD)):
        raise HessianError("non-finite values in the eval vectors; re-featurize the store")
    return U_NxD


_FLOATS = (np.float32, np.float64)


def _as_float(v: Any) -> np.ndarray:
    v = np.asarray(v)
    return v if v.dtype in _FLOATS else v.astype(np.float32)


def _read_train_rows(
    source: Any, positions: np.ndarray | None, expected: int | None, rows_per_step: int | None
) -> np.ndarray:
    """The train rows at ``positions`` (stream order; None = all), stacked, checked finite.

    Read on the host by every process (the low-rank path: fewer than d rows). ``expected``
    rows (when known) are written into one preallocated array instead of a list + copy.
    """
    if isinstance(source, np.ndarray) and source.ndim == 2 and source.dtype in _FLOATS:
        # An array is used in place (no copy): checked finite a block of rows at a time.
        picked = source if positions is None else source[np.asarray(positions, np.int64)]
        step = max(1, (1 << 24) // max(picked.shape[1], 1))
        for start in range(0, len(picked), step):
            if not np.all(np.isfinite(picked[start : start + step])):
                raise HessianError("non-finite values in the vectors; re-featurize the store")
        if len(picked) == 0:
            raise HessianError("no rows selected for the Gauss-Newton matrix")
        return picked
    keep = None if positions is None else np.unique(np.asarray(positions, np.int64))
    parts: list[np.ndarray] = []
    out = None
    used = offset = 0
    dim = None
    for ids_N, vecs_NxD in rows.iter_vector_chunks(source, rows_per_step, HessianError):
        n = len(ids_N)
        vecs_NxD = _as_float(vecs_NxD)
        if keep is not None:
            lo, hi = np.searchsorted(keep, [offset, offset + n])
            vecs_NxD = vecs_NxD[keep[lo:hi] - offset]
        offset += n
        if dim is None:
            dim = int(vecs_NxD.shape[1])
            if expected:
                out = np.empty((int(expected), dim), vecs_NxD.dtype)
        elif vecs_NxD.shape[1] != dim:
            raise HessianError(f"chunks disagree in dimension: {vecs_NxD.shape[1]} vs {dim}")
        if not np.all(np.isfinite(vecs_NxD)):
            raise HessianError("non-finite values in the vectors; re-featurize the store")
        if out is not None and used + len(vecs_NxD) <= len(out):
            out[used : used + len(vecs_NxD)] = vecs_NxD
        else:
            if out is not None:  # more rows than announced: fall back to a list
                parts.append(out[:used])
                out = None
            parts.append(np.array(vecs_NxD))
        used += len(vecs_NxD)
    if dim is None or used == 0:
        raise HessianError(
            "no rows selected for the Gauss-Newton matrix; check that the store is not empty "
            "and that the sample ids exist in it"
        )
    if out is not None:
        return out[:used]
    return np.concatenate(parts)


def _eval_moments(source: Any, rows_per_step: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    """R_eval, its descending spectrum and the row count, for a (small) set of query vectors.

    With n < d rows, R_eval = UᵀU/n has the same nonzero eigenvalues as the n×n Gram matrix
    UUᵀ/n, so the spectrum costs an n×n decomposition instead of a d×d one.
    """
    U_NxD = _read_eval_rows(source, rows_per_step).astype(np.float64)
    n, d = U_NxD.shape
    R_DxD = U_NxD.T @ U_NxD / n
    if n < d:
        gram = np.clip(np.linalg.eigvalsh(_symmetric(U_NxD @ U_NxD.T / n))[::-1], 0.0, None)
        eigs = np.concatenate([gram, np.zeros(d - n)])
    else:
        eigs = _descending_eigvals(R_DxD)
    return R_DxD, eigs, n


def _as_store_meta(meta: Any) -> store.StoreMeta | None:
    """``meta`` as a ``StoreMeta`` when it is store metadata (an object or its dict form)."""
    if isinstance(meta, store.StoreMeta):
        return meta
    if isinstance(meta, Mapping) and "schema_version" in meta:
        return store.StoreMeta.from_dict(dict(meta))
    return None


def check_sources_compatible(train_meta: Any, eval_meta: Any) -> None:
    """Refuses an R_eval source featurized unlike the train source.

    Both are store metadata (``StoreMeta`` or its dict, e.g. from ``rows.source_meta``) or None;
    when both are store metadata they must pass ``store.check_compatible`` (model, optimizer
    state, every projection field, correction and its settings, dim). Sources without
    metadata (plain arrays) are checked on dimension alone, by the fit itself.

    Raises:
      store.StoreMismatchError: naming each differing field with both values.
    """
    train, other = _as_store_meta(train_meta), _as_store_meta(eval_meta)
    if train is not None and other is not None:
        store.check_compatible(train, other, names=("train", "R_eval"))


def cfg_get(cfg: Any, key: str, default: Any) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def fit_hessian(
    train_chunks: Any,
    eval_vectors: Any | None,
    cfg_hessian: Any,
    dim: int,
    *,
    transforms: Sequence[str] | None = None,
    provenance: Mapping | None = None,
    rows_per_step: int | None = None,
    mesh: Mesh | None = None,
) -> HessianFit:
    """Fits R_train (sampled), R_eval, λ and the scoring transforms.

    R_train is ``gauss_newton`` on ``mesh`` (None: one device); R_eval is summed on the host
    in float64 by every process (the query vectors are few).

    Args:
      train_chunks: the train vectors (array, chunk iterable or store).
      eval_vectors: the query vectors for R_eval (array, chunk iterable or store), or None to
        fit R_train alone (presets with ``hessian="train"``).
      cfg_hessian: the ``hessian`` config section (lambda_mix, crossing_per_65536, damping,
        train_sample, sample_seed, low_rank); a dict works too. ``low_rank`` ("auto" when
        absent): ``use_low_rank`` on n_t + n_e decides between the low-rank fit
        (``fit_low_rank``: rows read on the host, no d×d matrix) and the d×d one.
      dim: the expected vector dimension; vectors of another d are refused.
      transforms: names from ``TRANSFORM_NAMES`` to compute; None = every one the inputs allow.
      provenance: extra facts to record (store paths, ...); store metadata is added
        automatically as ``train_meta`` / ``eval_meta``.
      rows_per_step: chunk size for arrays / store reads.
      mesh: the mesh the train rows are sharded over (a store when it spans processes).
    """
    wanted = list(transforms) if transforms is not None else list(TRANSFORM_NAMES)
    if transforms is None and eval_vectors is None:
        wanted.remove("mixed_inv_sqrt")
    unknown = sorted(set(wanted) - set(TRANSFORM_NAMES))
    if unknown:
        raise HessianError(f"unknown transforms {unknown}; choose from {TRANSFORM_NAMES}")
    if "mixed_inv_sqrt" in wanted and eval_vectors is None:
        raise HessianError("the mixed R needs eval (query) vectors; pass an eval store")
    n_sample = int(cfg_get(cfg_hessian, "train_sample", 0))
    seed = int(cfg_get(cfg_hessian, "sample_seed", 0))

    if eval_vectors is not None:
        # Before any vector is read: an R_eval made with another projection, checkpoint or
        # correction would be mixed into R without an error otherwise.
        check_sources_compatible(
            getattr(train_chunks, "meta", None), getattr(eval_vectors, "meta", None)
        )
    prov: dict[str, Any] = dict(provenance or {})
    for key, src in (("train_meta", train_chunks), ("eval_meta", eval_vectors)):
        meta = rows.source_meta(src) if src is not None else None
        if meta is not None:
            prov.setdefault(key, meta)
            if "dim" in meta and int(meta["dim"]) != int(dim):
                raise HessianError(
                    f"{key[:-5]} store has d = {meta['dim']} but d = {dim} was asked for; "
                    "refeaturize or fit with the store's d"
                )

    positions = None
    num_rows = rows.source_num_rows(train_chunks)
    if n_sample > 0:
        if num_rows is None:
            raise HessianError(
                "hessian.train_sample > 0 needs a train source with a known row count (a store "
                "or an array); set train_sample = 0 to use every row of a chunk iterable"
            )
        positions = sample_rows(num_rows, n_sample, seed)
    mesh = default_mesh(mesh)
    mode = low_rank_mode(cfg_get(cfg_hessian, "low_rank", "auto"))
    n_train_planned = None
    if num_rows is not None:
        n_train_planned = num_rows if positions is None else len(positions)
    U_eval = None
    n_eval_planned = 0
    if eval_vectors is not None:
        n_eval_planned = rows.source_num_rows(eval_vectors)
        if n_eval_planned is None and mode == "auto":
            U_eval = _read_eval_rows(eval_vectors, rows_per_step)
            n_eval_planned = len(U_eval)
    n_planned = None
    if n_train_planned is not None and n_eval_planned is not None:
        n_planned = n_train_planned + n_eval_planned
    if use_low_rank(mode, dim, n_planned):
        U_train = _read_train_rows(train_chunks, positions, n_train_planned, rows_per_step)
        if eval_vectors is not None and U_eval is None:
            U_eval = _read_eval_rows(eval_vectors, rows_per_step)
        for name, U in (("train", U_train), ("eval", U_eval)):
            if U is not None and U.shape[1] != dim:
                raise HessianError(
                    f"{name} vectors have d = {U.shape[1]} but d = {dim} was asked for; refit "
                    "against the store's projection"
                )
        prov.update(
            train_rows_total=num_rows,
            train_rows_used=len(U_train),
            train_sample_seed=seed,
            mesh_devices=mesh_size(mesh),
        )
        if U_eval is not None:
            prov["eval_rows_used"] = len(U_eval)
        return fit_low_rank(U_train, U_eval, cfg_hessian, dim, wanted=wanted, provenance=prov)

    R_train, n_train = gauss_newton(
        train_chunks, sample_positions=positions, rows_per_step=rows_per_step, mesh=mesh
    )
    if R_train.shape[0] != dim:
        raise HessianError(
            f"train vectors have d = {R_train.shape[0]} but d = {dim} was asked for; refit "
            "against the store's projection"
        )
    prov.update(
        train_rows_total=num_rows,
        train_rows_used=n_train,
        train_sample_seed=seed,
        mesh_devices=mesh_size(mesh),
        representation="dense",
    )

    R_eval, eig_eval = None, None
    if eval_vectors is not None:
        source = eval_vectors if U_eval is None else U_eval
        R_eval, eig_eval, n_eval = _eval_moments(source, rows_per_step)
        prov["eval_rows_used"] = n_eval
    return fit_from_moments(
        R_train, R_eval, cfg_hessian, dim, wanted=wanted, provenance=prov, eig_eval=eig_eval
    )


def _fit_settings(
    cfg_hessian: Any, provenance: Mapping | None, has_eval: bool
) -> tuple[float, Any, float]:
    """``(damping, lambda rule, crossing_per_65536)`` of the ``hessian`` section; with an eval
    source, first refuses one featurized unlike the train store (``check_sources_compatible``)."""
    prov_in = provenance or {}
    if has_eval:
        check_sources_compatible(prov_in.get("train_meta"), prov_in.get("eval_meta"))
    return (
        float(cfg_get(cfg_hessian, "damping", 0.1)),
        cfg_get(cfg_hessian, "lambda_mix", "auto_trace"),
        float(cfg_get(cfg_hessian, "crossing_per_65536", 1000)),
    )


def fit_from_moments(
    R_train: np.ndarray,
    R_eval: np.ndarray | None,
    cfg_hessian: Any,
    dim: int,
    *,
    wanted: Sequence[str] = TRANSFORM_NAMES,
    provenance: Mapping | None = None,
    eig_eval: np.ndarray | None = None,
) -> HessianFit:
    """λ, the damped eigendecompositions and the scoring transforms from R_train and R_eval.

    ``fit_hessian`` calls it with the sums it accumulated; it is public for callers that
    accumulate R themselves. Store metadata recorded in
    ``provenance`` (``train_meta`` / ``eval_meta``) must pass ``check_sources_compatible``, so
    every fit refuses an R_eval store featurized unlike the train store.
    """
    damping, rule, crossing = _fit_settings(cfg_hessian, provenance, R_eval is not None)
    out: dict[str, np.ndarray] = {}
    if "train_inv_sqrt" in wanted or "train_inv" in wanted:
        evals, evecs, damped = _damped_eigh(R_train, damping)
        eig_train = evals[::-1].copy()
        if "train_inv_sqrt" in wanted:
            out["train_inv_sqrt"] = ((evecs * damped**-0.5) @ evecs.T).astype(np.float32)
        if "train_inv" in wanted:
            out["train_inv"] = ((evecs / damped) @ evecs.T).astype(np.float32)
        del evecs
    else:
        # Eigenvalues alone cost about a third less than the full decomposition.
        eig_train = _descending_eigvals(R_train)

    lam = None
    eigenvalues = eig_train
    if R_eval is not None:
        if R_eval.shape[0] != dim:
            raise HessianError(
                f"eval vectors have d = {R_eval.shape[0]} but train vectors have d = {dim}; "
                "featurize both with the same projection"
            )
        if eig_eval is None:
            eig_eval = _descending_eigvals(R_eval)
        lam = mix_lambda(
            R_eval, R_train, rule, dim, crossing, eig_eval=eig_eval, eig_train=eig_train
        )
        if "mixed_inv_sqrt" in wanted:
            mixed, eigenvalues = inverse_sqrt(lam * R_eval + (1.0 - lam) * R_train, damping)
            out["mixed_inv_sqrt"] = mixed.astype(np.float32)
        else:
            eigenvalues = _descending_eigvals(lam * R_eval + (1.0 - lam) * R_train)
    return HessianFit(
        dim=int(dim),
        lambda_mix=lam,
        damping=damping,
        rule=str(rule),
        eigenvalues=eigenvalues,
        eig_train=eig_train,
        eig_eval=eig_eval,
        transforms=out,
        provenance=dict(provenance or {}),
    )


def fit_low_rank(
    U_train: np.ndarray,
    U_eval: np.ndarray | None,
    cfg_hessian: Any,
    dim: int,
    *,
    wanted: Sequence[str] = TRANSFORM_NAMES,
    provenance: Mapping | None = None,
    block: int = _GRAM_BLOCK,
) -> HessianFit:
    """The fit of ``fit_from_moments`` from the rows themselves, without a d×d matrix.

    With U_t (n_t × d) and U_e (n_e × d): R_train = U_tᵀU_t / n_t, R_eval = U_eᵀU_e / n_e and
    R = WᵀW for W = [sqrt(λ/n_e) U_e; sqrt((1 − λ)/n_t) U_t]. One float64 Gram matrix K of the
    stacked rows (r × r, r = n_e + n_t) gives every spectrum (R_train's from K_tt / n_t,
    R_eval's from K_ee / n_e, R's from diag(sqrt w) K diag(sqrt w)), so all three λ rules
    work as in the dense path ("auto" reads e[c] of the zero-padded spectra). Each wanted
    transform becomes a ``LowRankRoot``; δ = damping · tr R / d, as there.

    Cost: O(d·r²) for K and each basis, O(r³) for the eigendecompositions; memory O(d·r).
    """
    prov_in = provenance or {}
    wanted = list(wanted)
    if U_eval is None and "mixed_inv_sqrt" in wanted:
        raise HessianError("the mixed R needs eval (query) vectors; pass an eval store")
    damping, rule, crossing = _fit_settings(cfg_hessian, provenance, U_eval is not None)
    _check_damping(damping)
    U_train = _as_float(U_train)
    n_t = len(U_train)
    if n_t == 0 or U_train.ndim != 2:
        raise HessianError("no train rows for the Gauss-Newton matrix")
    for name, U in (("train", U_train), ("eval", U_eval)):
        if U is not None and np.shape(U)[1] != dim:
            raise HessianError(
                f"{name} vectors have d = {np.shape(U)[1]} but d = {dim} was asked for; "
                "featurize both with the same projection"
            )
    parts = [U_train]
    if U_eval is not None:
        U_eval = _as_float(U_eval)
        if len(U_eval) == 0:
            raise HessianError("the eval (query) store is empty; featurize the queries first")
        parts = [U_eval, U_train]
    n_e = sum(len(p) for p in parts) - n_t
    # Rows stay as given (float32 from a store); every product below is float64.
    K = _gram(parts, block)

    train_powers = {
        name: power
        for name, power in (("train_inv_sqrt", -0.5), ("train_inv", -1.0))
        if name in wanted
    }
    sw_t = np.full(n_t, 1.0 / math.sqrt(n_t))
    eig_train, roots = _low_rank_roots(
        [U_train], sw_t, K[n_e:, n_e:] / n_t, damping, dim, train_powers, "train", block
    )
    lam = None
    eig_eval = None
    eigenvalues = eig_train
    if U_eval is not None:
        eig_eval = _descending_padded(np.linalg.eigvalsh(_symmetric(K[:n_e, :n_e] / n_e)), dim)
        lam = mix_lambda(None, None, rule, dim, crossing, eig_eval=eig_eval, eig_train=eig_train)
        w = np.concatenate([np.full(n_e, lam / n_e), np.full(n_t, (1.0 - lam) / n_t)])
        sw = np.sqrt(w)
        mixed_powers = {"mixed_inv_sqrt": -0.5} if "mixed_inv_sqrt" in wanted else {}
        eigenvalues, mixed = _low_rank_roots(
            parts, sw, _scale_both_sides(K, sw), damping, dim, mixed_powers, "mixed", block
        )
        roots.update(mixed)
    prov = dict(prov_in)
    prov["representation"] = "low_rank"
    prov["low_rank_rows"] = int(n_t + n_e)
    return HessianFit(
        dim=int(dim),
        lambda_mix=lam,
        damping=damping,
        rule=str(rule),
        eigenvalues=eigenvalues,
        eig_train=eig_train,
        eig_eval=eig_eval,
        transforms={},
        provenance=prov,
        low_rank=roots,
    )
