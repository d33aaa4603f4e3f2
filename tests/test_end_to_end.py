"""End to end: model + AdamW state -> featurize -> store -> R -> scores, against the formula

    score(m, q) = normalize(R^{-1/2} P (g_m / (sqrt(v̂) + eps))) · normalize(R^{-1/2} P (g_q / ...))

computed densely: per-example gradients by a Python loop of ``jax.grad``, the dense projection
matrix built from the same Kronecker factors, R mixed from dense u uᵀ sums, R^{-1/2} by eigh.

Two models, one per per-example gradient path of ``make_feature_fn``: the toy nnx Transformer
(tests/toy_models.py, no layer taps: the vmap-of-grad reference) and the project's own
``trackstar.model`` LM (layer taps: the ``activation_features`` fast path).
"""

import jax
import numpy as np
import optax
import pytest
from tolerances import assert_close
from toy_models import demo_lm, make_toy_transformer

from trackstar import correction, gradients, hessian, score
from trackstar.families import make_model
from trackstar.featurize import Examples, featurize_into_store
from trackstar.gradients import make_feature_fn, output_loss
from trackstar.projection import Projector
from trackstar.store import StoreMeta, VectorStore, check_compatible
from trackstar.tree import named_leaves

# The optimizer's own eps, 1e-8: a parameter whose Adam nu is still 0 after three steps (a
# token never seen as an input) is bounded by the V floor instead of getting 1/EPS.
V, T, B2, EPS, V_FLOOR, LAMBDA, DAMPING = 29, 10, 0.98, 1e-8, 1e-4, 0.3, 0.1
# The project's LM at test size; max_len > T, so some position rows never get a gradient.
PROJECT_LM = demo_lm(d_model=8, n_layers=1, n_heads=2, d_ff=16, max_len=T + 2)


def _model(name):
    if name == "toy":
        return make_toy_transformer(vocab=V, d_model=8, d_ff=16, max_len=T)
    return make_model(PROJECT_LM, V, seed=0)


def _examples(n, seed, target_only=False):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, V, size=(n, T)).astype(np.int32)
    weights = np.zeros((n, T), np.float32)
    for i in range(n):
        length = int(rng.integers(4, T + 1))
        tokens[i, length:] = 0
        weights[i, (length - 2 if target_only else 1) : length] = 1.0
    return Examples(tokens, weights)


def _store(path, kind, n, dim, projector, output_fn, settings):
    meta = StoreMeta(
        kind=kind,
        dim=dim,
        dtype="float32",
        num_examples=n,
        chunk_size=8,
        model_fingerprint="toy",
        optimizer_fingerprint="toy-adamw",
        projection=projector.config(),
        output_fn=output_fn,
        correction="adam",
        correction_settings=settings.to_dict(),
    )
    return VectorStore.create(str(path), meta)


