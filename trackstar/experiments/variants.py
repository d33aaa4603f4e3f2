"""Scoring variants built from two presets' rankings: ``rerank`` and ``mix`` (issue 14).

TrackStar leads E1 on MRR but not on tail-patch; ``step_influence`` (the first-order
tail-patch gain) and ``exp_opt`` lead on tail-patch but rank the ground truth poorly. These
variants try to keep both:

- ``rerank``: one preset's top ``k`` per query, reordered by another preset's score;
- ``mix(α)``: over the union of two presets' top ``k``, ``α·z_a + (1 − α)·z_b`` with each score
  standardized per query over that union (``standardize``: a z-score, or rank-based).

Both need a preset's score of (query, candidate) pairs outside its own top ``k``. Every preset
scores ``q̂ · T_m u_m / n_m`` (``trackstar.breakdown``, docs/method.md, Scoring) from stored
vectors, so ``pair_scores`` reads the rows it needs from the preset's stores and applies the
preset's transforms (``breakdown.preset_transforms``) instead of scoring the whole pool.
Rankings break ties by the lower candidate id, as the score stage does; -1 pads a row with
fewer than ``k`` candidates. The rankings are ``ids_QxK`` like ``harness.rank``'s, so
``evaluation.evaluate`` measures them with E1's machinery (retrieval metrics, tail-patch and
its lr sweep, cached by the ids).

Not an experiment (``config.EXPERIMENT_SUPPORT_MODULES``): ``scripts/variants.py`` runs it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import ml_collections
import numpy as np
from scipy import stats

from trackstar import breakdown, metrics, score, stages, store
from trackstar.experiments.harness import Setup, rank

STANDARDIZE = ("z", "rank")


class VariantError(ValueError):
    """A variant that cannot be built as asked; the message says what to change."""


# ----- a preset's score of arbitrary pairs ----------------------------------------------------


def read_rows(vs: store.VectorStore, ids_N: Sequence[int] | np.ndarray) -> np.ndarray:
    """The stored vectors of ``ids_N`` (ascending, unique), float32 ``(N, D)``.

    Streams the store chunk by chunk and keeps only the wanted rows, so memory is the rows
    asked for plus one chunk, not the whole store.

    Raises:
      VariantError: an id the store does not hold (an example skipped at featurize).
    """
    want = np.asarray(ids_N, np.int64)
    out = np.zeros((want.size, vs.dim), np.float32)
    found = np.zeros(want.size, bool)
    for chunk_ids, vecs in vs.iter_chunks():
        pos = np.searchsorted(want, chunk_ids)
        hit = (pos < want.size) & (want[np.minimum(pos, want.size - 1)] == chunk_ids)
        out[pos[hit]] = vecs[hit]
        found[pos[hit]] = True
    if not found.all():
        missing = want[~found]
        raise VariantError(
            f"{vs.path} holds no vector for candidate ids {missing[:20].tolist()}"
            f"{' ...' if missing.size > 20 else ''}; they were skipped at featurize, so no "
            "preset scores them: leave them out of the candidate lists"
        )
    return out


def _unit(x_NxD: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; a zero row stays zero (as ``score.unit_rows``)."""
    n = np.linalg.norm(x_NxD, axis=1, keepdims=True)
    return x_NxD / np.where(n > 0, n, 1.0)


def pair_scores(
    cfg: ml_collections.ConfigDict,
    preset: str,
    ids_QxC: np.ndarray,
    candidates: str = "candidates",
    train_tag: str = "",
    query_tag: str = "",
) -> np.ndarray:
    """``preset``'s score of task query q and candidate ``ids_QxC[q, c]``, float64 ``(Q, C)``.

    The same quantity ``stages.stage_score`` ranks by: the stores and Hessian fit of
    ``stages.score_inputs``, query side ``T_q u_q`` and train side ``T_m u_m`` (each unit-normed
    under the preset's unit norm), in float64, so a pair in the preset's own top k matches its
    stored float32 score to float32 rounding. Entries with id < 0 (padding) are NaN.
    """
    spec = score.get_preset(preset)
    ids = np.asarray(ids_QxC, np.int64)
    inputs = stages.score_inputs(cfg, preset, candidates, train_tag, query_tag)
    q_QxD = score.query_array(inputs.query_store)
    if q_QxD.shape[0] != ids.shape[0]:
        raise VariantError(
            f"{ids.shape[0]} candidate lists for the {q_QxD.shape[0]} task queries of "
            f"{inputs.query_store.path}; give one list per task query"
        )
    t_m, t_q = breakdown.preset_transforms(preset, inputs.fit)
    q_hat = breakdown.apply_transform(t_q, q_QxD)
    wanted = np.unique(ids[ids >= 0])
    m_hat = breakdown.apply_transform(t_m, read_rows(inputs.train_store, wanted))
    if spec.normalize:
        q_hat, m_hat = _unit(q_hat), _unit(m_hat)
    out = np.full(ids.shape, np.nan)
    for q in range(ids.shape[0]):  # One query at a time: a Q×C×D gather would not fit.
        ok = ids[q] >= 0
        out[q, ok] = m_hat[np.searchsorted(wanted, ids[q, ok])] @ q_hat[q]
    return out


