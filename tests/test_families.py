"""Model families found by name (trackstar.families): build, abstract shapes, registry, stages."""

import os
import types

import jax
import numpy as np
import pytest
from tolerances import assert_close
from toy_models import TOY_FAMILY, build_toy_family

from trackstar import families, model, stages
from trackstar.config import ConfigError, load_config_file, validate
from trackstar.tree import named_leaves

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(size="tiny", d_model=16, n_layers=1, n_heads=2, d_ff=24, max_len=12)


@pytest.fixture()
def registry(monkeypatch):
    """A private copy of the registry with the toy family registered."""
    monkeypatch.setattr(families, "MODEL_FAMILIES", dict(families.MODEL_FAMILIES))
    families.register_family(TOY_FAMILY)
    return families.MODEL_FAMILIES


def _shapes(tree):
    return {p: (tuple(x.shape), np.dtype(x.dtype)) for p, x in named_leaves(tree)}


def test_gpt2_is_the_default_family():
    fam = families.get_family("gpt2")
    assert families.get_family(None) is fam and families.get_family({}) is fam
    assert families.get_family(dict(TINY, family="")) is fam
    assert families.get_family(fam) is fam
    assert fam.tensor_rules == model.TENSOR_RULES
    assert families.project_family_names()[0] == "gpt2"
    apply_fn, params = families.make_model(dict(TINY, family="gpt2"), 31, seed=3)
    ref_fn, ref = families.make_model(TINY, 31, seed=3)
    assert type(apply_fn) is type(ref_fn)
    for (p, a), (q, b) in zip(named_leaves(params), named_leaves(ref), strict=True):
        assert p == q
        np.testing.assert_array_equal(a, b)
    # The project's former own model is refused with what to write instead.
    with pytest.raises(model.ModelConfigError, match="tie_word_embeddings = False"):
        families.get_family("transformer")


def test_unknown_family_names_the_known_ones(registry):
    with pytest.raises(model.ModelConfigError, match="unknown model family 'gpt9'") as e:
        families.make_model(dict(family="gpt9"), 31, 0)
    assert "gpt2, llama, neox, toy_rms" in str(e.value) and "register_family" in str(e.value)
    with pytest.raises(ValueError, match="registered already"):
        families.register_family(TOY_FAMILY)
    families.register_family(TOY_FAMILY, replace=True)  # explicit replacement is allowed


def test_abstract_params_match_the_built_params(registry):
    for cfg in (dict(TINY), dict(family="toy_rms", d_model=8, d_ff=12, n_layers=3)):
        abstract = families.abstract_params(cfg, 37)
        assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract))
        _, params = families.make_model(cfg, 37, seed=0)
        assert _shapes(abstract) == _shapes(params)
    # The default abstract_params is jax.eval_shape of build: no build-time arrays needed.
    assert TOY_FAMILY.abstract is None


def test_config_names_a_family(registry, monkeypatch):
    cfg = load_config_file(os.path.join(ROOT, "configs", "demo.py"))
    assert cfg.model.family == families.DEFAULT_FAMILY
    validate(cfg)
    cfg.model.family = "toy_rms"  # registered at run time: accepted
    cfg.model.n_heads = 3  # the gpt2 sizes' head check no longer applies
    validate(cfg)
    cfg.model.family = "gpt9"
    with pytest.raises(ConfigError, match="model.family must be a model family"):
        validate(cfg)
    cfg.model.family = "transformer"  # the former own model: refused with the fix
    with pytest.raises(ConfigError, match="set model.family = 'gpt2'"):
        validate(cfg)


def test_stages_build_the_configured_family(registry):
    cfg = load_config_file(os.path.join(ROOT, "configs", "demo.py"))
    cfg.model.family = "toy_rms"
    cfg.model.d_model, cfg.model.d_ff, cfg.model.n_layers = 8, 12, 1
    tok = types.SimpleNamespace(get_vocab_size=lambda with_added_tokens: 41)
    apply_fn, params, _ = stages._model_and_optimizer(cfg, tok)
    assert type(apply_fn).__name__ == "ToyTappedLM"
    _, want = build_toy_family(cfg.model, 41, cfg.seed)
    assert _shapes(params) == _shapes(want)


# ----- sharding rules come with the family ----------------------------------------------------

# trackstar.sharding's TENSOR_RULES before they moved to trackstar.model: the gpt2 family's
# "tensor" preset must shard its params exactly as these did.
_OLD_TENSOR_RULES = (
    (r"(^|/)(embed|pos_embed)/embedding$", (None, "model")),
    (r"(^|/)(qkv|fc_in)/kernel$", (None, "model")),
    (r"(^|/)(qkv|fc_in)/bias$", ("model",)),
    (r"(^|/)(out|fc_out)/kernel$", ("model", None)),
    (r"(^|/)unembed/kernel$", (None, "model")),
    (r"(^|/)unembed/bias$", ("model",)),
    (r".*", ()),
)


