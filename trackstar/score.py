"""Streaming scoring on a mesh: method presets and a running top-k over the train store
(docs/method.md).

Every preset is one formula, score(m, q) = (T_q u_q) · (T_m u_m), optionally with both sides
scaled to unit length: T = R^{-1/2} on both sides (R_train or the mixed R), T = I when the
preset has no Hessian, and for the one-sided TRAK preset T_q = R_train^{-1}, T_m = I.

The train rows stream through one jitted ``shard_map`` step on a mesh (one device is a 1-device
mesh): rows sharded over every device, queries and transforms replicated; each device
transforms its rows with one matmul, normalizes, multiplies by the prepared query block and
merges with its own running top-k by ``jax.lax.top_k``. One final merge of the per-device lists
(ties to the lower example id) gives the ranking. Memory is O(step·d + Q·k + d²) per device
whatever the store's size; pieces are padded to one fixed row count so the step compiles once.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from trackstar import rows, store
from trackstar.files import atomic_write
from trackstar.hessian import HessianError, HessianFit
from trackstar.sharding import ALL_AXES, default_mesh, replicated, row_sharding

_INT32_MAX = np.iinfo(np.int32).max
# Non-finite train rows named in the error message (the count it gives is exact).
NAMED_BAD_ROWS = 16


class ScoreError(ValueError):
    """Bad input to scoring; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class PresetSpec:
    """One row of the presets table (docs/method.md, Scoring).

    corrected: score train (candidate) vectors built with the optimizer correction (True) or
      without it; also the query side's unless ``query_corrected`` says otherwise.
    hessian: "none", "train" (R_train) or "mixed" (λ R_eval + (1 − λ) R_train).
    normalize: scale both transformed vectors to unit length (cosine).
    one_sided: T_q = R^{-1}, T_m = I (TRAK) instead of R^{-1/2} on both sides.
    query_corrected: the query side's correction when it differs from the train side's (None:
      the same as ``corrected``). ``step_influence`` scores raw query gradients against
      corrected candidates: g_qᵀ (g_m ⊙ c) is the first-order effect of one optimizer step on
      m on q's loss, and one factor c of the preconditioner belongs to the step, not to q.
    """

    corrected: bool
    hessian: str
    normalize: bool
    one_sided: bool = False
    query_corrected: bool | None = None

    def __post_init__(self):
        if self.query_corrected not in (None, self.corrected) and self.hessian != "none":
            # R is fitted from one kind of vector (both of its stores share the train side's
            # correction), so it cannot whiten two differently corrected sides.
            raise ScoreError(
                "a preset whose query and train sides differ in optimizer correction cannot "
                f"use a Hessian (hessian = {self.hessian!r}); set hessian = 'none'"
            )

    @property
    def query_side_corrected(self) -> bool:
        """Whether the query vectors carry the optimizer correction."""
        return self.corrected if self.query_corrected is None else self.query_corrected

    def transform_names(self) -> tuple[str | None, str | None]:
        """The ``HessianFit`` transform names for (train side, query side); None = identity."""
        if self.hessian == "none":
            return None, None
        if self.one_sided:
            return None, f"{self.hessian}_inv"
        name = f"{self.hessian}_inv_sqrt"
        return name, name

    def record(self) -> dict:
        """The fields as a dict, leaving out ``query_corrected`` when unset, so records of
        presets made before the field existed (scoring indexes) still compare equal."""
        out = dataclasses.asdict(self)
        if out["query_corrected"] is None:
            del out["query_corrected"]
        return out


PRESETS: dict[str, PresetSpec] = {
    "grad_dot": PresetSpec(corrected=False, hessian="none", normalize=False),
    "grad_cosine": PresetSpec(corrected=False, hessian="none", normalize=True),
    "trak": PresetSpec(corrected=False, hessian="train", normalize=False, one_sided=True),
    "exp_opt": PresetSpec(corrected=True, hessian="none", normalize=False),
    "exp_opt_norm": PresetSpec(corrected=True, hessian="none", normalize=True),
    "exp_opt_norm_rtrain": PresetSpec(corrected=True, hessian="train", normalize=True),
    "trackstar": PresetSpec(corrected=True, hessian="mixed", normalize=True),
    # The tail-patch predictor: <P g_q, P (g_m ⊙ c)> ≈ g_qᵀ (g_m ⊙ c), so η·s·score is the
    # first-order Δlog p of a tail-patch step on m (docs/method.md, step_influence).
    "step_influence": PresetSpec(
        corrected=True, hessian="none", normalize=False, query_corrected=False
    ),
}


