"""Score breakdowns: one (query, proponent) score split by parameter tensor and by token
(docs/method.md, Score breakdowns).

Every scoring preset is ``score(m, q) = q̂ · T_m u_m / n_m`` with the query side
``q̂ = T_q u_q`` (scaled to unit length under unit norm) fixed, ``u_m = P (g_m ⊙ c)`` the
candidate's corrected, projected gradient and ``n_m = ||T_m u_m||`` (1 without unit norm).
``u_m`` is linear in the gradient, and the gradient is a sum over parameter tensors (the
projection is built per tensor: "global" mode sums the blocks, "per_tensor" concatenates them,
"dense" sums ``M_l g_l``; the correction is elementwise per tensor) and over the loss terms of
the counted token positions (the output function is a weighted sum over positions). So with
``v`` the part of ``u_m`` from one tensor, or from one position's loss term,

    part = q̂ · T_m v / n_m = (T_mᵀ q̂) · v / n_m,

and the tensor parts sum to the score, as do the token parts, up to float rounding. ``n_m`` is
the whole candidate's norm: a part is a share of the score, not a cosine of its own.

A position's part is attributed to the token it predicts: position t (weight ``w_t``) is the
loss term ``w_t ℓ(tokens[t] | tokens[:t])``, predicted from the logits at t − 1.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from trackstar import correction, score, stages, tokenizer
from trackstar import projection as projection_lib
from trackstar.gradients import per_example_grads
from trackstar.hessian import HessianFit
from trackstar.projection import Projector
from trackstar.tree import named_leaves

PyTree = Any
# A train or query transform: a d×d matrix (applied as T u), a low-rank ``(scale, Q_DxR,
# coef_R)`` with T = scale·I + Q diag(coef) Qᵀ (``HessianFit.low_rank_factors``), or None = I.
Transform = np.ndarray | tuple[float, np.ndarray, np.ndarray] | None

RULE = (
    "Each part is (T_q u_q)·(T_m u_part) / ||T_m u_m|| (query side unit-normed and divisor "
    "1 when the preset has no unit norm; T = I without a Hessian): the candidate's corrected, "
    "projected gradient restricted to one parameter tensor, or to the loss term of one "
    "predicted token, so the layer parts and the token parts each sum to the score, and since "
    "the divisor is the whole candidate's norm a part is a share of the score, not a cosine."
)

# Token positions whose per-position gradients are taken in one call: memory is this many
# gradient pytrees, and padding to a fixed count keeps the kernel at one compilation.
POSITIONS_PER_CALL = 8


class BreakdownError(ValueError):
    """A breakdown that cannot be computed as asked; the message says what to change."""


@dataclasses.dataclass
class Breakdown:
    """One (query, proponent) score split by parameter tensor and by proponent token.

    ``layers``: ``(tensor path, part)`` in the projector's parameter order; ``tokens``:
    ``(token text, part)`` for each position of the proponent with nonzero loss weight, in
    order (the token that position predicts). Each list sums to ``score`` up to rounding.
    """

    score: float
    layers: list[tuple[str, float]]
    tokens: list[tuple[str, float]]
    rule: str = RULE

    def to_json(self) -> dict:
        """``{"score", "layers": [{"name", "score"}], "tokens": [{"token", "score"}], "rule"}``
        with plain Python floats."""
        return {
            "score": float(self.score),
            "layers": [{"name": str(n), "score": float(s)} for n, s in self.layers],
            "tokens": [{"token": str(t), "score": float(s)} for t, s in self.tokens],
            "rule": str(self.rule),
        }


@dataclasses.dataclass(frozen=True)
class Parts:
    """The numbers behind a ``Breakdown`` (``score_parts``), float64 on the host.

    ``table_PxL[i, l]``: the part of position ``positions[i]`` through tensor ``paths[l]``;
    its column sums are ``layer_parts``, its row sums ``token_parts``, its total ``≈ score``.
    """

    score: float
    paths: list[str]
    positions: np.ndarray  # int64 (P,): token positions with nonzero loss weight
    table_PxL: np.ndarray
    norm: float  # ||T_m u_m|| under unit norm, else 1

    @property
    def layer_parts(self) -> np.ndarray:
        """Part per parameter tensor (``paths`` order)."""
        return self.table_PxL.sum(axis=0)

    @property
    def token_parts(self) -> np.ndarray:
        """Part per counted position (``positions`` order)."""
        return self.table_PxL.sum(axis=1)


def apply_transform(t: Transform, x_NxD: Any) -> np.ndarray:
    """``T x`` for each row, in float64 (``t`` as in ``Transform``; None = identity)."""
    x = np.asarray(x_NxD, np.float64)
    if t is None:
        return x
    if isinstance(t, tuple):
        scale, q_DxR, coef_R = t
        q = np.asarray(q_DxR, np.float64)
        return float(scale) * x + ((x @ q) * np.asarray(coef_R, np.float64)) @ q.T
    return x @ np.asarray(t, np.float64).T


def transpose_transform(t: Transform, x_NxD: Any) -> np.ndarray:
    """``Tᵀ x`` for each row, in float64 (a low-rank T is symmetric by construction)."""
    if t is None or isinstance(t, tuple):
        return apply_transform(t, x_NxD)
    return np.asarray(x_NxD, np.float64) @ np.asarray(t, np.float64)


def prepare_query(u_q: Any, query_transform: Transform, normalize: bool) -> np.ndarray:
    """The fixed query side ``q̂ = T_q u_q``, scaled to unit length under unit norm (a zero
    vector stays zero, as in ``score.unit_rows``)."""
    q = apply_transform(query_transform, np.reshape(u_q, (1, -1)))[0]
    if normalize:
        n = float(np.linalg.norm(q))
        q = q / n if n > 0 else q
    return q


@functools.lru_cache(maxsize=8)
def _contribution_kernel(apply_fn: Callable, output_fn: str, projector: Projector) -> Callable:
    """Jitted ``(params, precond, tokens_BxT, weights_BxT, a_D) -> (C_BxL, U_BxD)``.

    Row b is one example (here: the candidate with only one position's weight kept); ``C[b, l]``
    is ``a · v_l`` with ``v_l`` tensor l's corrected, projected gradient placed in the d-vector
    (its slice in "per_tensor" mode), and ``U[b] = Σ_l v_l``, the row's ``u``. The gradients are
    the reference path's (``per_example_grads``, each row at batch size 1), corrected and
    projected leaf by leaf with the projector's own ``project_corrected``.
    """
    paths = projector.paths
    block = projector.k_in * projector.k_out

    def kernel(params, precond, tokens_BxT, weights_BxT, a_D):
        grads = dict(
            named_leaves(per_example_grads(apply_fn, params, tokens_BxT, weights_BxT, output_fn))
        )
        scales = dict(correction.named_scales(precond)) if precond is not None else {}
        factors = projector.leaf_factors()
        blocks, cols = [], []
        for i, path in enumerate(paths):
            b = projector.project_corrected(path, grads[path], scales.get(path), factors[path])
            a_l = a_D[i * block : (i + 1) * block] if projector.mode == "per_tensor" else a_D
            blocks.append(b)
            cols.append(b @ a_l)
        return jnp.stack(cols, axis=1), projector.combine(blocks)

    return jax.jit(kernel)


def score_parts(
    apply_fn: Callable,
    params: PyTree,
    projector: Projector,
    preconditioner: PyTree | None,
    query_vector: Any,
    tokens_T: Any,
    weights_T: Any,
    *,
    train_transform: Transform = None,
    query_transform: Transform = None,
    normalize: bool = True,
    output_fn: str = "train",
) -> Parts:
    """Splits ``score(m, q)`` of one candidate by parameter tensor and by counted position.

    Args:
      apply_fn, params: the model (``logits_BxTxV = apply_fn(params, tokens_BxT)``).
      projector, preconditioner: those the train vectors were made with (preconditioner None:
        a preset without the optimizer correction).
      query_vector: the query's ``u_q`` (d,), untransformed, as a query store holds it.
      tokens_T, weights_T: the candidate's tokens and loss weights (T,).
      train_transform, query_transform: ``T_m`` and ``T_q`` (``Transform``; None = I), e.g.
        from ``preset_transforms``.
      normalize: the preset's unit norm.
      output_fn: the candidate's output function (training examples: ``"train"``).

    Returns:
      ``Parts``: the recomputed score and the position × tensor table of parts.

    Raises:
      BreakdownError: the candidate has no counted token, or the query's dimension is not the
        projector's.
    """
    tokens_T = np.asarray(tokens_T, np.int32).reshape(-1)
    weights_T = np.asarray(weights_T, np.float32).reshape(-1)
    if tokens_T.shape != weights_T.shape:
        raise BreakdownError(f"tokens {tokens_T.shape} and weights {weights_T.shape} differ")
    positions = np.flatnonzero(weights_T != 0)
    if positions.size == 0:
        raise BreakdownError("the candidate has no token with nonzero loss weight to split")
    q_hat = prepare_query(query_vector, query_transform, normalize)
    if q_hat.shape != (projector.dim,):
        raise BreakdownError(
            f"the query vector has d = {q_hat.size}, the projector d = {projector.dim}; use the "
            "query vector of a store made with this projection"
        )
    # Every part is a · v / n with a = T_mᵀ q̂, so T_m is applied once, not per part.
    a_D = jnp.asarray(transpose_transform(train_transform, q_hat[None])[0], jnp.float32)
    kernel = _contribution_kernel(apply_fn, output_fn, projector)
    n_calls = -(-positions.size // POSITIONS_PER_CALL)
    # One row per counted position: its own weight, every other weight 0 (the loss is linear
    # in the weights, so these rows' gradients sum to the candidate's). Padding rows are all 0.
    masks = np.zeros((n_calls * POSITIONS_PER_CALL, tokens_T.size), np.float32)
    masks[np.arange(positions.size), positions] = weights_T[positions]
    tokens = np.broadcast_to(tokens_T, masks.shape)
    tables, rows = [], []
    for c in range(n_calls):
        sl = slice(c * POSITIONS_PER_CALL, (c + 1) * POSITIONS_PER_CALL)
        t_BxL, u_BxD = kernel(params, preconditioner, tokens[sl], masks[sl], a_D)
        tables.append(np.asarray(t_BxL, np.float64))
        rows.append(np.asarray(u_BxD, np.float64))
    table = np.concatenate(tables)[: positions.size]
    u_m = np.concatenate(rows)[: positions.size].sum(axis=0)
    g_m = apply_transform(train_transform, u_m[None])[0]
    norm = float(np.linalg.norm(g_m)) if normalize else 1.0
    # A zero candidate vector scores 0 (score.unit_rows), and so does each of its parts.
    inv = 1.0 / norm if norm > 0 else 0.0
    return Parts(
        score=float(q_hat @ g_m) * inv,
        paths=list(projector.paths),
        positions=positions.astype(np.int64),
        table_PxL=table * inv,
        norm=norm,
    )


def preset_transforms(
    preset: str | score.PresetSpec, fit: HessianFit | None
) -> tuple[Transform, Transform]:
    """``(T_m, T_q)`` of a scoring preset from its Hessian fit (low-rank factors where the fit
    holds them, else its d×d matrices); ``(None, None)`` for a preset without a Hessian."""
    spec = score.get_preset(preset)
    train_name, query_name = spec.transform_names()
    if spec.hessian == "none":
        return None, None
    if fit is None:
        raise BreakdownError(
            f"preset {preset!r} needs a Hessian fit ({spec.hessian} R); run the hessian stage "
            "(scripts/fit_hessian.py) or pick a preset without R"
        )

    def get(name: str | None) -> Transform:
        if name is None:
            return None
        factors = fit.low_rank_factors(name)
        return factors if factors is not None else fit.transform(name)

    return get(train_name), get(query_name)


def token_texts(tok: Any, tokens_T: Any, positions: Sequence[int]) -> list[str]:
    """The text of the token at each position (``trackstar.tokenizer.decode`` of one id)."""
    tokens_T = np.asarray(tokens_T).reshape(-1)
    return [tokenizer.decode(tok, [int(tokens_T[p])]) for p in positions]


def to_breakdown(parts: Parts, texts: Sequence[str]) -> Breakdown:
    """A ``Breakdown`` of ``parts`` with ``texts`` for its counted positions."""
    return Breakdown(
        score=float(parts.score),
        layers=[(p, float(s)) for p, s in zip(parts.paths, parts.layer_parts, strict=True)],
        tokens=[(t, float(s)) for t, s in zip(texts, parts.token_parts, strict=True)],
    )


def run_breakdowns(
    cfg: Any,
    trained: stages.Trained,
    pairs: Sequence[tuple[int, int]],
    preset: str = "trackstar",
    candidates: str = "candidates",
) -> list[Breakdown]:
    """Breakdowns of ``(task query row, candidate id)`` pairs of a run directory.

    Uses what ``stages.stage_score`` scored the pair with: the finished ``candidates`` store's
    projection and correction (rebuilt from its metadata), the task query store's row as
    ``u_q`` and the preset's Hessian fit (``stages.preset_fit``); the candidate's gradient is
    recomputed from its tokens (``stages.examples_for``). So ``score`` equals the pair's score
    in ``results/proponents_<candidates>_<preset>.npz`` to float32 rounding (to the row dtype's
    rounding for a bfloat16 store). Token texts come from ``trained.tok``.

    Raises:
      BreakdownError: a query row or candidate id out of range, or a candidate without counted
        tokens (skipped at featurize).
      StageError / StoreError / ScoreError: the preset's stores or fit are missing or do not
        belong together (the message names the stage to run).
    """
    spec = score.get_preset(preset)
    inputs = stages.score_inputs(cfg, preset, candidates)
    meta = inputs.train_store.meta
    examples, output_fn, _ = stages.examples_for(cfg, trained, candidates)
    _, q_QxD = inputs.query_store.read_all()
    n_queries = len(trained.world.task_queries)
    if q_QxD.shape[0] != n_queries:
        raise BreakdownError(
            f"the task query store holds {q_QxD.shape[0]} rows but the run has {n_queries} task "
            "queries; refeaturize the task queries"
        )
    checked = [_check_pair(pair, n_queries, examples, candidates) for pair in pairs]
    try:
        projector = projection_lib.from_meta(trained.params, meta.projection)
    except ValueError as e:
        raise BreakdownError(str(e)) from e
    if projector.config().get("factors_hash") != meta.projection.get("factors_hash"):
        # The same settings regenerate other factors (another generator): the parts would not
        # belong to the stored vectors.
        raise BreakdownError(
            f"the projection factors rebuilt from the store at {inputs.train_store.path} differ "
            "from the ones it was featurized with; refeaturize the stores with this version"
        )
    precond = None
    if spec.corrected:
        settings = correction.CorrectionSettings(**meta.correction_settings)
        precond = stages.make_preconditioner(cfg, trained, settings)
    t_m, t_q = preset_transforms(preset, inputs.fit)
    out = []
    for q_row, cand in checked:
        tokens_T, weights_T = examples.tokens_NxT[cand], examples.weights_NxT[cand]
        parts = score_parts(
            trained.apply_fn,
            trained.params,
            projector,
            precond,
            q_QxD[q_row],
            tokens_T,
            weights_T,
            train_transform=t_m,
            query_transform=t_q,
            normalize=spec.normalize,
            output_fn=meta.output_fn or output_fn,
        )
        out.append(to_breakdown(parts, token_texts(trained.tok, tokens_T, parts.positions)))
    return out


def _check_pair(pair: Any, n_queries: int, examples: Any, candidates: str) -> tuple[int, int]:
    """``(query row, candidate id)`` as ints, or a ``BreakdownError`` saying what is wrong."""
    try:
        q_row, cand = (int(x) for x in pair)
    except (TypeError, ValueError):
        raise BreakdownError(
            f"a pair must be (task query row, candidate id), got {pair!r}"
        ) from None
    if not 0 <= q_row < n_queries:
        raise BreakdownError(
            f"query row {q_row} is out of range: the run has {n_queries} task queries "
            f"(rows 0..{n_queries - 1})"
        )
    n = len(examples)
    if not 0 <= cand < n:
        raise BreakdownError(
            f"candidate id {cand} is out of range: the {candidates!r} set has {n} examples "
            f"(ids 0..{n - 1})"
        )
    if not np.any(examples.weights_NxT[cand] != 0):
        reason = examples.skipped.get(cand, "no counted tokens")
        raise BreakdownError(
            f"candidate id {cand} of {candidates!r} was not featurized ({reason}), so it has no "
            "score to split; pick another candidate"
        )
    return q_row, cand