def stored_top_k(
    cfg: ml_collections.ConfigDict,
    preset: str,
    candidates: str = "candidates",
    train_tag: str = "",
    query_tag: str = "",
) -> tuple[np.ndarray, np.ndarray]:
    """``(ids_QxK, scores_QxK)`` of the score stage's proponents file of ``preset``."""
    file = stages.proponents_path(cfg, candidates, preset, train_tag, query_tag) + ".npz"
    with np.load(file) as f:
        return f["ids"].astype(np.int64), f["scores"].astype(np.float64)


def check_pair_scores(
    cfg: ml_collections.ConfigDict, preset: str, candidates: str = "candidates", rel: float = 1e-4
) -> float:
    """Largest ``|pair_scores − stored|`` over ``preset``'s own stored top k, relative to each
    query's largest ``|stored|`` score; raises ``VariantError`` above ``rel``.

    The stored scores are float32 sums over d terms, so they carry relative rounding of about
    1e-6·sqrt(d) of the query's score scale; ``rel`` leaves room for that, not for a wrong
    transform or store (which moves scores by whole percents).
    """
    ids, stored = stored_top_k(cfg, preset, candidates)
    got = pair_scores(cfg, preset, ids, candidates)
    ok = ids >= 0
    scale = np.max(np.abs(np.where(ok, stored, 0.0)), axis=1, keepdims=True)
    err = np.abs(np.where(ok, got - stored, 0.0)) / np.where(scale > 0, scale, 1.0)
    worst = float(err.max(initial=0.0))
    if worst > rel:
        q, c = np.unravel_index(int(np.argmax(err)), err.shape)
        raise VariantError(
            f"{preset}: pair score {got[q, c]:.6g} of query {q}, candidate {ids[q, c]} differs "
            f"from the stored {stored[q, c]:.6g} (relative {worst:.2g} > {rel:g}); the stores or "
            "the Hessian fit changed after scoring: rerun the score stage"
        )
    return worst


# ----- orders ---------------------------------------------------------------------------------


def order_by(ids_QxC: np.ndarray, scores_QxC: np.ndarray, k: int | None = None) -> np.ndarray:
    """``ids_QxC`` sorted per row by descending score, ties to the lower id, the first ``k``
    (default C; -1 pads). Padding (id < 0) and NaN scores go last."""
    ids = np.asarray(ids_QxC, np.int64)
    s = np.asarray(scores_QxC, np.float64)
    valid = (ids >= 0) & ~np.isnan(s)
    key_s = np.where(valid, -s, np.inf)
    key_id = np.where(valid, ids, np.iinfo(np.int64).max)
    order = np.lexsort((key_id, key_s), axis=1)
    out = np.where(np.take_along_axis(valid, order, 1), np.take_along_axis(ids, order, 1), -1)
    k = ids.shape[1] if k is None else int(k)
    if out.shape[1] < k:
        out = np.concatenate([out, np.full((out.shape[0], k - out.shape[1]), -1)], axis=1)
    return out[:, :k]


def rerank(ids_QxK: np.ndarray, scores_QxK: np.ndarray) -> np.ndarray:
    """One preset's candidates ``ids_QxK`` reordered by another's ``scores_QxK`` of the same
    pairs: the id set of each row is kept, only its order changes."""
    return order_by(ids_QxK, scores_QxK)


def union_ids(a_QxK: np.ndarray, b_QxK: np.ndarray) -> np.ndarray:
    """Per row, the ascending union of two candidate lists (ids < 0 dropped), -1 padded to
    the longest row."""
    rows = [
        np.union1d(a[a >= 0], b[b >= 0])
        for a, b in zip(np.asarray(a_QxK), np.asarray(b_QxK), strict=True)
    ]
    width = max((r.size for r in rows), default=0)
    out = np.full((len(rows), width), -1, np.int64)
    for q, r in enumerate(rows):
        out[q, : r.size] = r
    return out


