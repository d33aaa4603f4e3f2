"""Optimizer against explicit AdamW, the loss, learning on a toy, and exact resume."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tolerances import assert_close
from toy_models import demo_lm

from trackstar import checkpoint as C
from trackstar import families
from trackstar import train as T
from trackstar.tree import named_leaves

V, B, SEQ = 16, 8, 12
MODEL = demo_lm(d_model=16, n_layers=1, n_heads=2, d_ff=32, max_len=SEQ)
TRAIN = dict(
    optimizer="adamw",
    steps=12,
    batch_size=B,
    seq_len=SEQ,
    lr=3e-3,
    final_lr=3e-4,
    warmup_steps=2,
    b1=0.9,
    b2=0.98,
    eps=1e-8,
    weight_decay=0.01,
    checkpoint_every=4,
    keep_checkpoints=2,
    log_every=4,
)


@pytest.fixture(scope="module")
def lm():
    return families.make_model(MODEL, V, seed=0)


def counting_batch(step):
    """A learnable stream: each row counts up from a random start (pure in step)."""
    rng = np.random.default_rng(step)
    start = rng.integers(0, V - 4, size=(B, 1))
    tokens = (start + np.arange(SEQ)) % (V - 4) + 4
    weights = np.ones((B, SEQ), np.float32)
    weights[:, 0] = 0
    weights[:, -2:] *= rng.integers(0, 2, size=(B, 1))  # Some rows weight fewer tokens.
    return tokens.astype(np.int32), weights


def _assert_trees_identical(a, b):
    la, lb = named_leaves(a), named_leaves(b)
    assert [n for n, _ in la] == [n for n, _ in lb]
    for (name, x), (_, y) in zip(la, lb, strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y)), f"{name} differs"


def test_schedule_and_adamw_step_match_explicit_formula():
    sched = T.lr_schedule(TRAIN)
    np.testing.assert_allclose([sched(0), sched(2), sched(12)], [0.0, 3e-3, 3e-4], rtol=1e-6)
    assert 3e-4 < float(sched(7)) < 3e-3

    cfg = dict(TRAIN, warmup_steps=0)
    opt = T.make_optimizer(cfg)
    params = {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "b": jnp.array([0.2, -0.1])}
    grads = {"w": jnp.array([[0.1, 0.0], [-0.3, 2.0]]), "b": jnp.array([1e-3, -4.0])}
    state = opt.init(params)
    updates, state = opt.update(grads, state, params)
    lr = 3e-3
    for k in params:
        g, p = np.asarray(grads[k], np.float64), np.asarray(params[k], np.float64)
        # One bias-corrected Adam step: m_hat = g, v_hat = g^2; decay on matrices only.
        expected = -lr * (g / (np.abs(g) + 1e-8) + (0.01 * p if p.ndim == 2 else 0.0))
        assert_close(np.asarray(updates[k]), expected)
    nu = [s for s in jax.tree.leaves(state, is_leaf=lambda x: hasattr(x, "nu")) if hasattr(s, "nu")]
    np.testing.assert_allclose(nu[0].nu["w"], (1 - 0.98) * np.asarray(grads["w"]) ** 2, rtol=1e-6)

    ada = T.make_optimizer(dict(TRAIN, optimizer="adafactor"))
    ada_state = ada.init(params)
    assert any(
        isinstance(s, optax.FactoredState)
        for s in jax.tree.leaves(ada_state, is_leaf=lambda x: isinstance(x, optax.FactoredState))
    )


def test_mean_token_loss_matches_explicit_sum():
    logits = jax.random.normal(jax.random.key(0), (2, 5, 7))
    tokens = jnp.array([[1, 2, 3, 4, 5], [6, 0, 1, 2, 3]])
    weights = jnp.array([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]], jnp.float32)
    loss, n = T.mean_token_loss(logits, tokens, weights)
    lg = np.asarray(logits, np.float64)
    terms = [
        -(lg[b, t - 1, tokens[b, t]] - np.log(np.exp(lg[b, t - 1]).sum()))
        for b in range(2)
        for t in range(1, 5)
        if weights[b, t]
    ]
    assert float(n) == 6
    np.testing.assert_allclose(float(loss), np.mean(terms), rtol=1e-5)


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_loss_decreases_on_learnable_toy(lm, tmp_path, optimizer):
    apply_fn, params = lm
    cfg = dict(TRAIN, optimizer=optimizer, steps=60, lr=1e-2, final_lr=1e-3, checkpoint_every=60)
    cfg["log_every"] = 10
    opt = T.make_optimizer(cfg)
    p_end, s_end, hist = T.train_loop(
        apply_fn, params, opt, counting_batch, cfg, str(tmp_path), progress=False
    )
    losses = [h["loss"] for h in hist]
    assert len(losses) == 6 and all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], losses
    assert hist[-1]["tokens_per_s"] > 0 and hist[-1]["step"] == 60
    assert C.all_steps(str(tmp_path)) == [60]
    # The final checkpoint restores this optimizer's full state exactly.
    abstract = jax.eval_shape(lambda q: q, params)
    p_ck, s_ck, _ = C.restore(str(tmp_path), abstract, jax.eval_shape(opt.init, abstract))
    _assert_trees_identical(p_ck, p_end)
    _assert_trees_identical(s_ck, s_end)


def test_interrupted_runs_resume_bit_identical(lm, tmp_path):
    apply_fn, params = lm
    opt = T.make_optimizer(TRAIN)

    def run(name, batch_fn=counting_batch, **kw):
        return T.train_loop(
            apply_fn, params, opt, batch_fn, TRAIN, str(tmp_path / name), progress=False, **kw
        )

    p_ref, s_ref, _ = run("full")

    def crashing(step):
        if step == 6:
            raise KeyboardInterrupt  # Dies between checkpoints: steps 4-5 are lost and replayed.
        return counting_batch(step)

    with pytest.raises(KeyboardInterrupt):
        run("crash", crashing)
    assert C.latest_step(str(tmp_path / "crash")) == 4
    p_c, s_c, hist = run("crash")
    assert [h["step"] for h in hist] == [8, 12]  # Resumed from step 4, not from scratch.
    _assert_trees_identical(p_c, p_ref)
    _assert_trees_identical(s_c, s_ref)

    run("split", stop_after=5)
    assert C.all_steps(str(tmp_path / "split")) == [4, 5]
    p_s, s_s, _ = run("split")
    _assert_trees_identical(p_s, p_ref)
    _assert_trees_identical(s_s, s_ref)
    meta = C.read_meta(str(tmp_path / "split"))
    ref_meta = C.read_meta(str(tmp_path / "full"))
    assert meta["step"] == meta["data_position"] == 12
    assert meta["params_fingerprint"] == ref_meta["params_fingerprint"]
    assert meta["opt_state_fingerprint"] == ref_meta["opt_state_fingerprint"]

    # The caller's initial params were not donated away, and a finished run is a no-op.
    assert np.isfinite(np.asarray(params["unembed"]["kernel"])).all()
    p_again, _, hist = run("full")
    assert hist == []
    _assert_trees_identical(p_again, p_ref)

    # Refusals: a fresh start over existing checkpoints, a changed trajectory config.
    with pytest.raises(T.TrainConfigError, match="already holds checkpoints"):
        run("full", resume=False)
    changed = dict(TRAIN, lr=1e-2)
    with pytest.raises(T.TrainConfigError, match=r"lr: 0.003 -> 0.01"):
        T.train_loop(apply_fn, params, opt, counting_batch, changed, str(tmp_path / "full"))


def test_bad_train_config_is_refused():
    with pytest.raises(T.TrainConfigError, match="train.optimizer = 'sgd'"):
        T.make_optimizer(dict(TRAIN, optimizer="sgd"))
    with pytest.raises(T.TrainConfigError, match="warmup_steps"):
        T.make_optimizer(dict(TRAIN, warmup_steps=12))
    with pytest.raises(T.TrainConfigError, match="checkpoint_every"):
        T.check_train_config(dict(TRAIN, checkpoint_every=0))