def _trained(apply_fn, params, train):
    """``(params, opt_state)`` after three AdamW steps, so v̂ is not uniform."""
    opt = optax.adamw(1e-2, b2=B2, eps=EPS)

    @jax.jit
    def step(params, opt_state):
        grads = jax.grad(
            lambda p: output_loss(
                apply_fn(p, train.tokens_NxT), train.tokens_NxT, train.weights_NxT, "train"
            ).mean()
        )(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = opt.init(params)
    for _ in range(3):
        params, opt_state = step(params, opt_state)
    return params, opt_state


def _dense_scores(apply_fn, params, opt_state, projector, train, queries):
    """The formula of the module docstring, in float64 from per-example ``jax.grad``."""
    P_DxN = np.asarray(projector.dense_matrix(), np.float64)
    adam = correction.find_moment_states(opt_state)[0][1]
    v_hat = np.concatenate(
        [np.asarray(v, np.float64).reshape(-1) for _, v in named_leaves(adam.nu)]
    ) / (1 - B2 ** int(adam.count))
    assert np.min(v_hat) == 0.0  # a never-updated parameter: the floor is exercised
    # 1 / (sqrt(max(v_hat, V_FLOOR * mean v_hat)) + EPS).
    scale = 1.0 / (np.sqrt(np.maximum(v_hat, V_FLOOR * v_hat.mean())) + EPS)

    def u(ex, kind):
        # One example at a time (a 1 x T batch): jit only saves re-tracing the model each time.
        grad_fn = jax.jit(
            jax.grad(lambda p, tok, wts: output_loss(apply_fn(p, tok), tok, wts, kind).sum())
        )
        rows = []
        for i in range(len(ex)):
            g = grad_fn(params, ex.tokens_NxT[i : i + 1], ex.weights_NxT[i : i + 1])
            flat = np.concatenate(
                [np.asarray(x, np.float64).reshape(-1) for _, x in named_leaves(g)]
            )
            rows.append(P_DxN @ (flat * scale))
        return np.stack(rows)

    u_m, u_q = u(train, "train"), u(queries, "loss")
    R = LAMBDA * (u_q.T @ u_q / len(u_q)) + (1 - LAMBDA) * (u_m.T @ u_m / len(u_m))
    evals, evecs = np.linalg.eigh(R)
    evals = np.clip(evals, 0.0, None)
    R_inv_sqrt = (evecs * (evals + DAMPING * evals.mean()) ** -0.5) @ evecs.T

    def unit(x):
        x = x @ R_inv_sqrt
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    return unit(u_q) @ unit(u_m).T


@pytest.mark.parametrize("model", ["toy", "project"])
def test_trackstar_scores_equal_dense_formula(tmp_path, monkeypatch, model):
    apply_fn, params = _model(model)
    train = _examples(20, seed=1)
    queries = _examples(6, seed=2, target_only=True)
    params, opt_state = _trained(apply_fn, params, train)

    # Which per-example gradient path featurize takes: the flag make_feature_fn sets, and a
    # spy on the fast path's kernel (called while the feature function is traced).
    fast_calls = []
    real_activation_features = gradients.activation_features

    def spy(*args, **kwargs):
        fast_calls.append(args[5])  # output_fn
        return real_activation_features(*args, **kwargs)

    monkeypatch.setattr(gradients, "activation_features", spy)
    expect_fast = model == "project"

    train_config = {"optimizer": "adamw", "b2": B2, "eps": EPS}
    settings = correction.settings_from(opt_state, train_config, v_floor=V_FLOOR)
    precond = correction.preconditioner_for(settings, opt_state, params)
    projector = Projector(params, "global", 4, 4, seed=3)
    d = projector.dim
    stores = {}
    for name, ex, fn, kind in (("train", train, "train", "train"), ("q", queries, "loss", "query")):
        vs = _store(tmp_path / name, kind, len(ex), d, projector, fn, settings)
        feature_fn = make_feature_fn(apply_fn, fn, projector, precond)
        assert feature_fn.fast is expect_fast
        featurize_into_store(feature_fn, params, ex, vs, 8, progress=False)
        vs.finalize()
        stores[name] = VectorStore.open(str(tmp_path / name))
    assert fast_calls == (["train", "loss"] if expect_fast else [])
    check_compatible(stores["train"].meta, stores["q"].meta)
    fit = hessian.fit_hessian(
        stores["train"], stores["q"], {"lambda_mix": LAMBDA, "damping": DAMPING}, d
    )
    ids, scores = score.score_preset(stores["train"], stores["q"], "trackstar", fit, k=20)

    dense_QxN = _dense_scores(apply_fn, params, opt_state, projector, train, queries)
    order = np.argsort(-dense_QxN, axis=1, kind="stable")
    np.testing.assert_array_equal(ids, order)
    # Cosines: the scale is 1, so 1e-4 of the largest |score| is the float32 pipeline's rounding.
    assert_close(scores, np.take_along_axis(dense_QxN, order, 1), rtol=0, peak_rtol=1e-4)