def standardize(scores_QxC: np.ndarray, valid_QxC: np.ndarray, how: str = "z") -> np.ndarray:
    """Each row's valid scores made comparable across presets (invalid entries: NaN).

    ``"z"``: (s − mean) / std over the row's valid entries (0 when they are all equal): keeps
    how far apart the scores are, so a candidate far ahead on one preset can outweigh the
    other. ``"rank"``: the average rank among them scaled to [0, 1] (1 = best): only the
    order counts, so a preset's heavy tail (unnormalized scores) cannot dominate.
    """
    if how not in STANDARDIZE:
        raise VariantError(f"standardize = {how!r}; choose one of {STANDARDIZE}")
    s = np.asarray(scores_QxC, np.float64)
    out = np.full(s.shape, np.nan)
    for q in range(s.shape[0]):
        ok = np.asarray(valid_QxC[q], bool) & ~np.isnan(s[q])
        v = s[q, ok]
        if v.size == 0:
            continue
        if how == "z":
            sd = v.std()
            out[q, ok] = (v - v.mean()) / sd if sd > 0 else 0.0
        else:
            r = stats.rankdata(v, method="average")
            out[q, ok] = (r - 1) / (v.size - 1) if v.size > 1 else 1.0
    return out


def mix(
    ids_QxC: np.ndarray,
    scores_a_QxC: np.ndarray,
    scores_b_QxC: np.ndarray,
    alpha: float,
    k: int,
    how: str = "z",
) -> np.ndarray:
    """The top ``k`` of ``ids_QxC`` (e.g. ``union_ids`` of two presets' top k) by
    ``α·z_a + (1 − α)·z_b``, each score standardized per row (``standardize``)."""
    if not 0.0 <= alpha <= 1.0:
        raise VariantError(f"alpha = {alpha}; it must be in [0, 1]")
    valid = np.asarray(ids_QxC) >= 0
    za = standardize(scores_a_QxC, valid, how)
    zb = standardize(scores_b_QxC, valid, how)
    # The end points are exactly one preset's order (no 0·z rounding into a tie break).
    combined = za if alpha == 1.0 else zb if alpha == 0.0 else alpha * za + (1 - alpha) * zb
    return order_by(ids_QxC, combined, k)


# ----- the variants of one run ----------------------------------------------------------------


def mix_name(alpha: float, how: str, first: str = "trackstar", second: str = "step_influence"):
    """The table label of a ``mix`` variant."""
    return f"mix_{how}({alpha:g}: {first}, {second})"


def build_variants(
    setup: Setup,
    first: str = "trackstar",
    second: str = "step_influence",
    alphas: Sequence[float] = (0.25, 0.5, 0.75),
    how: Sequence[str] = ("z",),
    rerank_by: Sequence[str] = ("step_influence", "exp_opt"),
) -> dict[str, np.ndarray]:
    """The variants' rankings (``ids_QxK``, K = ``score.top_k``) on ``setup``'s pool.

    ``rerank(<p>)``: ``first``'s top K reordered by preset p, for each p in ``rerank_by``;
    ``mix_<how>(α: first, second)``: each α and standardization over the union of ``first``'s
    and ``second``'s top K. The presets' rankings are ``harness.rank``'s (E1's cache).
    """
    cfg = setup.cfg
    k = int(cfg.score.top_k)
    base = rank(setup, first)
    out: dict[str, np.ndarray] = {}
    for p in rerank_by:
        out[f"rerank({first} by {p})"] = rerank(base, pair_scores(cfg, p, base, setup.candidates))
    if alphas:
        union = union_ids(base, rank(setup, second))
        s_a = pair_scores(cfg, first, union, setup.candidates)
        s_b = pair_scores(cfg, second, union, setup.candidates)
        for h in how:
            for a in alphas:
                out[mix_name(a, h, first, second)] = mix(union, s_a, s_b, float(a), k, h)
    return out


def paired_difference(
    a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], metric: str
) -> dict[str, float]:
    """Mean ± se over queries of ``a[metric] − b[metric]`` (per-query arrays of
    ``evaluation.evaluate``; NaN entries of either left out)."""
    return metrics.mean_se(np.asarray(a[metric], np.float64) - np.asarray(b[metric], np.float64))
