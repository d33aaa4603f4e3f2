"""The step_influence preset (docs/method.md, Scoring): raw query gradients against corrected
candidates. Its scores equal the dense formula (P g_q) · P (g_m ⊙ c) on a toy model, times the
tail-patch step scale η·s they predict the measured Δlog p of a one-step patch, and its stores
are chosen and checked side by side."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from store_fixtures import ArrayStore, store_meta
from tolerances import assert_close
from toy_models import make_toy_transformer

from trackstar import correction, losses, score, tailpatch
from trackstar.gradients import make_feature_fn
from trackstar.projection import Projector
from trackstar.store import StoreMismatchError
from trackstar.tree import named_leaves

B2, EPS, LR = 0.98, 1e-8, 1e-2
# The demo's featurize.v_floor: without it, entries whose gradient is float noise (the key
# bias, which softmax ignores) get factors ~1/eps and the noise dominates every vector.
V_FLOOR = 1e-4
Q, N, T = 4, 8, 8
RTOL = 2e-4  # float32 kernels (gradients, projection) in another order than the reference


@pytest.fixture(scope="module")
def toy():
    """A toy LM trained a few real Adam steps (so v̂ is as training leaves it), its
    preconditioner, queries (the last two tokens are the target) and candidates (every token
    after the first counts, as the training loss)."""
    apply_fn, params = make_toy_transformer(
        vocab=11, d_model=4, n_heads=1, d_ff=4, max_len=T, seed=0
    )
    rng = np.random.default_rng(0)
    opt = optax.adam(LR, b2=B2, eps=EPS)
    state = opt.init(params)

    def batch_loss(p, tokens):
        w = jnp.ones(tokens.shape).at[:, 0].set(0.0)
        return losses.output_loss(apply_fn(p, tokens), tokens, w, "train").mean()

    for _ in range(5):
        tokens = jnp.asarray(rng.integers(1, 11, (8, T)), jnp.int32)
        updates, state = opt.update(jax.grad(batch_loss)(params, tokens), state, params)
        params = optax.apply_updates(params, updates)
    precond = correction.preconditioner(state, params, EPS, b2=B2, v_floor=V_FLOOR)
    qt = rng.integers(1, 11, (Q, T)).astype(np.int32)
    qw = np.zeros((Q, T), np.float32)
    qw[:, -2:] = 1.0
    ct = rng.integers(1, 11, (N, T)).astype(np.int32)
    cw = np.ones((N, T), np.float32)
    cw[:, 0] = 0.0
    return apply_fn, params, state, precond, qt, qw, ct, cw


def _vectors(toy, projector):
    """``(query vectors, candidate vectors)`` as featurize makes them for step_influence:
    the query's ``loss`` gradient uncorrected, the candidate's training-loss gradient
    corrected."""
    apply_fn, params, _, precond, qt, qw, ct, cw = toy
    u_q = make_feature_fn(apply_fn, "loss", projector, None)(params, qt, qw)
    u_m = make_feature_fn(apply_fn, "train", projector, precond)(params, ct, cw)
    return np.asarray(u_q, np.float32), np.asarray(u_m, np.float32)


def _all_scores(u_q, u_m) -> np.ndarray:
    """The preset's score for every (query, candidate) pair, ``scores_QxN`` by candidate id."""
    store = ArrayStore(u_m, {"dim": u_m.shape[1], "correction": "adam"}, chunk=4)
    ids, s = score.score_preset(store, u_q, "step_influence", None, N)
    out = np.empty((Q, N))
    np.put_along_axis(out, ids, s, axis=1)
    return out


def test_scores_follow_the_dense_formula(toy):
    apply_fn, params, state, _, qt, qw, ct, cw = toy
    projector = Projector(params, "dense", dense_dim=32, seed=3)
    scores = _all_scores(*_vectors(toy, projector))

    # The reference: per-example gradients, c = 1 / (sqrt(max(v̂, floor)) + eps) from Adam's
    # own second moments (floor = v_floor · mean v̂), the dense projection matrix.
    adam = next(s for s in jax.tree.leaves(state, is_leaf=lambda x: hasattr(x, "nu")))
    v_hat = np.concatenate(
        [np.asarray(v, np.float64).ravel() for _, v in named_leaves(adam.nu)]
    ) / (1 - B2 ** int(adam.count))
    c = 1.0 / (np.sqrt(np.maximum(v_hat, V_FLOOR * v_hat.mean())) + EPS)
    p_DxP = np.asarray(projector.dense_matrix(), np.float64)

    def flat_grad(tokens, weights, output_fn):
        def f(p):
            return losses.output_loss(apply_fn(p, tokens[None]), tokens[None], weights[None],
                                      output_fn)[0]  # fmt: skip

        return np.concatenate(
            [np.asarray(g, np.float64).ravel() for _, g in named_leaves(jax.grad(f)(params))]
        )

    g_q = np.stack([flat_grad(qt[i], qw[i], "loss") for i in range(Q)])
    g_m = np.stack([flat_grad(ct[j], cw[j], "train") for j in range(N)])
    dense = (g_q @ p_DxP.T) @ (p_DxP @ (g_m * c).T)
    assert_close(scores, dense, rtol=RTOL, peak_rtol=RTOL)


