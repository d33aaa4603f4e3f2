"""Score breakdowns (trackstar.breakdown): the parts of one (query, candidate) score by tensor
and by token, checked against the dense formula on a toy model and against the score stage's
scores on a tiny run."""

import json
import os

import jax
import numpy as np
import pytest
from tolerances import assert_close
from toy_models import make_toy_transformer, random_preconditioner

from trackstar import breakdown, score, stages
from trackstar.attributor import AttributionError, Attributor
from trackstar.breakdown import Breakdown, BreakdownError, run_breakdowns, score_parts
from trackstar.correction import named_scales
from trackstar.gradients import make_feature_fn
from trackstar.losses import output_loss
from trackstar.projection import Projector
from trackstar.tree import named_leaves

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs")
# Parts and scores go through float32 kernels (projection, gradients) in other orders than
# the reference: agreement to a few float32 ulps of the terms, scaled by the magnitude.
RTOL = 2e-4


# ----- toy model: the dense formula ---------------------------------------------------------


@pytest.fixture(scope="module")
def toy():
    apply_fn, params = make_toy_transformer(vocab=29, d_model=8, d_ff=16, max_len=12, seed=3)
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 29, 12).astype(np.int32)
    # Uneven weights, a zero weight inside and an uncounted tail: only nonzero positions count.
    weights = np.array([0, 1, 0.5, 2, 0, 1, 1, 1.5, 1, 0, 0, 0], np.float32)
    return apply_fn, params, tokens, weights


class DenseU:
    """P (g ⊙ c) from the full gradient, the dense elementwise factor and the dense matrix,
    built once per projector; ``only``: keep one tensor's gradient (zero elsewhere)."""

    def __init__(self, apply_fn, params, projector, precond):
        def loss(p, tokens, weights):
            logits = apply_fn(p, tokens[None])
            return output_loss(logits, tokens[None], weights[None], "train")[0]

        # One compiled gradient for every weight vector (the token parts call it per position).
        self.grad = jax.jit(lambda tokens, weights: jax.grad(loss)(params, tokens, weights))
        self.scales = dict(named_scales(precond)) if precond is not None else {}
        self.matrix = np.asarray(projector.dense_matrix(), np.float64)

    def __call__(self, tokens, weights, only=None):
        flat = []
        for path, g in named_leaves(self.grad(tokens, weights)):
            g = np.asarray(g, np.float64)
            if path in self.scales:
                g = g * np.asarray(self.scales[path].dense(), np.float64)
            flat.append(g.ravel() if only in (None, path) else np.zeros(g.size))
        return self.matrix @ np.concatenate(flat)