def _correction_of(meta: Any) -> str | None:
    """A store's ``correction`` from its ``StoreMeta`` or its metadata dict."""
    return meta.get("correction") if isinstance(meta, Mapping) else meta.correction


def check_query_meta(
    preset: str | PresetSpec,
    train_meta: Any,
    query_meta: Any,
    names: tuple[str, str] = ("train", "query"),
) -> None:
    """``store.check_compatible`` for a preset's query store against its train store.

    Every field must match, except that for a preset whose sides differ in correction
    (``query_corrected``) the query store must instead carry the query side's correction: its
    correction settings (and the optimizer fingerprint they pin) are then its own.

    Raises:
      StoreMismatchError: the stores do not belong together (or the query store has the
        wrong correction for the preset).
    """
    spec = get_preset(preset)
    if spec.query_side_corrected == spec.corrected:
        store.check_compatible(train_meta, query_meta, names)
        return
    has_correction = _correction_of(query_meta) not in (None, "none")
    if has_correction != spec.query_side_corrected:
        want = "with" if spec.query_side_corrected else "without"
        raise store.StoreMismatchError(
            f"preset {preset if isinstance(preset, str) else 'custom'!r} scores {names[1]} "
            f"vectors {want} the optimizer correction, but the {names[1]} store has correction "
            f"= {_correction_of(query_meta)!r}; featurize the {names[1]} set {want} it"
        )
    reference = dataclasses.replace(
        train_meta,
        correction=query_meta.correction,
        correction_settings=dict(query_meta.correction_settings),
        optimizer_fingerprint=query_meta.optimizer_fingerprint,
    )
    store.check_compatible(reference, query_meta, names)


def get_preset(name: str | PresetSpec) -> PresetSpec:
    """Looks up a preset by name (a ``PresetSpec`` passes through)."""
    if isinstance(name, PresetSpec):
        return name
    if name not in PRESETS:
        raise ScoreError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


# ----------------------------------------------------------------------------- jitted kernels


def unit_rows(x_NxD: jax.Array) -> jax.Array:
    """Each row divided by its L2 norm; a zero row stays zero (score 0) instead of NaN."""
    sq = jnp.sum(x_NxD * x_NxD, axis=-1, keepdims=True)
    return x_NxD * jax.lax.rsqrt(jnp.maximum(sq, jnp.finfo(x_NxD.dtype).tiny))


@partial(jax.jit, static_argnames=("normalize",))
def _prepare_queries(q_QxD: jax.Array, t_DxD: jax.Array | None, normalize: bool) -> jax.Array:
    if t_DxD is not None:
        q_QxD = q_QxD @ t_DxD.T
    return unit_rows(q_QxD) if normalize else q_QxD