def test_sides_are_checked_separately(toy):
    """A corrected query store, or an uncorrected candidate store, is refused; a query store
    that differs from the candidates only by its (absent) correction is accepted."""
    u_q, u_m = _vectors(toy, Projector(toy[1], "dense", dense_dim=16, seed=1))
    cand = ArrayStore(u_m, {"dim": 16, "correction": "adam"})
    queries_corrected = ArrayStore(u_q, {"dim": 16, "correction": "adam"})
    queries_corrected.read_all = lambda: (np.arange(Q), u_q)
    with pytest.raises(score.ScoreError, match="query vectors without the optimizer"):
        score.score_preset(cand, queries_corrected, "step_influence", None, 2)
    raw_cand = ArrayStore(u_m, {"dim": 16, "correction": "none"})
    with pytest.raises(score.ScoreError, match="train vectors with the optimizer"):
        score.score_preset(raw_cand, u_q, "step_influence", None, 2)

    train = store_meta(16, N, 4, correction_settings={"b2": B2})
    query = store_meta(16, Q, 4, kind="query", correction="none", optimizer_fingerprint="none")
    score.check_query_meta("step_influence", train, query)  # only the correction differs
    with pytest.raises(StoreMismatchError, match="correction"):
        score.check_query_meta("exp_opt", train, query)
    with pytest.raises(StoreMismatchError, match="without the optimizer correction"):
        score.check_query_meta("step_influence", train, store_meta(16, Q, 4, kind="query"))
    with pytest.raises(StoreMismatchError, match="dim"):
        score.check_query_meta(
            "step_influence", train, store_meta(8, Q, 4, kind="query", correction="none")
        )
    spec = score.PRESETS["step_influence"]
    assert spec.corrected and not spec.query_side_corrected and spec.hessian == "none"
    # Records of same-sided presets keep their old fields (scoring indexes compare them).
    assert "query_corrected" not in score.PRESETS["exp_opt"].record()
    with pytest.raises(score.ScoreError, match="Hessian"):
        score.PresetSpec(corrected=True, hessian="mixed", normalize=True, query_corrected=False)


def test_predicts_the_tail_patch_gain(toy):
    """η·s·score is the first-order Δlog p of a tail-patch step on the candidate.

    The projection is dense with d = 16·|θ|, so <P a, P b> = aᵀb up to a relative error of
    about ||a|| ||b|| / (aᵀb √d) (a quarter of |θ|^-1/2 for pairs with a cosine of 1/4): the
    test measures the first-order prediction, not the projection. η is set so that the largest
    predicted |Δlog p| is 1e-3: large against float32 rounding of log p (~1e-7 here), small
    enough that the second-order term (~Δ²) is ~1e-6, so slope 1 ± 0.1 and correlation > 0.99
    leave room only for the projection's error.
    """
    apply_fn, params, _, precond, qt, qw, ct, cw = toy
    n_params = sum(int(np.size(x)) for x in jax.tree.leaves(params))
    projector = Projector(params, "dense", dense_dim=16 * n_params, seed=2)
    scores = _all_scores(*_vectors(toy, projector))
    s = 1.0 / 64  # tail-patch's batch_share scale for a 64-token training batch
    eta = 1e-3 / np.abs(s * scores).max()
    ids = np.tile(np.arange(N), (Q, 1))
    delta_p = tailpatch.tailpatch_deltas(
        apply_fn, params, qt, qw, ct, cw, ids,
        lr=eta, precond=precond, scale="batch_share", counted_tokens_per_batch=64,
    )  # fmt: skip
    log_p = np.asarray(
        losses.sequence_logprob(apply_fn(params, jnp.asarray(qt)), qt, qw), np.float64
    )
    p = np.exp(log_p)[:, None]
    measured = {"dlogp": np.log1p(delta_p / p), "dp_over_p": delta_p / p}
    predicted = (eta * s * scores).ravel()
    for name, y in measured.items():
        y = y.ravel()
        assert np.corrcoef(predicted, y)[0, 1] > 0.99, name
        slope = float(predicted @ y / (predicted @ predicted))
        assert abs(slope - 1.0) < 0.1, (name, slope)
    # The sign convention: positive scores are helpful proponents (they raise p).
    helpful = scores.ravel() > 0.1 * np.abs(scores).max()
    assert helpful.any() and (delta_p.ravel()[helpful] > 0).all()