def _specs(params_like, rules, model_axis):
    from trackstar import sharding as sh

    specs = sh.param_specs(params_like, rules, {"data": 1, "model": model_axis})
    return {p: str(s) for p, s in named_leaves(specs)}


def test_tensor_preset_is_the_family_rules(registry):
    from trackstar import sharding as sh

    assert sh.RULE_PRESETS == ("tensor", "fsdp", "replicated")
    assert model.MODEL == sh.MODEL  # trackstar.model names the mesh axis without importing it
    cfg = load_config_file(os.path.join(ROOT, "configs", "large.py"))
    params = sh.abstract_lm_params(cfg.model, cfg.mesh.memory_vocab_size)
    want = _specs(params, _OLD_TENSOR_RULES, 8)
    for family in (None, "gpt2", cfg.model):
        assert _specs(params, sh.rules_from_config(cfg.mesh, family), 8) == want
    assert want["blocks/0/attn/qkv/kernel"] == "P(None, 'model')"
    assert want["blocks/0/mlp/fc_out/kernel"] == "P('model', None)"

    # Another family's "tensor" preset is its own rules; the generic presets fit any model.
    toy_cfg = dict(family="toy_rms", d_model=8, d_ff=12, n_layers=2)
    toy = sh.abstract_lm_params(toy_cfg, 40)
    mesh_cfg = types.SimpleNamespace(rules="tensor", rule_overrides=("head/kernel$=None,model",))
    rules = sh.rules_from_config(mesh_cfg, toy_cfg)
    assert rules[1:] == TOY_FAMILY.tensor_rules
    specs = _specs(toy, rules, 2)
    assert specs["layers/0/up/kernel"] == "P(None, 'model')"
    assert specs["layers/1/down/kernel"] == "P('model', None)"
    assert specs["head/kernel"] == "P(None, 'model')"  # the override, tried first
    assert specs["embed/embedding"] == "P()"
    fsdp = sh.preset_rules("fsdp", "toy_rms")
    assert fsdp == sh.preset_rules("fsdp") == sh.FSDP_RULES
    mem = sh.memory_report(toy, rules, {"data": 1, "model": 2})
    assert mem["params_gib"] < mem["replicated_params_gib"]


def test_a_family_without_tensor_rules_asks_for_a_generic_preset(registry):
    import dataclasses

    from trackstar import sharding as sh

    families.register_family(dataclasses.replace(TOY_FAMILY, name="plain", tensor_rules=None))
    with pytest.raises(sh.ShardingError, match="'plain' has no tensor-parallel rules.*'fsdp'"):
        sh.preset_rules("tensor", "plain")
    assert sh.preset_rules("replicated", "plain") == sh.REPLICATED_RULES
    with pytest.raises(sh.ShardingError, match="mesh.rules = 'nope'"):
        sh.preset_rules("nope")


def test_a_family_runs_on_a_mesh_by_its_own_rules(registry):
    # The stages' featurize kernel on a 1-device mesh, params placed by the family's "tensor"
    # rules: the fast path, and the same vectors as the plain kernel.
    import jax.numpy as jnp

    from trackstar import sharding as sh
    from trackstar.featurize import make_mesh_feature_fn
    from trackstar.gradients import make_feature_fn
    from trackstar.projection import Projector

    cfg = dict(family="toy_rms", d_model=8, d_ff=12, n_layers=1)
    apply_fn, params = families.make_model(cfg, 19, seed=2)
    mesh = sh.single_device_mesh()
    mesh_cfg = types.SimpleNamespace(rules="tensor", rule_overrides=())
    shardings = sh.param_shardings(params, mesh, sh.rules_from_config(mesh_cfg, cfg))
    proj = Projector(params, "global", k_in=3, k_out=3, seed=0)
    fn = make_mesh_feature_fn(apply_fn, "loss", proj, None, mesh, shardings)
    assert fn.fast
    tokens = jnp.asarray([[1, 4, 9, 2, 0], [3, 3, 5, 7, 8]], jnp.int32)
    weights = jnp.asarray([[0, 1, 1, 1, 0], [0, 1, 1, 1, 1]], jnp.float32)
    got = fn(sh.place(params, shardings), tokens, weights)
    want = make_feature_fn(apply_fn, "loss", proj)(params, tokens, weights)
    assert_close(got, want, rtol=1e-5, peak_rtol=1e-5)