def track_non_finite(
    bad: tuple[jax.Array, jax.Array, jax.Array],
    s_QxN: jax.Array,
    ids_N: jax.Array,
    valid_N: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Folds one block's non-finite scores into the running ``(count, ids_B, queries_Q)``.

    ``count`` counts train rows with any non-finite score, ``ids_B`` keeps the lowest such
    example ids (``_INT32_MAX`` = empty slot) and ``queries_Q`` marks the queries involved.
    It stays on device and fuses with the score matmul, so the scoring loop never waits on a
    per-block check; the caller reads it once at the end (``raise_if_non_finite``).
    """
    count, bad_ids_B, bad_q_Q = bad
    nonfinite_QxN = ~jnp.isfinite(s_QxN) & valid_N[None, :]
    row_bad_N = jnp.any(nonfinite_QxN, axis=0)
    count = count + jnp.sum(row_bad_N, dtype=jnp.int32)
    cand = jnp.concatenate([bad_ids_B, jnp.where(row_bad_N, ids_N, _INT32_MAX)])
    bad_ids_B = -jax.lax.top_k(-cand, bad_ids_B.shape[0])[0]
    return count, bad_ids_B, bad_q_Q | jnp.any(nonfinite_QxN, axis=1)


def init_non_finite(n_queries: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The empty running state for ``track_non_finite`` (host arrays; place them as needed)."""
    return (
        np.zeros((), np.int32),
        np.full(NAMED_BAD_ROWS, _INT32_MAX, np.int32),
        np.zeros(n_queries, bool),
    )


@functools.cache
def _score_step(mesh: Mesh, normalize: bool, k: int, transform: str) -> Callable:
    """The jitted per-device step: score this device's rows, merge them into its top-k.

    ``transform``: "none", "dense" (``t`` a d×d matrix) or "low_rank" (``t`` =
    ``(scale, Q_DxR, coef_R)``: T u = scale·u + Q diag(coef) Qᵀ u, O(d·r) per row).
    """
    spec = P(ALL_AXES)

    def local(best_1xQxK, best_ids_1xQxK, bad, ids_N, valid_N, vecs_NxD, t, q_QxD):
        if transform == "dense":
            vecs_NxD = vecs_NxD @ t.T
        elif transform == "low_rank":
            scale, q_DxR, coef_R = t
            vecs_NxD = scale * vecs_NxD + ((vecs_NxD @ q_DxR) * coef_R) @ q_DxR.T
        if normalize:
            vecs_NxD = unit_rows(vecs_NxD)
        s_QxN = q_QxD @ vecs_NxD.T
        # Each device tracks its own rows' non-finite scores; merged once after the loop.
        count_1, bad_ids_1xB, bad_q_1xQ = bad
        count, bad_ids_B, bad_q_Q = track_non_finite(
            (count_1[0], bad_ids_1xB[0], bad_q_1xQ[0]), s_QxN, ids_N, valid_N
        )
        bad = (count[None], bad_ids_B[None], bad_q_Q[None])
        s_QxN = jnp.where(valid_N[None, :], s_QxN, -jnp.inf)
        # Running entries first: on this device they have lower ids than this piece's rows,
        # and top_k puts the lower position first on equal scores, so ties go to the lower id.
        cand_QxC = jnp.concatenate([best_1xQxK[0], s_QxN], axis=1)
        cand_ids_QxC = jnp.concatenate(
            [best_ids_1xQxK[0], jnp.broadcast_to(ids_N[None, :], s_QxN.shape)], axis=1
        )
        top_QxK, pos_QxK = jax.lax.top_k(cand_QxC, k)
        return top_QxK[None], jnp.take_along_axis(cand_ids_QxC, pos_QxK, axis=1)[None], bad

    fn = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(spec, spec, (spec, spec, spec), spec, spec, spec, P(), P()),
        out_specs=(spec, spec, (spec, spec, spec)),
    )
    return jax.jit(fn, donate_argnums=(0, 1, 2))


