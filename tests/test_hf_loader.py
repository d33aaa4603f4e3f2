"""trackstar.hf.loader reads Hugging Face checkpoint directories (tiny GPT-2s written here).

bfloat16 and sharded safetensors, the tokenizer, the families found by name, and the refusals:
an unsupported model_type, a missing tensor, a missing shard or file. torch and transformers
are test-only and imported here.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from trackstar import config as C
from trackstar import families
from trackstar.hf import loader
from trackstar.hf.loader import HFImportError, load_checkpoint, read_tensors

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _tiny_gpt2(seed: int = 0):
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=32,
        bos_token_id=0, eos_token_id=0, initializer_range=0.1,
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def model():
    return _tiny_gpt2()


@pytest.fixture(scope="module")
def single(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("single")
    model.save_pretrained(path, safe_serialization=True)
    return str(path)


def _state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def test_a_float32_checkpoint_reads_as_saved(model, single):
    tensors = read_tensors(single)
    state = _state(model)
    for name, value in tensors.items():
        assert value.dtype == np.float32
        np.testing.assert_array_equal(value, state[name], err_msg=name)
    assert "transformer.h.1.attn.c_attn.weight" in tensors
    assert "lm_head.weight" not in tensors  # tied: saved once, as wte
    assert loader.read_hf_config(single)["model_type"] == "gpt2"


def test_a_bfloat16_checkpoint_loads(model, tmp_path):
    bf16 = _tiny_gpt2().to(torch.bfloat16)
    bf16.save_pretrained(tmp_path, safe_serialization=True)
    tensors = read_tensors(tmp_path)
    wte = tensors["transformer.wte.weight"]
    assert wte.dtype == ml_dtypes.bfloat16  # numpy's safetensors reader refuses bf16
    want = bf16.transformer.wte.weight.detach().float().numpy()
    np.testing.assert_array_equal(wte.astype(np.float32), want)

    imported = load_checkpoint(tmp_path)  # dtype="float32": cast exactly
    got = imported.params["embed"]["embedding"]
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got), want)
    qkv = bf16.transformer.h[1].attn.c_attn.weight.detach().float().numpy()
    np.testing.assert_array_equal(
        np.asarray(imported.params["blocks"][1]["attn"]["qkv"]["kernel"]), qkv
    )

    kept = load_checkpoint(tmp_path, dtype="bfloat16")
    assert kept.cfg_model.dtype == "bfloat16"
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(kept.params))
    logits = kept.apply_fn(kept.params, jnp.ones((1, 5), jnp.int32))
    assert logits.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(logits)))


def test_a_sharded_checkpoint_loads(model, single, tmp_path):
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    files = os.listdir(tmp_path)
    assert loader.INDEX_FILE in files and loader.SINGLE_FILE not in files
    shards = sorted(f for f in files if f.endswith(".safetensors"))
    assert len(shards) > 2
    whole, sharded = load_checkpoint(single), load_checkpoint(tmp_path)
    assert jax.tree.structure(whole.params) == jax.tree.structure(sharded.params)
    for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(sharded.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    os.remove(tmp_path / shards[-1])
    with pytest.raises(HFImportError, match=f"shard '{shards[-1]}' named in"):
        read_tensors(tmp_path)


def _copy_checkpoint(src, dst):
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        with open(os.path.join(src, name), "rb") as f, open(os.path.join(dst, name), "wb") as g:
            g.write(f.read())
    return dst


def test_an_unsupported_model_type_is_refused_by_name(single, tmp_path):
    path = _copy_checkpoint(single, tmp_path / "bert")
    with open(path / "config.json") as f:
        cfg = json.load(f)
    cfg["model_type"] = "bert"
    with open(path / "config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(HFImportError, match=r"unsupported model_type 'bert'; supported: .*gpt2"):
        load_checkpoint(path)


def test_a_missing_tensor_is_refused_by_name(single, tmp_path):
    from safetensors.numpy import save_file

    path = _copy_checkpoint(single, tmp_path / "holed")
    tensors = read_tensors(path)
    del tensors["transformer.h.1.mlp.c_fc.weight"]
    save_file(tensors, str(path / loader.SINGLE_FILE), metadata={"format": "pt"})
    with pytest.raises(HFImportError, match=r"no tensor 'transformer\.h\.1\.mlp\.c_fc\.weight'"):
        load_checkpoint(path)

    tensors["transformer.h.1.mlp.c_fc.weight"] = np.zeros((32, 64), np.float32)
    save_file(tensors, str(path / loader.SINGLE_FILE), metadata={"format": "pt"})
    with pytest.raises(HFImportError, match=r"'transformer\.h\.1\.mlp\.c_fc\.weight' has shape"):
        load_checkpoint(path)


def test_missing_files_and_dtypes_are_named(tmp_path):
    with pytest.raises(HFImportError, match="no config.json"):
        load_checkpoint(tmp_path)
    with pytest.raises(HFImportError, match="no model.safetensors or model.safetensors.index"):
        read_tensors(tmp_path)
    with pytest.raises(HFImportError, match="dtype 'float16'"):
        load_checkpoint(tmp_path, dtype="float16")


def test_the_tokenizer_comes_along_when_there_is_one(single, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    assert load_checkpoint(single).tokenizer is None
    path = _copy_checkpoint(single, tmp_path / "with_tokenizer")
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / loader.TOKENIZER_FILE))
    imported = load_checkpoint(path)
    assert imported.tokenizer.encode("hello world again").ids == [1, 2, 0]


def test_model_types_and_families_agree():
    assert loader.MODEL_TYPES["gpt2"] == families.LAZY_FAMILIES["gpt2"]
    assert set(loader.MODEL_TYPES.values()) == set(families.LAZY_FAMILIES.values())
    assert C.MODEL_FAMILIES == families.project_family_names()
    assert families.get_family("gpt2").name == "gpt2"
    with pytest.raises(ValueError, match="unknown model family 'gpt3'.*gpt2.*llama.*neox"):
        families.get_family("gpt3")