def _inverse_root(d, power, seed):
    """(R + δ·mean l)^power of a random rank-deficient PSD R, by eigh."""
    x = np.random.default_rng(seed).standard_normal((d // 2, d))
    lam, vec = np.linalg.eigh(x.T @ x / x.shape[0])
    lam = np.clip(lam, 0, None)
    return (vec * (lam + 0.1 * lam.mean()) ** power) @ vec.T


def _dense_score(q, t_q, u_m, t_m, normalize):
    q = q if t_q is None else t_q @ q
    g = u_m if t_m is None else t_m @ u_m
    if normalize:
        return q @ g / (np.linalg.norm(q) * np.linalg.norm(g)), np.linalg.norm(g)
    return q @ g, 1.0


@pytest.mark.parametrize(
    "mode,precond_kind", [("global", "adam"), ("per_tensor", "factored"), ("dense", "none")]
)
def test_parts_follow_the_dense_formula(toy, mode, precond_kind):
    apply_fn, params, tokens, weights = toy
    projector = Projector(params, mode, k_in=4, k_out=4, seed=5, dense_dim=24)
    precond = random_preconditioner(precond_kind, params)
    d = projector.dim
    t = _inverse_root(d, -0.5, seed=1)  # R^{-1/2}, on both sides as in "trackstar"
    u_q = np.random.default_rng(2).standard_normal(d)
    parts = score_parts(
        apply_fn, params, projector, precond, u_q, tokens, weights,
        train_transform=t, query_transform=t, normalize=True,
    )  # fmt: skip
    dense_u = DenseU(apply_fn, params, projector, precond)
    u_m = dense_u(tokens, weights)
    want, norm = _dense_score(u_q, t, u_m, t, True)
    assert_close(parts.score, want, rtol=RTOL)
    assert_close(parts.norm, norm, rtol=RTOL)
    # Layer parts and token parts each sum to the score.
    assert_close(parts.layer_parts.sum(), parts.score, rtol=RTOL, peak_rtol=RTOL)
    assert_close(parts.token_parts.sum(), parts.score, rtol=RTOL, peak_rtol=RTOL)
    # One entry per nonzero weight, in order; one per tensor, in parameter order.
    np.testing.assert_array_equal(parts.positions, np.flatnonzero(weights))
    assert parts.paths == projector.paths
    q_hat = t @ u_q / np.linalg.norm(t @ u_q)
    # A tensor's part: the dense formula restricted to its gradient, over the full norm.
    want_layers = [q_hat @ t @ dense_u(tokens, weights, only=p) / norm for p in projector.paths]
    assert_close(parts.layer_parts, want_layers, rtol=RTOL, peak_rtol=RTOL)
    # A token's part: the gradient of that position's loss term alone.
    want_tokens = []
    for pos in parts.positions:
        one = np.zeros_like(weights)
        one[pos] = weights[pos]
        u_t = dense_u(tokens, one)
        want_tokens.append(q_hat @ t @ u_t / norm)
    assert_close(parts.token_parts, want_tokens, rtol=RTOL, peak_rtol=RTOL)

    # The score path (feature kernel -> top_k_scores) gives the same score for the pair.
    feature_fn = make_feature_fn(apply_fn, "train", projector, precond)
    u_fast = np.asarray(feature_fn(params, tokens[None], weights[None]))
    other = np.random.default_rng(4).standard_normal((1, d)).astype(np.float32)
    ids, scores = score.top_k_scores(
        np.concatenate([u_fast, other]), u_q[None].astype(np.float32), t, t, True, k=2
    )
    assert_close(parts.score, scores[0][list(ids[0]).index(0)], rtol=RTOL)


@pytest.mark.parametrize("preset", ["grad_dot", "exp_opt", "trak"])
def test_presets_without_unit_norm_decompose(toy, preset):
    """No unit norm (every part is a plain dot product), no Hessian, or TRAK's one-sided R."""
    apply_fn, params, tokens, weights = toy
    spec = score.PRESETS[preset]
    projector = Projector(params, "global", k_in=4, k_out=4, seed=7)
    precond = random_preconditioner("adam" if spec.corrected else "none", params)
    u_q = np.random.default_rng(3).standard_normal(projector.dim)
    t_q = _inverse_root(projector.dim, -1.0, seed=2) if spec.one_sided else None
    parts = score_parts(
        apply_fn, params, projector, precond, u_q, tokens, weights,
        train_transform=None, query_transform=t_q, normalize=spec.normalize,
    )  # fmt: skip
    dense_u = DenseU(apply_fn, params, projector, precond)
    u_m = dense_u(tokens, weights)
    want, _ = _dense_score(u_q, t_q, u_m, None, spec.normalize)
    assert parts.norm == 1.0
    assert_close(parts.score, want, rtol=RTOL)
    assert_close(parts.layer_parts.sum(), want, rtol=RTOL, peak_rtol=RTOL)
    assert_close(parts.token_parts.sum(), want, rtol=RTOL, peak_rtol=RTOL)
    q_side = u_q if t_q is None else t_q @ u_q
    path = projector.paths[0]
    only = dense_u(tokens, weights, only=path)
    assert_close(parts.layer_parts[0], q_side @ only, rtol=RTOL, peak_rtol=RTOL)


def test_low_rank_transform_matches_its_dense_matrix(toy):
    apply_fn, params, tokens, weights = toy
    projector = Projector(params, "global", k_in=4, k_out=4, seed=7)
    d = projector.dim
    basis, _ = np.linalg.qr(np.random.default_rng(5).standard_normal((d, 3)))
    low_rank = (0.7, basis.astype(np.float32), np.array([0.5, -0.2, 0.1]))
    dense = 0.7 * np.eye(d) + (basis * low_rank[2]) @ basis.T
    u_q = np.random.default_rng(6).standard_normal(d)
    kw = {"normalize": True}
    a = score_parts(apply_fn, params, projector, None, u_q, tokens, weights,
                    train_transform=low_rank, query_transform=low_rank, **kw)  # fmt: skip
    b = score_parts(apply_fn, params, projector, None, u_q, tokens, weights,
                    train_transform=dense, query_transform=dense, **kw)  # fmt: skip
    assert_close(a.score, b.score, rtol=RTOL)
    assert_close(a.table_PxL, b.table_PxL, rtol=RTOL, peak_rtol=RTOL)


def test_no_counted_token_is_refused(toy):
    apply_fn, params, tokens, _ = toy
    projector = Projector(params, "global", k_in=4, k_out=4)
    with pytest.raises(BreakdownError, match="no token with nonzero loss weight"):
        score_parts(apply_fn, params, projector, None, np.ones(16), tokens, np.zeros(tokens.shape))


def test_to_json_is_plain():
    b = Breakdown(
        score=np.float32(0.5),
        layers=[("a/kernel", np.float64(0.25)), ("b/bias", 0.25)],
        tokens=[("x", np.float32(0.5))],
    )
    out = b.to_json()
    assert json.loads(json.dumps(out)) == out
    assert out["rule"] == breakdown.RULE and set(out) == {"score", "layers", "tokens", "rule"}
    assert out["layers"] == [{"name": "a/kernel", "score": 0.25}, {"name": "b/bias", "score": 0.25}]
    assert type(out["score"]) is float and out["tokens"] == [{"token": "x", "score": 0.5}]


# ----- a tiny run: the score stage's scores ---------------------------------------------------


@pytest.fixture(scope="module")
def run(tiny_run):
    return tiny_run


def _stored(result):
    with np.load(result["path"].replace(".jsonl", ".npz")) as z:
        return z["ids"], z["scores"]


@pytest.mark.parametrize("preset", ["trackstar", "exp_opt"])
def test_run_breakdowns_reproduce_the_score_stage(run, preset):
    cfg, trained, results = run
    ids, scores = _stored(results[preset])
    pairs = [(0, int(ids[0, 0])), (3, int(ids[3, -1])), (5, int(ids[5, 1]))]
    got = run_breakdowns(cfg, trained, pairs, preset=preset)
    examples, _, _ = stages.examples_for(cfg, trained, "candidates")
    paths = [p for p, _ in named_leaves(trained.params)]
    for (q, cand), b in zip(pairs, got, strict=True):
        want = scores[q, list(ids[q]).index(cand)]
        assert_close(b.score, want, rtol=RTOL)
        layer_sum = sum(s for _, s in b.layers)
        token_sum = sum(s for _, s in b.tokens)
        peak = max(abs(s) for _, s in b.layers + b.tokens)
        assert abs(layer_sum - b.score) <= RTOL * max(peak, abs(b.score))
        assert abs(token_sum - b.score) <= RTOL * max(peak, abs(b.score))
        assert [name for name, _ in b.layers] == paths
        # One token per counted position, its text the decoded token it predicts.
        counted = np.flatnonzero(examples.weights_NxT[cand])
        assert len(b.tokens) == len(counted)
        want_texts = breakdown.token_texts(trained.tok, examples.tokens_NxT[cand], counted)
        assert [t for t, _ in b.tokens] == want_texts
        assert json.loads(json.dumps(b.to_json()))["score"] == b.score


def test_attributor_breakdown_equals_run_breakdowns(run):
    cfg, trained, results = run
    ids, scores = _stored(results["trackstar"])
    q = trained.world.task_queries[2]
    cand = int(ids[2, 0])
    att = Attributor.from_run(cfg)
    b = att.breakdown(q.prompt, q.target, cand)
    (want,) = run_breakdowns(cfg, trained, [(2, cand)])
    assert_close(b.score, scores[2, 0], rtol=RTOL)
    assert [n for n, _ in b.layers] == [n for n, _ in want.layers]
    assert [t for t, _ in b.tokens] == [t for t, _ in want.tokens]
    assert_close([s for _, s in b.layers], [s for _, s in want.layers], rtol=RTOL, peak_rtol=RTOL)
    assert_close([s for _, s in b.tokens], [s for _, s in want.tokens], rtol=RTOL, peak_rtol=RTOL)
    with pytest.raises(AttributionError, match="out of range"):
        att.breakdown(q.prompt, q.target, 10**6)


def test_bad_pairs_are_refused(run):
    cfg, trained, _ = run
    n_q = len(trained.world.task_queries)
    with pytest.raises(BreakdownError, match=f"query row {n_q} is out of range"):
        run_breakdowns(cfg, trained, [(n_q, 0)])
    with pytest.raises(BreakdownError, match="candidate id -1 is out of range"):
        run_breakdowns(cfg, trained, [(0, -1)])
    with pytest.raises(BreakdownError, match="candidate id 1000000 is out of range"):
        run_breakdowns(cfg, trained, [(0, 10**6)])
    with pytest.raises(score.ScoreError, match="unknown preset"):
        run_breakdowns(cfg, trained, [(0, 0)], preset="nope")
