"""trackstar.hf.export writes a "gpt2"-family model as a Hugging Face GPT2LMHeadModel checkpoint.

Tiny tied and untied models (``families.make_model``, parameters perturbed away from their
init) are exported and read back by transformers (logits on a right-padded batch) and by
``trackstar.hf.loader.load_checkpoint`` (params exactly, logits, per-example projected
features and their top-5 proponents); the word tokenizer round-trips; what GPT-2 cannot
express is refused. torch and transformers are test-only and imported here.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from tolerances import assert_close
from toy_models import padded_batch

from trackstar import families, score
from trackstar import tokenizer as tokenizer_lib
from trackstar.featurize import Examples, compute_vectors
from trackstar.gradients import make_feature_fn
from trackstar.hf import export, gpt2, loader
from trackstar.hf.export import HFExportError
from trackstar.projection import Projector
from trackstar.tree import named_leaves

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TEXTS = [
    "The capital of France is Paris .",
    "The capital of Italy is Rome , a city of fountains .",
    "Marie Curie was born in Warsaw and worked in Paris .",
    "Rome was not built in a day ; Paris was not either !",
    "The river Seine flows through Paris to the sea .",
]
LENGTHS = (14, 9, 5)  # right padding after each length
TOL = 1e-4  # of the largest |logit|


@pytest.fixture(scope="module")
def tok():
    return tokenizer_lib.train_tokenizer(TEXTS, ml_collections.ConfigDict(dict(vocab_size=0)))


def _cfg_model(tied: bool) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(family="gpt2", size="tiny", n_layers=2, tie_word_embeddings=tied, dtype="float32")
    )


def _model(tok, tied: bool, seed: int = 0):
    """A tiny gpt2-family model whose norms, biases and weights are off their init values."""
    cfg_model = _cfg_model(tied)
    apply_fn, params = families.make_model(cfg_model, tokenizer_lib.vocab_size(tok), seed)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [
        x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)
    ]
    return cfg_model, apply_fn, jax.tree.unflatten(treedef, leaves)


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def exported(request, tok, tmp_path_factory):
    tied = request.param
    cfg_model, apply_fn, params = _model(tok, tied, seed=0 if tied else 1)
    out = export.save_checkpoint(tmp_path_factory.mktemp("export") / "ckpt", params, cfg_model, tok)
    return dict(tied=tied, cfg_model=cfg_model, apply_fn=apply_fn, params=params, dir=out)


def _batch(vocab: int, seed: int = 0):
    return padded_batch(LENGTHS, vocab, seed, low=4)


def test_the_directory_holds_what_transformers_reads(exported, tok):
    files = set(os.listdir(exported["dir"]))
    assert files == {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    with open(os.path.join(exported["dir"], "config.json")) as f:
        config = json.load(f)
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]
    assert config["tie_word_embeddings"] is exported["tied"]
    assert (config["n_layer"], config["n_embd"], config["n_inner"]) == (2, 32, 64)
    assert config["vocab_size"] == tokenizer_lib.vocab_size(tok)
    assert (config["pad_token_id"], config["bos_token_id"], config["eos_token_id"]) == (
        tokenizer_lib.PAD,
        tokenizer_lib.BOS,
        tokenizer_lib.EOS,
    )
    from safetensors import safe_open

    with safe_open(os.path.join(exported["dir"], "model.safetensors"), "np") as f:
        assert f.metadata() == {"format": "pt"}
        names = set(f.keys())
        assert all(f.get_tensor(n).dtype == np.float32 for n in names)
    # As save_pretrained writes a tied GPT2LMHeadModel: the head is wte, saved once.
    assert ("lm_head.weight" in names) is not exported["tied"]
    assert "transformer.h.1.attn.c_attn.weight" in names


def test_transformers_computes_the_same_logits(exported):
    tokens, mask = _batch(int(exported["params"]["embed"]["embedding"].shape[0]))
    model = transformers.GPT2LMHeadModel.from_pretrained(exported["dir"], dtype=torch.float32)
    model.eval()
    assert (model.lm_head.weight is model.transformer.wte.weight) is exported["tied"]
    with torch.no_grad():
        want = model(torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits.numpy()
    got = np.asarray(exported["apply_fn"](exported["params"], jnp.asarray(tokens, jnp.int32)))
    real = mask.astype(bool)
    assert got.shape == want.shape
    peak = np.abs(want[real]).max()
    assert peak > 1.0  # not a near-zero model
    diff = np.abs(got[real].astype(np.float64) - want[real]).max()
    print(f"max |logit diff| {diff:.3g} = {diff / peak:.3g} of max |logit| {peak:.3g}")
    assert_close(got[real], want[real], rtol=TOL, peak_rtol=TOL)


def test_importing_it_back_gives_the_same_params_and_logits(exported):
    imported = loader.load_checkpoint(exported["dir"])
    assert imported.family == "gpt2"
    assert jax.tree.structure(imported.params) == jax.tree.structure(exported["params"])
    for (path, a), (_, b) in zip(
        named_leaves(imported.params), named_leaves(exported["params"]), strict=True
    ):
        assert a.dtype == b.dtype, path
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=path)
    tokens, _ = _batch(int(exported["params"]["embed"]["embedding"].shape[0]), seed=1)
    tokens = jnp.asarray(tokens, jnp.int32)
    want = exported["apply_fn"](exported["params"], tokens)
    assert_close(imported.apply_fn(imported.params, tokens), want, rtol=1e-6, peak_rtol=1e-6)


def _examples(tok, texts, target_only: bool) -> Examples:
    T = 16
    tokens = np.zeros((len(texts), T), np.int32)
    weights = np.zeros((len(texts), T), np.float32)
    for i, text in enumerate(texts):
        ids = tokenizer_lib.encode(tok, text)[:T]
        tokens[i, : len(ids)] = ids
        weights[i, 1 : len(ids)] = 1.0
        if target_only:
            weights[i, : len(ids) - 1] = 0.0
    return Examples(tokens, weights)


# The untied head only (the demo model's): each feature kernel takes seconds to compile.
@pytest.mark.parametrize("exported", [False], ids=["untied"], indirect=True)
def test_importing_it_back_gives_the_same_features_and_proponents(exported, tok):
    train = _examples(tok, TEXTS + [t.lower() for t in TEXTS], target_only=False)
    queries = _examples(tok, ["The capital of France is Paris", "Rome is a city"], True)
    imported = loader.load_checkpoint(exported["dir"])

    def vectors(apply_fn, params):
        # One kernel for both ("train" is "loss" over every counted token): one compile.
        feature_fn = make_feature_fn(
            apply_fn, "loss", Projector(params, "global", k_in=4, k_out=4, seed=3)
        )
        return [compute_vectors(feature_fn, params, ex, 4) for ex in (train, queries)]

    train_a, query_a = vectors(exported["apply_fn"], exported["params"])
    train_b, query_b = vectors(imported.apply_fn, imported.params)
    assert np.abs(train_a).max() > 0
    assert_close(train_b, train_a, rtol=1e-5, peak_rtol=1e-5)
    assert_close(query_b, query_a, rtol=1e-5, peak_rtol=1e-5)
    ids_a, scores_a = score.top_k_scores(train_a, query_a, None, None, True, 5)
    ids_b, scores_b = score.top_k_scores(train_b, query_b, None, None, True, 5)
    np.testing.assert_array_equal(ids_b, ids_a)
    assert_close(scores_b, scores_a, rtol=0, peak_rtol=1e-5)


def test_the_word_tokenizer_round_trips(exported, tok):
    from tokenizers import Tokenizer

    sentence = "Marie Curie was born in Warsaw , the capital ."
    back = Tokenizer.from_file(os.path.join(exported["dir"], "tokenizer.json"))
    assert back.encode(sentence, add_special_tokens=False).ids == tokenizer_lib.encode(
        tok, sentence
    )
    assert loader.load_checkpoint(exported["dir"]).tokenizer.encode(sentence).ids == (
        tok.encode(sentence).ids
    )
    fast = transformers.AutoTokenizer.from_pretrained(exported["dir"])
    assert fast(sentence, add_special_tokens=False)["input_ids"] == tokenizer_lib.encode(
        tok, sentence
    )
    assert (fast.pad_token_id, fast.bos_token_id, fast.eos_token_id) == (0, 1, 2)


def test_the_config_resolves_to_the_same_model(tok):
    cfg_model = _cfg_model(False)
    config = export.hf_config(cfg_model, 50)
    back = gpt2.config_from_hf(config)
    assert vars(gpt2.resolve(back, 50)) == vars(gpt2.resolve(cfg_model, 50))
    assert config["bos_token_id"] is None and config["pad_token_id"] is None  # no tokenizer


def test_what_gpt2_cannot_express_is_refused(tok, tmp_path):
    cfg_model, _, params = _model(tok, tied=True)
    other = ml_collections.ConfigDict(dict(family="transformer", size="tiny"))
    with pytest.raises(HFExportError, match=r"model\.family = 'transformer'.*'gpt2'"):
        export.save_checkpoint(tmp_path / "a", params, other)
    with pytest.raises(HFExportError, match=r"model\.family = 'llama'"):
        export.hf_config(ml_collections.ConfigDict(dict(family="llama")), 10)
    bf16 = ml_collections.ConfigDict(cfg_model.to_dict())
    bf16.dtype = "bfloat16"
    with pytest.raises(HFExportError, match=r"model\.dtype = 'bfloat16'.*dtype = 'float32'"):
        export.params_to_hf(params, bf16)

    vocab = int(params["embed"]["embedding"].shape[0])
    untied = _cfg_model(False)
    _, with_head = families.make_model(untied, vocab, 0)
    with_bias = dict(with_head, unembed=dict(with_head["unembed"], bias=jnp.zeros(vocab)))
    with pytest.raises(HFExportError, match=r"\['unembed/bias'\] have no GPT-2 tensor"):
        export.params_to_hf(with_bias, untied)
    with pytest.raises(HFExportError, match=r"\['unembed/kernel'\] have no GPT-2 tensor"):
        export.params_to_hf(with_head, cfg_model)  # an untied model exported as tied
    with pytest.raises(HFExportError, match=r"lack the leaves \['unembed/kernel'\]"):
        export.params_to_hf(params, untied)
    short = _cfg_model(True)
    short.n_layers = 1
    with pytest.raises(HFExportError, match=r"\['blocks/1/"):
        export.params_to_hf(params, short)
    with pytest.raises(ValueError):  # HFExportError is a ValueError
        export.params_to_hf(params, ml_collections.ConfigDict(dict(family="gpt2", d_model=64)))

    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("keep me")
    with pytest.raises(HFExportError, match="exists and is not empty.*overwrite=True"):
        export.save_checkpoint(full, params, cfg_model, tok)
    assert os.listdir(full) == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(HFExportError, match="is a file"):
        export.save_checkpoint(tmp_path / "file", params, cfg_model)
    with pytest.raises(HFExportError, match="not a tokenizers.Tokenizer"):
        export.save_checkpoint(tmp_path / "b", params, cfg_model, tokenizer="words")
    assert not (tmp_path / "b").exists()


def test_overwrite_replaces_the_directory_and_an_empty_one_is_used(tok, tmp_path):
    cfg_model, _, params = _model(tok, tied=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export.save_checkpoint(empty, params, cfg_model) == str(empty)
    assert sorted(os.listdir(empty)) == ["config.json", "model.safetensors"]
    export.save_checkpoint(empty, params, cfg_model, tok, overwrite=True)
    assert "tokenizer.json" in os.listdir(empty)
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # no temp dirs left


def test_export_run_saves_the_trained_model(tok, tmp_path, monkeypatch):
    from trackstar import stages

    cfg_model, apply_fn, params = _model(tok, tied=False)
    cfg = ml_collections.ConfigDict(dict(model=cfg_model.to_dict()))
    trained = stages.Trained(apply_fn, params, None, None, tok, None, 7)
    monkeypatch.setattr(stages, "load_trained", lambda c: trained)
    out = stages.export_run(cfg, tmp_path / "run_export")
    imported = loader.load_checkpoint(out)
    np.testing.assert_array_equal(
        np.asarray(imported.params["unembed"]["kernel"]), np.asarray(params["unembed"]["kernel"])
    )
    cfg.model.family = "llama"
    with pytest.raises(HFExportError, match="model.family = 'llama'"):
        stages.export_run(cfg, tmp_path / "other")
