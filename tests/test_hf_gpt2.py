"""GPT-2 (trackstar.hf.gpt2) computes what transformers' GPT2LMHeadModel computes.

A tiny random GPT-2 is saved with ``save_pretrained`` and imported with
``trackstar.hf.loader.load_checkpoint``: logits on a right-padded batch, one example's loss
gradient against torch autograd parameter by parameter (the tied embedding's gradient includes
the head's), and the fast path's features (the tied head through the ``"unembed"`` tap) against
the per-example-gradient reference. torch and transformers are test-only and imported here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import assert_close
from toy_models import padded_batch, random_preconditioner

from trackstar import correction, families, taps
from trackstar.gradients import make_feature_fn
from trackstar.hf import gpt2
from trackstar.hf.loader import load_checkpoint
from trackstar.projection import Projector
from trackstar.tree import named_leaves

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, D, LAYERS, HEADS, POSITIONS = 100, 32, 2, 4, 32
LENGTHS = (12, 7, 4)  # right padding after each length
TOL = 1e-4


def _tiny_gpt2(seed: int = 0, **overrides):
    """A random float32 GPT-2 whose norms and biases are not at their init values."""
    config = transformers.GPT2Config(
        n_layer=LAYERS, n_embd=D, n_head=HEADS, vocab_size=VOCAB, n_positions=POSITIONS,
        bos_token_id=0, eos_token_id=0, initializer_range=0.1, **overrides,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _save(model, path):
    model.save_pretrained(path, safe_serialization=True)
    return str(path)


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    model = _tiny_gpt2()
    return model, load_checkpoint(_save(model, tmp_path_factory.mktemp("gpt2")))


def _batch(seed: int = 0):
    return padded_batch(LENGTHS, VOCAB, seed)


def _max_diffs(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    diff = np.abs(got - want)
    return float(diff.max()), float(diff.max() / np.abs(want).max())


def _check_logits(model, imported):
    tokens, mask = _batch()
    with torch.no_grad():
        want = model(torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits.numpy()
    got = np.asarray(imported.apply_fn(imported.params, jnp.asarray(tokens, jnp.int32)))
    real = mask.astype(bool)
    assert got.shape == want.shape == (len(LENGTHS), max(LENGTHS), VOCAB)
    assert np.abs(want[real]).max() > 1.0  # not a near-zero model
    assert_close(got[real], want[real], rtol=TOL, peak_rtol=TOL)
    return _max_diffs(got[real], want[real])


def test_logits_match_transformers_on_a_right_padded_batch(tied):
    model, imported = tied
    assert imported.family == "gpt2" and imported.cfg_model.family == "gpt2"
    assert imported.hf_config["model_type"] == "gpt2"
    print("logits max abs/rel diff", _check_logits(model, imported))
    # Right padding changes nothing at the real positions: row 1 alone gives the same logits.
    tokens, _ = _batch()
    alone = imported.apply_fn(imported.params, jnp.asarray(tokens[1:2, : LENGTHS[1]], jnp.int32))
    batched = imported.apply_fn(imported.params, jnp.asarray(tokens, jnp.int32))[1:2, : LENGTHS[1]]
    assert_close(alone, batched, rtol=1e-5, peak_rtol=1e-5)


def test_untied_head_and_other_options(tmp_path):
    model = _tiny_gpt2(
        seed=1,
        tie_word_embeddings=False,
        activation_function="gelu",
        scale_attn_by_inverse_layer_idx=True,
        n_inner=48,
    )
    assert model.lm_head.weight is not model.transformer.wte.weight
    imported = load_checkpoint(_save(model, tmp_path))
    assert imported.params["unembed"]["kernel"].shape == (D, VOCAB)
    _check_logits(model, imported)


def _hf_name(path: str) -> str:
    """The Hugging Face parameter of a trackstar path (gpt2's mapping tables)."""
    parts = path.split("/")
    if parts[0] == "blocks":
        return "transformer." + gpt2.BLOCK_TENSORS["/".join(parts[2:])].format(i=parts[1])
    return "transformer." + gpt2.TOP_TENSORS[path]


def test_one_example_loss_gradient_matches_torch_autograd(tied):
    model, imported = tied
    tokens, _ = _batch(seed=1)
    n = LENGTHS[0]
    example = tokens[0, :n]

    model.zero_grad()
    logits = model(torch.tensor(example[None])).logits[0]
    loss = -torch.log_softmax(logits[:-1], -1)[torch.arange(n - 1), torch.tensor(example[1:])]
    loss.sum().backward()
    want = {name: p.grad.numpy() for name, p in model.named_parameters()}
    assert model.lm_head.weight is model.transformer.wte.weight  # one tensor, both uses

    def jax_loss(params):
        z = imported.apply_fn(params, jnp.asarray(example[None], jnp.int32))[0]
        return -jnp.sum(jax.nn.log_softmax(z[:-1], -1)[jnp.arange(n - 1), example[1:]])

    got = jax.grad(jax_loss)(imported.params)
    worst = (0.0, 0.0)
    named = named_leaves(got)
    assert len(named) == len(want)  # named_parameters lists the tied table once
    for path, g in named:
        name = _hf_name(path)
        assert np.abs(want[name]).max() > 0, name
        assert_close(g, want[name], rtol=TOL, peak_rtol=TOL, err_msg=f"{path} ({name})")
        worst = tuple(map(max, worst, _max_diffs(g, want[name])))
    print("gradient max abs/rel diff", worst)


def _precond(kind, params):
    pre = random_preconditioner(kind, params)
    if kind == "factored":  # the tied table's V is factored (rows x columns), folded in
        assert isinstance(pre["embed"]["embedding"], correction.FactoredScale)
    return pre


@pytest.mark.parametrize(
    "precond_kind,mode,output_fn,k",
    [
        ("none", "per_tensor", "margin", 3),  # folded into the projection factors
        ("adam", "global", "loss", 3),  # elementwise V: each use's gradient materialized
        ("adam", "dense", "loss", 3),
        ("factored", "global", "margin", 3),  # rows x columns V folded into the factors
    ],
)
def test_fast_features_equal_the_reference(tied, precond_kind, mode, output_fn, k):
    # The tied table's gradient is the sum of its "embed" and "unembed" uses.
    _, imported = tied
    apply_fn, params = imported.apply_fn, imported.params
    kinds = set()

    def record(kind, path, x, y):
        kinds.add((kind, path))
        return y

    jax.eval_shape(lambda p, t: apply_fn.tapped(p, t, record), params, jnp.zeros((1, 4), int))
    assert {("embed", "embed"), ("unembed", "embed")} <= kinds  # both uses of the tied table

    tokens, mask = _batch(seed=2)
    tokens = jnp.asarray(tokens, jnp.int32)
    weights = jnp.asarray(mask, jnp.float32).at[:, 0].set(0.0)
    proj = Projector(params, mode, k_in=k + 1, k_out=k, seed=5, dense_dim=16)
    pre = _precond(precond_kind, params)
    fast = make_feature_fn(apply_fn, output_fn, proj, pre, fast=True)
    slow = make_feature_fn(apply_fn, output_fn, proj, pre, fast=False)
    assert fast.fast and not slow.fast
    want = np.asarray(slow(params, tokens, weights))
    got = np.asarray(fast(params, tokens, weights))
    assert np.abs(want).max() > 0
    assert_close(got, want, rtol=2e-4, peak_rtol=2e-5)


def test_taps_mean_what_the_contract_says(tied):
    _, imported = tied
    tokens = jnp.asarray(_batch()[0], jnp.int32)
    calls = []

    def tap(kind, path, x, y):
        calls.append((kind, path, x, y))
        return y

    logits = imported.apply_fn.tapped(imported.params, tokens, tap)
    assert_close(logits, imported.apply_fn(imported.params, tokens), rtol=1e-6, peak_rtol=1e-6)
    assert {k for k, *_ in calls} == set(taps.TAP_KINDS)
    (kind, path, x, y) = calls[-1]
    assert (kind, path) == ("unembed", "embed")
    assert_close(y, x @ imported.params["embed"]["embedding"].T, rtol=1e-5, peak_rtol=1e-5)


def test_the_gpt2_family_builds_by_name():
    cfg = dict(family="gpt2", d_model=16, n_layers=2, n_heads=2, d_ff=24, max_len=12)
    family = families.get_family("gpt2")
    assert family is gpt2.MODEL_FAMILY and family.tensor_rules == gpt2.TENSOR_RULES
    apply_fn, params = families.make_model(cfg, 29, seed=0)
    shapes = jax.tree.map(lambda x: (x.shape, x.dtype), params)
    assert shapes == jax.tree.map(lambda x: (x.shape, x.dtype), families.abstract_params(cfg, 29))
    assert params["blocks"][1]["attn"]["qkv"]["kernel"].shape == (16, 48)
    assert "unembed" not in params  # tied head
    logits = apply_fn(params, jnp.ones((2, 12), jnp.int32))
    assert logits.shape == (2, 12, 29) and logits.dtype == jnp.float32
    with pytest.raises(ValueError, match="exceeds GPT-2's n_positions 12"):
        apply_fn(params, jnp.ones((1, 13), jnp.int32))
    with pytest.raises(ValueError, match="not divisible by model.n_heads"):
        families.make_model(dict(cfg, n_heads=3), 29, seed=0)