def merge_top_k(
    scores_SxQxK: np.ndarray, ids_SxQxK: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Merges per-device top-k lists: best score first, ties to the lower id; ``(ids, scores)``."""
    s = np.moveaxis(np.asarray(scores_SxQxK), 0, 1).reshape(scores_SxQxK.shape[1], -1)
    i = np.moveaxis(np.asarray(ids_SxQxK), 0, 1).reshape(ids_SxQxK.shape[1], -1).astype(np.int64)
    # Empty slots (-inf, id -1) sort after every real row: give them the largest id.
    i_key = np.where(i < 0, np.iinfo(np.int64).max, i)
    order = np.lexsort((i_key, -s.astype(np.float64)), axis=1)[:, :k]
    return np.take_along_axis(i, order, 1), np.take_along_axis(s, order, 1).astype(np.float32)


# ----------------------------------------------------------------------------- finiteness


def _preview(values: Sequence[int], n: int = NAMED_BAD_ROWS) -> str:
    values = [int(v) for v in values]
    return f"{values[:n]}{f' ... ({len(values)} in all)' if len(values) > n else ''}"


def check_finite_inputs(
    query_vectors_QxD: np.ndarray,
    transforms: Mapping[str, np.ndarray | None],
    error: type[Exception] = ValueError,
    *,
    prepared: bool = False,
) -> None:
    """Raises ``error`` naming the query indices (or the transform) that hold NaN/inf.

    Checked once before streaming, so that a non-finite score found later can only come from
    the train rows. ``prepared``: the vectors are ``T_q u_q`` (finite inputs that overflowed).
    """
    for name, t in transforms.items():
        if t is not None and not np.isfinite(t).all():
            raise error(
                f"{name} holds NaN/inf values, so every score would be NaN; the Hessian fit "
                "is corrupt: refit it with scripts/fit_hessian.py"
            )
    q = np.asarray(query_vectors_QxD)
    if np.isfinite(q).all():
        return
    rows = _preview(np.nonzero(~np.isfinite(q).all(axis=1))[0])
    if prepared:
        raise error(
            f"the queries at indices {rows} overflow float32 after the query transform, so "
            "their scores would be NaN; check those query vectors and the Hessian fit "
            "(refit it with scripts/fit_hessian.py)"
        )
    raise error(
        f"the query vectors at indices {rows} hold NaN/inf values, so their scores would be "
        "NaN; the query store is corrupt or was written outside featurize: refeaturize the "
        "queries"
    )


def _chunk_size(source: Any) -> int | None:
    meta = getattr(source, "meta", None)
    size = getattr(meta, "chunk_size", None)
    return int(size) if isinstance(size, int | np.integer) and size > 0 else None


def raise_if_non_finite(
    count: int,
    bad_ids: np.ndarray,
    bad_queries_Q: np.ndarray,
    source: Any,
    error: type[Exception] = ValueError,
) -> None:
    """Raises ``error`` naming the train rows whose scores were NaN/inf (``count`` > 0).

    ``bad_ids`` holds the lowest offending example ids (``_INT32_MAX`` = empty slot) and
    ``bad_queries_Q`` the queries with a non-finite score. A store source also gets the
    chunks those ids live in, which is what to refeaturize.
    """
    if count == 0:
        return
    bad_ids = np.asarray(bad_ids)
    # Several devices' lists may be concatenated here: keep the lowest ids overall.
    ids = np.unique(bad_ids[bad_ids != _INT32_MAX])[:NAMED_BAD_ROWS]
    more = f" ... ({count} rows in all)" if count > len(ids) else ""
    where = f"example ids {ids.tolist()}{more}"
    size = _chunk_size(source)
    if size is not None:
        where += f" (store chunks {np.unique(ids // size).tolist()})"
    queries = np.nonzero(np.asarray(bad_queries_Q))[0]
    against = (
        "every query"
        if len(queries) == len(bad_queries_Q)
        else f"the queries at indices {_preview(queries)}"
    )
    path = getattr(source, "path", None)
    if path:
        fix = (
            f"so the train store at {path} is corrupt or was written outside featurize; "
            "refeaturize those chunks (delete their chunk directories and rerun featurize)"
        )
    else:
        fix = "so the train vectors are corrupt or were not made by featurize; refeaturize them"
    raise error(
        f"scores are NaN/inf for train rows with {where} against {against}: their vectors hold "
        f"NaN/inf (or overflow float32), {fix}"
    )


# ----------------------------------------------------------------------------- streaming top-k


def progress_bar(progress: Any, total: int | None, desc: str = "score"):
    """``(update(done, total), close)`` for a row stream: a tqdm bar when ``progress`` is True,
    the caller's callback when it is callable, no-ops (None, close) otherwise."""
    if progress is True:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="row", desc=desc, smoothing=0.1)
        return (lambda done, _total: bar.update(done - bar.n)), bar.close
    if callable(progress):
        return progress, lambda: None
    return None, lambda: None


