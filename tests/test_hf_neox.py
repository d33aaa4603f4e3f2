"""GPT-NeoX / Pythia (trackstar.hf.neox) computes what transformers' GPTNeoXForCausalLM computes.

Tiny random HF models (float32, eager attention), rotary_pct 0.25 and 1.0, parallel and
sequential residual: logits on a right-padded batch, one example's loss gradient parameter by
parameter against torch autograd, the fast path's features against the reference path's, the
mapping table's refusals. torch and transformers are test-only and imported here.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import assert_close

from trackstar import families
from trackstar.gradients import make_feature_fn, per_example_grads
from trackstar.hf import neox
from trackstar.projection import Projector
from trackstar.tree import named_leaves

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 97
SIZES = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
)
LENGTHS = (12, 7, 4)  # a right-padded batch: the rows' real lengths
PAD = 1

# (rotary_pct, use_parallel_residual): Pythia's (0.25, parallel) and the other corners.
VARIANTS = [(0.25, True), (1.0, False), (0.25, False), (1.0, True)]


def _hf_model(rotary_pct: float, parallel: bool, seed: int = 0, **overrides):
    """A tiny random ``GPTNeoXForCausalLM`` with every parameter perturbed off its init."""
    torch.manual_seed(seed)
    config = transformers.GPTNeoXConfig(
        **{**SIZES, "hidden_act": "gelu", **overrides},
        rotary_pct=rotary_pct,
        rotary_emb_base=10000,
        use_parallel_residual=parallel,
        attn_implementation="eager",
    )
    model = transformers.GPTNeoXForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name or "layer_norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif "embed_in" in name:
                p.copy_(torch.randn_like(p))
            else:  # Linear weights (out, in)
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
    return model


def _tensors(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _batch():
    rng = np.random.default_rng(3)
    tokens = np.full((len(LENGTHS), max(LENGTHS)), PAD, np.int32)
    weights = np.zeros(tokens.shape, np.float32)
    for i, n in enumerate(LENGTHS):
        tokens[i, :n] = rng.integers(2, VOCAB, n)
        weights[i, 1:n] = 1.0
    return tokens, weights


@functools.cache
def _imported(variant: tuple[float, bool]):
    """(HF model, cfg_model, apply_fn, params) through params_from_hf (no loader)."""
    model = _hf_model(*variant)
    cfg = neox.config_from_hf(model.config.to_dict())
    params = jax.tree.map(jnp.asarray, neox.params_from_hf(_tensors(model), cfg))
    return model, cfg, neox.make_apply(cfg), params


def _variant_id(variant: tuple[float, bool]) -> str:
    return f"rot{variant[0]}-{'par' if variant[1] else 'seq'}"


@pytest.fixture(params=VARIANTS, ids=_variant_id)
def imported(request):
    return _imported(request.param)


def _hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    mask = np.zeros_like(tokens)
    for i, n in enumerate(LENGTHS):
        mask[i, :n] = 1
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask)
        )
    return out.logits.numpy()


def _assert_logits_match(apply_fn, params, model):
    tokens, _ = _batch()
    want = _hf_logits(model, tokens)
    got = np.asarray(apply_fn(params, jnp.asarray(tokens)))
    assert got.shape == want.shape and got.dtype == np.float32
    for i, n in enumerate(LENGTHS):  # the real positions of each row
        assert np.abs(want[i, :n]).max() > 1.0  # not a near-zero model
        assert_close(got[i, :n], want[i, :n], rtol=1e-4, peak_rtol=1e-4, err_msg=f"row {i}")


def test_config_from_hf_reads_the_architecture(imported):
    model, cfg, apply_fn, params = imported
    assert cfg.family == "neox" and cfg.dtype == "float32"
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
        assert cfg[name] == SIZES[name]
    hf = model.config
    assert cfg.rotary_pct == hf.rope_parameters["partial_rotary_factor"]
    assert cfg.use_parallel_residual == hf.use_parallel_residual
    assert cfg.tie_word_embeddings is False and cfg.attention_bias is True
    assert cfg.hidden_act == "gelu"
    assert type(apply_fn) is neox.NeoxApply and callable(apply_fn.tapped)


def test_logits_match_transformers(imported):
    model, _, apply_fn, params = imported
    _assert_logits_match(apply_fn, params, model)


def test_loss_gradient_matches_torch_autograd(imported):
    model, cfg, apply_fn, params = imported
    tokens, weights = _batch()
    row = 1  # a padded row: its padding must not change the gradient
    n = LENGTHS[row]
    grads = jax.jit(per_example_grads, static_argnums=(0, 4))(
        apply_fn, params, jnp.asarray(tokens[row : row + 1]), jnp.asarray(weights[row : row + 1]),
        "loss",
    )  # fmt: skip
    grads = {name: np.asarray(g[0]) for name, g in named_leaves(grads)}

    model.zero_grad()
    ids = torch.tensor(tokens[row : row + 1, :n], dtype=torch.long)
    logits = model(input_ids=ids).logits[0, :-1]
    loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
    loss.backward()
    torch_grads = {k: p.grad.numpy() for k, p in model.named_parameters()}

    table = neox.hf_tensor_names(neox.resolve_spec(cfg))
    assert len(table) == len(grads) == len(torch_grads)
    for path, hf_name, transpose in table:
        name = "/".join(str(k) for k in path)
        want = torch_grads.get(hf_name, torch_grads.get(hf_name.replace("embed_out", "lm_head")))
        want = want.T if transpose else want
        assert np.abs(want).max() > 0, name
        assert_close(grads[name], want, rtol=1e-4, peak_rtol=1e-4, err_msg=name)


# Two corners, one preconditioner each (each case compiles two feature maps): Pythia's layout
# with no correction, full rotary and sequential residual with an elementwise positive V.
@pytest.mark.parametrize(
    "variant,with_v", [(VARIANTS[0], False), (VARIANTS[1], True)], ids=["no-V", "positive-V"]
)
def test_fast_path_features_equal_the_reference_path(variant, with_v):
    _, _, apply_fn, params = _imported(variant)
    tokens, weights = _batch()
    proj = Projector(params, "global", k_in=5, k_out=6, seed=4)
    precond = None
    if with_v:
        rng = np.random.default_rng(5)
        precond = jax.tree.map(
            lambda x: jnp.asarray(rng.uniform(0.3, 3.0, x.shape), jnp.float32), params
        )
    fast = make_feature_fn(apply_fn, "loss", proj, precond, fast=True)
    ref = make_feature_fn(apply_fn, "loss", proj, precond, fast=False)
    assert fast.fast and not ref.fast
    got = np.asarray(fast(params, jnp.asarray(tokens), jnp.asarray(weights)))
    want = np.asarray(ref(params, jnp.asarray(tokens), jnp.asarray(weights)))
    assert np.abs(want).max() > 0
    assert_close(got, want, rtol=1e-4, peak_rtol=1e-5)


def test_load_checkpoint_of_save_pretrained(tmp_path):
    loader = pytest.importorskip("trackstar.hf.loader")
    if not hasattr(loader, "load_checkpoint"):
        pytest.skip("trackstar.hf.loader.load_checkpoint is not there yet")
    model = _hf_model(0.25, True, seed=1)
    model.save_pretrained(tmp_path)
    imported = loader.load_checkpoint(tmp_path)
    assert imported.family == "neox" and imported.cfg_model.family == "neox"
    # The file names the head embed_out (the state dict says lm_head): both map the same.
    direct = neox.params_from_hf(_tensors(model), imported.cfg_model)
    assert jax.tree.structure(direct) == jax.tree.structure(imported.params)
    for (name, a), (_, b) in zip(named_leaves(direct), named_leaves(imported.params), strict=True):
        np.testing.assert_array_equal(np.asarray(b), a, err_msg=name)
    _assert_logits_match(imported.apply_fn, imported.params, model)
    # bfloat16 params and compute: the same model at bfloat16's precision.
    bf16 = loader.load_checkpoint(tmp_path, dtype="bfloat16")
    assert bf16.cfg_model.dtype == "bfloat16"
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(bf16.params))
    tokens, _ = _batch()
    want = _hf_logits(model, tokens)
    got = np.asarray(bf16.apply_fn(bf16.params, jnp.asarray(tokens)))
    assert got.dtype == np.float32
    for i, n in enumerate(LENGTHS):
        assert_close(got[i, :n], want[i, :n], rtol=0.0, peak_rtol=3e-2, err_msg=f"row {i}")


def test_tied_head_matches_and_takes_the_fast_path():
    model = _hf_model(0.25, True, seed=2, tie_word_embeddings=True)
    cfg = neox.config_from_hf(model.config.to_dict())
    assert cfg.tie_word_embeddings
    params = jax.tree.map(jnp.asarray, neox.params_from_hf(_tensors(model), cfg))
    assert "embed_out" not in params
    apply_fn = neox.make_apply(cfg)
    _assert_logits_match(apply_fn, params, model)
    # The head is embed_in's transposed use ("unembed"): its part adds to the "embed" part.
    tokens, weights = (jnp.asarray(a) for a in _batch())
    proj = Projector(params, "global", k_in=5, k_out=6, seed=4)
    fast = make_feature_fn(apply_fn, "loss", proj, fast=True)
    want = np.asarray(make_feature_fn(apply_fn, "loss", proj, fast=False)(params, tokens, weights))
    assert_close(np.asarray(fast(params, tokens, weights)), want, rtol=1e-4, peak_rtol=1e-5)


def test_tanh_gelu_and_no_attention_bias_match():
    model = _hf_model(0.5, False, seed=3, hidden_act="gelu_new", attention_bias=False)
    cfg = neox.config_from_hf(model.config.to_dict())
    assert cfg.hidden_act == "gelu_new" and cfg.attention_bias is False
    params = jax.tree.map(jnp.asarray, neox.params_from_hf(_tensors(model), cfg))
    assert "bias" not in params["blocks"][0]["attn"]["qkv"]
    _assert_logits_match(neox.make_apply(cfg), params, model)


def test_a_missing_or_misshapen_tensor_is_refused_by_name(imported):
    model, cfg, *_ = imported
    tensors = _tensors(model)
    name = "gpt_neox.layers.1.attention.query_key_value.bias"
    del tensors[name]
    with pytest.raises(neox.HFImportError, match=re.escape(repr(name))):
        neox.params_from_hf(tensors, cfg)
    tensors = _tensors(model)
    tensors.pop("lm_head.weight")
    with pytest.raises(neox.HFImportError, match="'embed_out.weight'"):
        neox.params_from_hf(tensors, cfg)
    tensors = _tensors(model)
    tensors["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"] = np.zeros((65, 32), np.float32)
    with pytest.raises(neox.HFImportError, match=r"dense_h_to_4h.weight.*\(65, 32\).*\(64, 32\)"):
        neox.params_from_hf(tensors, cfg)
    tensors = _tensors(model)
    tensors["gpt_neox.layers.2.attention.dense.weight"] = np.zeros((32, 32), np.float32)
    with pytest.raises(neox.HFImportError, match="layers.2.attention.dense.weight"):
        neox.params_from_hf(tensors, cfg)
    tensors = _tensors(model)
    tensors["gpt_neox.layers.0.attention.rotary_emb.inv_freq"] = np.zeros(4, np.float32)
    neox.params_from_hf(tensors, cfg)  # an old checkpoint's buffer: not a parameter, ignored


def test_config_from_hf_reads_pythia_files_and_refuses_what_it_cannot_compute():
    pythia = dict(  # the fields of EleutherAI/pythia-*'s config.json, at a tiny size
        architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox", hidden_act="gelu",
        rotary_pct=0.25, rotary_emb_base=10000, use_parallel_residual=True,
        layer_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=2048,
        torch_dtype="float16", **{k: v for k, v in SIZES.items() if k != "max_position_embeddings"},
    )  # fmt: skip
    cfg = neox.config_from_hf(pythia)
    assert (cfg.rotary_pct, cfg.rotary_emb_base, cfg.max_position_embeddings) == (0.25, 1e4, 2048)
    assert cfg.attention_bias is True  # HF's default when the file is silent
    with pytest.raises(neox.HFImportError, match="'quick_gelu'"):
        neox.config_from_hf({**pythia, "hidden_act": "quick_gelu"})
    with pytest.raises(neox.HFImportError, match="'linear'"):
        neox.config_from_hf({**pythia, "rope_scaling": {"rope_type": "linear", "factor": 2.0}})
    with pytest.raises(neox.HFImportError, match="intermediate_size"):
        neox.config_from_hf({k: v for k, v in pythia.items() if k != "intermediate_size"})
    with pytest.raises(neox.HFImportError, match="'llama'"):
        neox.config_from_hf({**pythia, "model_type": "llama"})


def test_the_family_builds_registers_and_shards_by_its_rules():
    from trackstar import sharding

    family = families.get_family("neox")
    assert family is neox.MODEL_FAMILY and family.tensor_rules is neox.TENSOR_RULES
    vocab = 96  # divisible by the model axis below: the head is column-parallel
    cfg = neox.config_from_hf({**SIZES, "vocab_size": vocab, "model_type": "gpt_neox"})
    apply_fn, params = families.make_model(cfg, vocab, seed=0)
    abstract = families.abstract_params(cfg, vocab)
    assert jax.tree.structure(abstract) == jax.tree.structure(params)
    assert jax.tree.map(lambda a: a.shape, abstract) == jax.tree.map(lambda a: a.shape, params)
    # The checkpoint mapping fills exactly the tree build makes.
    names = {"/".join(map(str, p)) for p, *_ in neox.hf_tensor_names(neox.resolve_spec(cfg))}
    assert names == {name for name, _ in named_leaves(params)}
    logits = apply_fn(params, jnp.ones((2, 5), jnp.int32))
    assert logits.shape == (2, 5, vocab) and np.all(np.isfinite(np.asarray(logits)))
    with pytest.raises(families.ModelConfigError, match="exceeds model.vocab_size"):
        families.make_model(cfg, vocab + 1, seed=0)

    # mesh.rules = "tensor" on a 4-way model axis: whole heads of the fused qkv per device.
    rules = sharding.preset_rules("tensor", cfg)
    specs = sharding.param_specs(abstract, rules, {"data": 1, "model": 4})
    specs = {name: str(spec) for name, spec in named_leaves(specs)}
    column, row = "P(None, 'model')", "P('model', None)"
    for n in range(SIZES["num_hidden_layers"]):
        assert specs[f"blocks/{n}/attn/qkv/kernel"] == column
        assert specs[f"blocks/{n}/attn/qkv/bias"] == "P('model',)"
        assert specs[f"blocks/{n}/mlp/dense_h_to_4h/kernel"] == column
        assert specs[f"blocks/{n}/attn/dense/kernel"] == row
        assert specs[f"blocks/{n}/mlp/dense_4h_to_h/kernel"] == row
        assert specs[f"blocks/{n}/attn/dense/bias"] == "P()"
    assert specs["embed_out/kernel"] == column and specs["final_layer_norm/scale"] == "P()"
