"""trackstar.hf.llama equals transformers' Llama, Mistral and Qwen2 (eager attention, float32).

Tiny random ``transformers`` models (their weights re-drawn so norms and biases are not 1 and
0) are mapped through ``params_from_hf``; logits on a right-padded batch, one example's loss
gradient parameter by parameter, and the fast path against the reference path are compared.
torch and transformers are test-only dependencies: the module is skipped without them.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import assert_close

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from trackstar import families, sharding  # noqa: E402
from trackstar.gradients import make_feature_fn  # noqa: E402
from trackstar.hf import llama  # noqa: E402
from trackstar.hf.loader import HFImportError  # noqa: E402
from trackstar.losses import output_loss  # noqa: E402
from trackstar.projection import Projector  # noqa: E402
from trackstar.tree import named_leaves  # noqa: E402

VOCAB = 97
LENGTHS = (9, 6, 4)  # a right-padded batch: row b holds LENGTHS[b] real tokens
SEQ = max(LENGTHS)
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32,
    rms_norm_eps=1e-5,
    attn_implementation="eager",
)
LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=10000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=16,  # head_dim 8: one medium, three low frequencies
)
CASES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama_bias_tied": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
    ),
    "llama3_rope": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters=LLAMA3_ROPE)),
    # A window shorter than the sequence: the band mask, exactly.
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=4, head_dim=8)),
    # q/k/v biases, no o bias; the window on layer 1 only.
    "qwen2": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(use_sliding_window=True, sliding_window=3, max_window_layers=1),
    ),
}


def _torch_model(case: str):
    config_cls, model_cls, extra = CASES[case]
    config = getattr(transformers, config_cls)(**TINY, **extra)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # weights of order one, norms not 1, biases not 0
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model


def _tensors(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _batch():
    rng = np.random.default_rng(4)
    tokens = np.zeros((len(LENGTHS), SEQ), np.int64)
    weights = np.zeros((len(LENGTHS), SEQ), np.float32)
    for b, n in enumerate(LENGTHS):
        tokens[b, :n] = rng.integers(1, VOCAB, n)
        weights[b, 1:n] = 1.0
    return tokens, weights


@functools.cache
def _import(case: str):
    """``(case, torch model, cfg_model, apply_fn, params)``: ``case`` through params_from_hf."""
    model = _torch_model(case)
    cfg = llama.config_from_hf(model.config.to_dict())
    params = llama.params_from_hf(_tensors(model), cfg)
    return case, model, cfg, llama.make_apply(cfg, VOCAB), params


@pytest.fixture(scope="module", params=sorted(CASES))
def imported(request):
    return _import(request.param)


def test_config_fields(imported):
    case, model, cfg, apply_fn, _ = imported
    assert cfg.family == "llama" and cfg.vocab_size == VOCAB and cfg.head_dim == 8
    assert cfg.num_key_value_heads == 2 and cfg.rms_norm_eps == 1e-5
    spec = apply_fn.spec
    if case == "qwen2":
        assert (cfg.attention_bias, cfg.o_bias, cfg.mlp_bias) == (True, False, False)
        assert (spec.sliding_window, spec.sliding_layers) == (3, (1,))
    if case == "mistral":
        assert (spec.sliding_window, spec.sliding_layers) == (4, (0, 1))
    if case == "llama3_rope":
        assert cfg.rope_scaling.rope_type == "llama3"
        want = model.model.rotary_emb.inv_freq.numpy()
        np.testing.assert_allclose(llama.inv_freq(spec), want, rtol=1e-6)
        assert not np.allclose(want, llama.inv_freq(dataclasses.replace(spec, rope_scaling=None)))
    if case == "llama_bias_tied":
        assert cfg.tie_word_embeddings and (cfg.attention_bias, cfg.o_bias, cfg.mlp_bias) == (
            True,
            True,
            True,
        )


def test_logits_equal_transformers_on_a_right_padded_batch(imported):
    case, model, _, apply_fn, params = imported
    tokens, _ = _batch()
    mask = (np.arange(SEQ)[None] < np.asarray(LENGTHS)[:, None]).astype(np.int64)
    with torch.no_grad():
        want = model(
            input_ids=torch.from_numpy(tokens), attention_mask=torch.from_numpy(mask)
        ).logits.numpy()
    got = np.asarray(jax.jit(apply_fn)(params, jnp.asarray(tokens, jnp.int32)))
    for b, n in enumerate(LENGTHS):
        assert_close(got[b, :n], want[b, :n], rtol=1e-4, peak_rtol=1e-5, err_msg=f"{case} {b}")


def test_one_examples_gradient_equals_torch_autograd(imported):
    case, model, cfg, apply_fn, params = imported
    tokens, weights = _batch()
    tokens, weights = tokens[:1], weights[:1]

    def loss(p):
        logits = apply_fn(p, jnp.asarray(tokens, jnp.int32))
        return output_loss(logits, jnp.asarray(tokens), jnp.asarray(weights), "loss")[0]

    grads = jax.jit(jax.grad(loss))(params)
    model.zero_grad()
    logits = model(input_ids=torch.from_numpy(tokens)).logits
    logp = torch.log_softmax(logits[0, :-1].double(), dim=-1)
    target = torch.from_numpy(tokens[0, 1:])
    nll = -(logp[torch.arange(SEQ - 1), target] * torch.from_numpy(weights[0, 1:])).sum()
    nll.backward()
    torch_params = dict(model.named_parameters())
    spec = llama.resolve_spec(cfg, VOCAB)
    checked = 0
    for hf_name, path, transposed in llama.hf_names(spec):
        want = torch_params[hf_name].grad.numpy()
        got = grads
        for key in path:
            got = got[key]
        got = np.asarray(got).T if transposed else np.asarray(got)
        assert np.abs(want).max() > 0, hf_name
        assert_close(got, want, rtol=1e-4, peak_rtol=1e-4, err_msg=f"{case} {hf_name}")
        checked += 1
    assert checked == len(named_leaves(params))


def _positive_v(params):
    rng = np.random.default_rng(1)
    return jax.tree.map(lambda x: jnp.asarray(rng.uniform(0.3, 3.0, x.shape), jnp.float32), params)


# Compiling both paths is the slow part: GQA + RoPE without and with V, biases, the tied head.
@pytest.mark.parametrize(
    "case,precond",
    [("llama", "none"), ("llama", "adam"), ("qwen2", "adam"), ("llama_bias_tied", "adam")],
)
def test_fast_path_equals_reference_path(case, precond):
    _, _, cfg, apply_fn, params = _import(case)
    tokens, weights = _batch()
    tokens, weights = jnp.asarray(tokens, jnp.int32), jnp.asarray(weights)
    proj = Projector(params, "global", k_in=4, k_out=3, seed=2)
    pre = _positive_v(params) if precond == "adam" else None
    fast = make_feature_fn(apply_fn, "loss", proj, pre, fast=True)
    slow = make_feature_fn(apply_fn, "loss", proj, pre, fast=False)
    want = np.asarray(slow(params, tokens, weights))
    got = np.asarray(fast(params, tokens, weights))
    assert fast.fast and not slow.fast and np.abs(want).max() > 0
    assert_close(got, want, rtol=1e-4, peak_rtol=1e-5, err_msg=f"{case} {precond}")
    if cfg.tie_word_embeddings:
        assert "unembed" not in params and make_feature_fn(apply_fn, "loss", proj).fast


@pytest.mark.parametrize("case", ["qwen2", "llama_bias_tied"])
def test_taps_mean_what_the_contract_says(case):
    # Every op the tapped forward hands over computes what its kind says from the params, the
    # tapped forward is the plain one, and every parameter is covered (trackstar.taps).
    _, _, _, apply_fn, params = _import(case)
    tokens = jnp.asarray(_batch()[0], jnp.int32)
    calls = []

    def tap(kind, path, x, y):
        calls.append((kind, path, x, y))
        return y

    logits = apply_fn.tapped(params, tokens, tap)
    np.testing.assert_array_equal(logits, apply_fn(params, tokens))
    covered = set()
    for kind, path, x, y in calls:
        node = params
        for key in path.split("/"):
            node = node[int(key) if key.isdigit() else key]
        bias = node.get("bias", 0.0)
        if kind == "dense":
            want, leaves = x @ node["kernel"] + bias, ("kernel", "bias")
        elif kind == "embed":
            want, leaves = node["embedding"][x], ("embedding",)
        elif kind == "unembed":
            want, leaves = x @ node["embedding"].T, ("embedding",)
        else:
            want, leaves = x * node["scale"] + bias, ("scale", "bias")
        assert y.shape[:2] == tokens.shape, (path, y.shape)
        assert_close(y, want, rtol=1e-5, peak_rtol=1e-6, err_msg=f"{kind} {path}")
        covered |= {f"{path}/{leaf}" for leaf in leaves}
    assert {p for p, _ in named_leaves(params)} <= covered
    kinds = {k for k, *_ in calls}
    assert kinds == ({"dense", "embed", "scale_shift"} | ({"unembed"} if "tied" in case else set()))


def test_a_missing_or_foreign_tensor_is_refused_by_name():
    model = _torch_model("qwen2")
    cfg = llama.config_from_hf(model.config.to_dict())
    tensors = _tensors(model)
    for name in ("model.layers.1.mlp.up_proj.weight", "model.layers.0.self_attn.k_proj.bias"):
        partial = {k: v for k, v in tensors.items() if k != name}
        with pytest.raises(HFImportError, match=re.escape(repr(name))):
            llama.params_from_hf(partial, cfg)
    extra = dict(tensors, **{"model.layers.0.self_attn.o_proj.bias": np.zeros(32, np.float32)})
    with pytest.raises(HFImportError, match="does not map.*o_proj.bias"):
        llama.params_from_hf(extra, cfg)
    bad = dict(tensors, **{"model.norm.weight": np.ones(31, np.float32)})
    with pytest.raises(HFImportError, match=r"'model.norm.weight' has shape \(31,\)"):
        llama.params_from_hf(bad, cfg)
    # An old checkpoint's rotary buffer is ignored.
    old = dict(tensors, **{"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32)})
    llama.params_from_hf(old, cfg)


def test_unsupported_rope_and_activation_are_refused_by_name():
    base = dict(TINY, model_type="llama")
    base.pop("attn_implementation")
    for rope in (
        dict(rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=2.0)),
        dict(rope_theta=1e4, rope_scaling=dict(type="linear", factor=2.0)),  # the old format
    ):
        kind = rope.get("rope_parameters") or rope.get("rope_scaling")
        kind = kind.get("rope_type", kind.get("type"))
        with pytest.raises(HFImportError, match=f"rope scaling type '{kind}'.*llama3"):
            llama.config_from_hf(dict(base, **rope))
    with pytest.raises(HFImportError, match="hidden_act 'gelu'"):
        llama.config_from_hf(dict(base, hidden_act="gelu"))
    with pytest.raises(HFImportError, match="model_type 'gpt2'"):
        llama.config_from_hf(dict(base, model_type="gpt2"))
    # The old format's Llama 3 scaling reads like the new one's.
    old = llama.config_from_hf(
        dict(
            base,
            rope_theta=5e5,
            rope_scaling={k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"},
        )
    )
    assert old.rope_theta == 5e5 and old.rope_scaling.to_dict() == dict(
        {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}
    )


def test_load_checkpoint_reads_a_saved_model(tmp_path):
    loader = pytest.importorskip("trackstar.hf.loader")
    if not hasattr(loader, "load_checkpoint"):
        pytest.skip("trackstar.hf.loader.load_checkpoint is not there yet")
    model = _torch_model("qwen2")
    model.save_pretrained(tmp_path, safe_serialization=True)
    imported = loader.load_checkpoint(tmp_path)
    assert imported.family == "llama" and imported.cfg_model.o_bias is False
    direct = llama.params_from_hf(_tensors(model), imported.cfg_model)
    for (p1, a), (p2, b) in zip(named_leaves(imported.params), named_leaves(direct), strict=True):
        assert p1 == p2
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    tokens, _ = _batch()
    with torch.no_grad():
        want = model(input_ids=torch.from_numpy(tokens[:1])).logits.numpy()
    got = imported.apply_fn(imported.params, jnp.asarray(tokens[:1], jnp.int32))
    assert_close(np.asarray(got), want, rtol=1e-4, peak_rtol=1e-5)
    # bfloat16 params and compute: float32 logits near the float32 model's.
    half = loader.load_checkpoint(tmp_path, dtype="bfloat16")
    assert half.cfg_model.dtype == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(half.params)} == {jnp.dtype(jnp.bfloat16)}
    got = half.apply_fn(half.params, jnp.asarray(tokens[:1], jnp.int32))
    assert got.dtype == jnp.float32
    assert np.abs(np.asarray(got) - want).max() < 0.05 * np.abs(want).max()


def test_the_family_builds_sizes_and_shards_by_name():
    cfg = dict(
        family="llama",
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_bias=True,
        o_bias=False,
    )
    family = families.get_family("llama")
    assert family is llama.MODEL_FAMILY and family.tensor_rules == llama.TENSOR_RULES
    apply_fn, params = families.make_model(cfg, 40, seed=0)
    shapes = {p: x.shape for p, x in named_leaves(params)}
    abstract = {p: x.shape for p, x in named_leaves(families.abstract_params(cfg, 40))}
    assert shapes == abstract
    assert shapes["blocks/1/attn/k/kernel"] == (16, 8) and "blocks/0/attn/o/bias" not in shapes
    assert apply_fn(params, jnp.ones((2, 5), jnp.int32)).shape == (2, 5, 40)
    specs = {
        p: str(s)
        for p, s in named_leaves(
            sharding.param_specs(params, family.tensor_rules, {"data": 1, "model": 2})
        )
    }
    assert specs["blocks/0/attn/q/kernel"] == specs["blocks/0/mlp/up/kernel"] == "P(None, 'model')"
    assert specs["blocks/0/attn/q/bias"] == "P('model',)"
    assert (
        specs["blocks/0/attn/o/kernel"] == specs["blocks/1/mlp/down/kernel"] == "P('model', None)"
    )
    assert specs["embed/embedding"] == specs["unembed/kernel"] == "P(None, 'model')"
    assert specs["final_norm/scale"] == "P()"
    with pytest.raises(ValueError, match="num_key_value_heads = 3"):
        families.make_model(dict(cfg, num_key_value_heads=3), 40, seed=0)
    with pytest.raises(ValueError, match="exceeds the model's model.vocab_size"):
        families.make_model(dict(cfg, vocab_size=30), 40, seed=0)