def top_k_scores(
    train_chunks: Any,
    query_vectors_QxD: Any,
    train_transform: np.ndarray | None,
    query_transform: np.ndarray | None,
    normalize: bool,
    k: int,
    *,
    rows_per_step: int | None = None,
    progress: bool | Callable[[int, int | None], None] | None = None,
    mesh: Mesh | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k train examples per query by (T_q u_q) · (T_m u_m), streamed chunk by chunk.

    Args:
      train_chunks: train vectors as an array, an iterable of ``(ids_N, vectors_NxD)`` chunks
        in ascending id order, or a store with ``iter_chunks``. On a mesh spanning several
        processes, a ``VectorStore``: each process reads its own chunks (``trackstar.rows``).
      query_vectors_QxD: the query vectors.
      train_transform, query_transform: d×d matrices applied as ``T u`` (None = identity);
        ``train_transform`` may also be a low-rank ``(scale, Q_DxR, coef_R)``
        (``HessianFit.low_rank_factors``): T = scale·I + Q diag(coef) Qᵀ, never formed.
      normalize: scale both transformed vectors to unit length.
      k: proponents kept per query (fewer when the store holds fewer rows).
      rows_per_step: rows per jitted step and process (default: the store's chunk size on a
        mesh over processes, else the first chunk's size); larger chunks are split and shorter
        ones padded so the step compiles once.
      progress: True for a tqdm bar (rate, ETA), or a callback ``(rows_done, total_or_None)``.
      mesh: the mesh whose devices share the train rows (None: ``single_device_mesh()``).

    Returns:
      ``(ids_QxK int64, scores_QxK float32)``, best first; ties go to the lower example id.
      Every process of a multi-process mesh returns the same arrays.

    Raises:
      ScoreError: bad shapes or order, or non-finite values: the error names the query indices
        or the train example ids (and store chunks) whose vectors give NaN/inf scores.
    """
    q = np.asarray(query_vectors_QxD, np.float32)
    if q.ndim != 2 or q.shape[0] == 0:
        raise ScoreError(f"query vectors must have shape (Q, D) with Q > 0, got {q.shape}")
    if not isinstance(k, int | np.integer) or k <= 0:
        raise ScoreError(f"top_k must be a positive integer, got {k!r}")
    n_q, d = q.shape
    low_rank = isinstance(train_transform, tuple)
    if low_rank:
        scale, q_DxR, coef_R = train_transform
        if np.ndim(q_DxR) != 2 or np.shape(q_DxR)[0] != d or np.shape(coef_R) != q_DxR.shape[1:]:
            raise ScoreError(
                f"the low-rank train transform has basis {np.shape(q_DxR)} and "
                f"{np.shape(coef_R)} coefficients but the queries have d = {d}; the Hessian fit "
                "belongs to another projection: refit with scripts/fit_hessian.py"
            )
    for name, t in (
        ("train_transform", None if low_rank else train_transform),
        ("query_transform", query_transform),
    ):
        if t is not None and np.shape(t) != (d, d):
            raise ScoreError(
                f"{name} has shape {np.shape(t)} but the queries have d = {d}; the Hessian fit "
                "belongs to another projection: refit with scripts/fit_hessian.py"
            )
    k = int(k)
    check_finite_inputs(
        q,
        {
            "train_transform": train_transform[1] if low_rank else train_transform,
            "query_transform": query_transform,
        },
        ScoreError,
    )
    # One query row makes each step a matrix-vector product, which XLA's CPU backend runs
    # several times slower than a two-row product (40 vs 7 ms for 4096 x 4096 here): score it
    # twice and keep one copy.
    n_kept = n_q
    if n_q == 1:
        q, n_q = np.concatenate([q, q]), 2
    mesh = default_mesh(mesh)
    rep, rs = replicated(mesh), row_sharding(mesh)
    mk = jax.make_array_from_process_local_data
    t_q = None if query_transform is None else mk(rep, np.asarray(query_transform, np.float32))
    q_QxD = _prepare_queries(mk(rep, q), t_q, normalize)
    check_finite_inputs(rows.fetch_replicated(q_QxD), {}, ScoreError, prepared=True)
    if low_rank:
        t_m = (
            mk(rep, np.asarray(scale, np.float32)),
            mk(rep, np.asarray(q_DxR, np.float32)),
            mk(rep, np.asarray(coef_R, np.float32)),
        )
        kind = "low_rank"
    else:
        t_m = np.zeros((1, 1)) if train_transform is None else train_transform
        t_m = mk(rep, np.asarray(t_m, np.float32))
        kind = "none" if train_transform is None else "dense"
    step = _score_step(mesh, bool(normalize), k, kind)
    n_local = rows.local_mesh_devices(mesh)
    best = mk(rs, np.full((n_local, n_q, k), -np.inf, np.float32))
    best_ids = mk(rs, np.full((n_local, n_q, k), -1, np.int32))
    bad = tuple(mk(rs, np.stack([x] * n_local)) for x in init_non_finite(n_q))

    blocks, fixed_rows = rows.local_blocks(train_chunks, rows_per_step, mesh, ScoreError)
    total = None if fixed_rows else rows.source_num_rows(train_chunks)
    update, close = progress_bar(progress, total)
    step_rows = rows_per_step or fixed_rows or None
    seen = 0
    last_id = -1
    limit = rows.DispatchLimit()
    # A mapped store's chunks outlive the loop: they go to the device without a copy, and the
    # aliases are released before returning (rows.release_rows).
    alias = bool(getattr(train_chunks, "is_mapped", False))
    aliased: list[jax.Array] = []
    try:
        for ids, vecs in blocks:
            if np.shape(vecs)[1] != d:
                raise ScoreError(
                    f"train vectors have d = {np.shape(vecs)[1]} but queries have d = {d}; "
                    "score stores featurized with the same projection"
                )
            if len(ids):
                if ids[0] <= last_id or np.any(np.diff(ids) <= 0):
                    raise ScoreError(
                        "train chunks must arrive in strictly ascending id order (ties resolve "
                        "to the lower id); read the store with iter_chunks()"
                    )
                if ids[0] < 0 or ids[-1] > _INT32_MAX:
                    raise ScoreError(f"example ids must lie in [0, 2^31); got {ids[0]}..{ids[-1]}")
                last_id = int(ids[-1])
            elif step_rows is None:
                continue
            step_rows = step_rows or len(ids)
            padded = rows.round_up(step_rows, n_local)
            for piece_ids, piece in rows.pieces(ids, vecs, step_rows, fixed_rows):
                g_ids, g_valid, g_vecs = rows.global_rows(
                    mesh, padded, piece_ids, piece, d, alias=alias
                )
                best, best_ids, bad = step(best, best_ids, bad, g_ids, g_valid, g_vecs, t_m, q_QxD)
                if alias:
                    aliased.append(g_vecs)
                limit.wait(best)
                if len(aliased) > 2 * limit.every:
                    rows.release_rows(aliased, best)
            seen += len(ids)
            if update is not None:
                update(seen, total)
    finally:
        close()
        rows.release_rows(aliased, best)
    seen = rows.sum_over_processes(seen, mesh)
    if seen == 0:
        raise ScoreError("the train store is empty; featurize the training examples first")
    # Every process gathers the same per-device state, so all of them raise (or none does).
    counts, bad_ids, bad_q = (rows.gather_rows(x) for x in bad)
    raise_if_non_finite(
        int(counts.sum()),
        bad_ids.reshape(-1),
        bad_q.any(axis=0)[:n_kept],
        train_chunks,
        ScoreError,
    )
    best_QxK, ids_QxK = rows.gather_rows(best)[:, :n_kept], rows.gather_rows(best_ids)[:, :n_kept]
    return merge_top_k(best_QxK, ids_QxK, min(k, seen))


def query_array(query_vectors: Any) -> np.ndarray:
    """``(Q, D)`` float32 query vectors from an array, or from a store read whole (``read_all``;
    Q is small)."""
    if hasattr(query_vectors, "read_all"):
        q = query_vectors.read_all()
        query_vectors = q[1] if isinstance(q, tuple) else q
    return np.asarray(query_vectors, np.float32)


def score_preset(
    train_chunks: Any,
    query_vectors: Any,
    preset: str | PresetSpec,
    hessian_fit: HessianFit | None,
    k: int,
    *,
    rows_per_step: int | None = None,
    progress: bool | Callable[[int, int | None], None] | None = None,
    mesh: Mesh | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Scores with a scoring preset: picks the transforms from ``hessian_fit`` and streams
    (``top_k_scores`` on ``mesh``; None: one device).

    ``query_vectors`` may be an array or a store (read whole: Q is small). When the stores carry
    metadata, a store whose optimizer correction does not match the preset, or a fit made for
    another model / projection / correction, is refused.
    """
    spec = get_preset(preset)
    name = preset if isinstance(preset, str) else "custom"
    train_meta = rows.source_meta(train_chunks)
    if train_meta is not None and "index" in (train_meta.get("extra") or {}):
        # trackstar.index.INDEX_KEY: its rows are finished already; transforming them again
        # would score R^-1/2 twice.
        raise ScoreError(
            "the train store is a scoring index (rows already transformed and normalized); "
            "score it with trackstar.index.score_index, or pass the candidate store it was built "
            "from"
        )
    # Each side's store must carry that side's correction (they differ for step_influence).
    query_meta = getattr(query_vectors, "meta", None)
    for side, meta, want_correction in (
        ("train", train_meta, spec.corrected),
        ("query", query_meta, spec.query_side_corrected),
    ):
        correction = None if meta is None else _correction_of(meta)
        if correction is not None and (correction != "none") != want_correction:
            want = "with" if want_correction else "without"
            raise ScoreError(
                f"preset {name!r} scores {side} vectors {want} the optimizer correction, but the "
                f"{side} store has correction = {correction!r}; featurize a {side} store {want} "
                "it for this preset"
            )
    q = query_array(query_vectors)
    train_name, query_name = spec.transform_names()
    t_m = t_q = None
    if spec.hessian != "none":
        if hessian_fit is None:
            raise ScoreError(
                f"preset {name!r} needs a Hessian fit ({spec.hessian} R); run "
                "scripts/fit_hessian.py first"
            )
        try:
            hessian_fit.check_dim(q.shape[1], "the query vectors")
            hessian_fit.check_compatible(train_meta, "the train store")
            if hessian_fit.is_low_rank:
                # No d×d matrix: the train rows go through the factors on the devices, the
                # (few) queries through them on the host.
                t_m = None if train_name is None else hessian_fit.low_rank_factors(train_name)
                q = hessian_fit.apply(query_name, q)
            else:
                t_m = None if train_name is None else hessian_fit.transform(train_name)
                t_q = hessian_fit.transform(query_name)
        except HessianError as e:
            raise ScoreError(str(e)) from None
    return top_k_scores(
        train_chunks,
        q,
        t_m,
        t_q,
        spec.normalize,
        k,
        rows_per_step=rows_per_step,
        progress=progress,
        mesh=mesh,
    )


# ----------------------------------------------------------------------------- output


def write_proponents(
    path_jsonl: str,
    path_npz: str,
    queries: Sequence[Mapping[str, Any]],
    ids: np.ndarray,
    scores: np.ndarray,
    texts_by_id: Mapping[int, str] | Sequence[str] | None,
    extra_arrays: Mapping[str, np.ndarray] | None = None,
) -> None:
    """Writes proponents as jsonl rows and as arrays, each file atomically.

    jsonl rows: ``{query_id, prompt, target, proponent_ids, scores, texts}``; the npz holds
    ``query_ids`` (int64 when every id is an int, else str), ``ids`` (int64 Q×K) and
    ``scores`` (float32 Q×K), plus ``extra_arrays`` (e.g. ``stages.stage_score``'s
    ``opponent_ids`` / ``opponent_scores``) under their own names.
    """
    extra = dict(extra_arrays or {})
    clash = sorted(set(extra) & {"query_ids", "ids", "scores"})
    if clash:
        raise ScoreError(f"extra_arrays {clash} clash with the npz's own arrays; rename them")
    ids = np.asarray(ids, np.int64)
    scores = np.asarray(scores, np.float32)
    if ids.shape != scores.shape or ids.ndim != 2 or len(queries) != ids.shape[0]:
        raise ScoreError(
            f"{len(queries)} queries, ids of shape {ids.shape} and scores of shape "
            f"{scores.shape} do not line up; pass the arrays top_k_scores returned"
        )
    rows = []
    for i, query in enumerate(queries):
        missing = [key for key in ("query_id", "prompt", "target") if key not in query]
        if missing:
            raise ScoreError(f"query {i} lacks {missing}; each query needs query_id/prompt/target")
        texts = None
        if texts_by_id is not None:
            try:
                texts = [texts_by_id[int(j)] for j in ids[i]]
            except (KeyError, IndexError):
                raise ScoreError(
                    f"a proponent id of query {query['query_id']!r} has no text; pass the "
                    "texts of the store that was scored"
                ) from None
        rows.append(
            {
                "query_id": query["query_id"],
                "prompt": query["prompt"],
                "target": query["target"],
                "proponent_ids": ids[i].tolist(),
                "scores": [float(s) for s in scores[i]],
                "texts": texts,
            }
        )
    text = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows)
    raw_ids = [q["query_id"] for q in queries]
    is_int = all(isinstance(i, int | np.integer) and not isinstance(i, bool) for i in raw_ids)
    query_ids = np.array(raw_ids, np.int64) if is_int else np.array([str(i) for i in raw_ids])
    atomic_write(
        path_npz,
        lambda f: np.savez(f, query_ids=query_ids, ids=ids, scores=scores, **extra),
        binary=True,
    )
    atomic_write(path_jsonl, lambda f: f.write(text))
