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


def _damped_eigh(R: np.ndarray, damping: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns (eigenvalues ascending clipped, eigenvectors, damped eigenvalues)."""
    if not (math.isfinite(damping) and damping >= 0):
        raise HessianError(f"damping must be a finite number >= 0, got {damping}")
    evals, evecs = np.linalg.eigh(_symmetric(R))
    # R is a mean of outer products (PSD); negatives are round-off.
    evals = np.clip(evals, 0.0, None)
    damped = evals + damping * float(np.mean(evals))
    if np.any(damped <= 0):
        raise HessianError(
            "R is singular and damping is 0, so its inverse does not exist; set "
            "hessian.damping > 0 (default 0.1) or use more rows"
        )
    return evals, evecs, damped


def inverse_sqrt(R: np.ndarray, damping: float) -> tuple[np.ndarray, np.ndarray]:
    """Returns ``(R^{-1/2} float64 d×d, eigenvalues of R descending)``.

    Symmetric eigendecomposition R = V diag(l) Vᵀ with l clipped at 0, then
    V diag((l + damping · mean l)^{-1/2}) Vᵀ.
    """
    evals, evecs, damped = _damped_eigh(R, damping)
    return (evecs * damped**-0.5) @ evecs.T, evals[::-1].copy()


# ----------------------------------------------------------------------------- the fit


@dataclasses.dataclass
class HessianFit:
    """A fitted Hessian approximation: λ, spectra, the transforms for scoring, provenance.

    ``transforms`` maps names in ``TRANSFORM_NAMES`` to d×d float32 matrices (symmetric, applied
    as ``vectors_NxD @ T``). Spectra are float64, descending.
    """

    dim: int
    lambda_mix: float | None
    damping: float
    rule: str
    eigenvalues: np.ndarray
    eig_train: np.ndarray
    eig_eval: np.ndarray | None
    transforms: dict[str, np.ndarray]
    provenance: dict = dataclasses.field(default_factory=dict)

    def transform(self, name: str) -> np.ndarray:
        """The d×d matrix ``name``; a missing one is an error that says how to refit."""
        if name not in self.transforms:
            raise HessianError(
                f"this Hessian fit has no {name!r} transform (it has {sorted(self.transforms)}); "
                f"refit with scripts/fit_hessian.py including {name!r}"
                + (" and an eval (query) store" if name.startswith("mixed") else "")
            )
        return self.transforms[name]

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
        meta_text = json.dumps(meta, indent=2, sort_keys=True, default=_json_default)
        arrays = {
            "eigenvalues": self.eigenvalues,
            "eig_train": self.eig_train,
            "meta_json": np.array(meta_text),
        }
        if self.eig_eval is not None:
            arrays["eig_eval"] = self.eig_eval
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
            )


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return str(obj)


def _eval_moments(source: Any, rows_per_step: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    """R_eval, its descending spectrum and the row count, for a (small) set of query vectors.

    With n < d rows, R_eval = UᵀU/n has the same nonzero eigenvalues as the n×n Gram matrix
    UUᵀ/n, so the spectrum costs an n×n decomposition instead of a d×d one.
    """
    chunks = rows.iter_vector_chunks(source, rows_per_step, HessianError)
    parts = [np.asarray(v, np.float64) for _, v in chunks]
    if not parts or sum(len(p) for p in parts) == 0:
        raise HessianError("the eval (query) store is empty; featurize the queries first")
    U_NxD = np.concatenate(parts)
    if not np.all(np.isfinite(U_NxD)):
        raise HessianError("non-finite values in the eval vectors; re-featurize the store")
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
        train_sample, sample_seed); a dict works too.
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
    )

    R_eval, eig_eval = None, None
    if eval_vectors is not None:
        R_eval, eig_eval, n_eval = _eval_moments(eval_vectors, rows_per_step)
        prov["eval_rows_used"] = n_eval
    return fit_from_moments(
        R_train, R_eval, cfg_hessian, dim, wanted=wanted, provenance=prov, eig_eval=eig_eval
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
    prov_in = provenance or {}
    if R_eval is not None:
        check_sources_compatible(prov_in.get("train_meta"), prov_in.get("eval_meta"))
    damping = float(cfg_get(cfg_hessian, "damping", 0.1))
    rule = cfg_get(cfg_hessian, "lambda_mix", "auto_trace")
    crossing = float(cfg_get(cfg_hessian, "crossing_per_65536", 1000))
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
