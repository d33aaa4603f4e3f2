"""Writes a ``"gpt2"``-family model as a Hugging Face ``GPT2LMHeadModel`` checkpoint directory.

The inverse of ``trackstar.hf.loader.load_checkpoint`` for GPT-2, through the same mapping
tables (``trackstar.hf.gpt2.TOP_TENSORS``, ``BLOCK_TENSORS``, ``HEAD_TENSOR``):

- ``hf_config(cfg_model, vocab_size, tokenizer=None)``: the ``config.json`` dict;
- ``params_to_hf(params, cfg_model)``: the tensors by Hugging Face name (``transformer.``
  prefix; ``lm_head.weight`` only for an untied head, as ``save_pretrained`` writes a tied
  ``GPT2LMHeadModel``: the head is ``transformer.wte.weight``, tied again on load);
- ``save_checkpoint(out_dir, params, cfg_model, tokenizer=None)``: ``config.json``,
  ``model.safetensors`` (float32, metadata ``{"format": "pt"}``) and, with a tokenizer,
  ``tokenizer.json`` plus a ``tokenizer_config.json`` naming its special tokens, so
  ``transformers.GPT2LMHeadModel.from_pretrained(out_dir)`` and
  ``transformers.AutoTokenizer.from_pretrained(out_dir)`` read it;
- ``trackstar.stages.export_run(cfg, out_dir)`` writes a trained run's model through it.

What GPT-2 cannot express is refused with ``HFExportError`` naming the field and the fix: a
family other than ``"gpt2"``, a params leaf without a GPT-2 tensor (``unembed/bias``), a
missing leaf or a wrong shape, a compute dtype other than float32. Nothing is downloaded and
neither torch nor transformers is imported.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np

from trackstar import families, files
from trackstar.hf import gpt2
from trackstar.hf.loader import CONFIG_FILE, SINGLE_FILE, TOKENIZER_FILE, HFImportError
from trackstar.tree import named_leaves

PyTree = Any

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

# Special-token roles -> token strings tried in order (trackstar.tokenizer's names first).
_SPECIAL_NAMES: dict[str, tuple[str, ...]] = {
    "bos": ("[BOS]", "<s>", "<|endoftext|>"),
    "eos": ("[EOS]", "</s>", "<|endoftext|>"),
    "pad": ("[PAD]", "<pad>"),
    "unk": ("[UNK]", "<unk>"),
}


class HFExportError(HFImportError):
    """A model that cannot be written as a Hugging Face checkpoint; the message says the fix.

    A ``ValueError`` (through ``HFImportError``), so callers catching either see it.
    """


# ----------------------------------------------------------------------------- config


def check_exportable(cfg_model: Mapping | Any) -> None:
    """Refuses a ``model`` config section GPT-2's ``config.json`` cannot express."""
    family = families.family_name(cfg_model)
    if family != gpt2.FAMILY:
        raise HFExportError(
            f"model.family = {family!r}; only the {gpt2.FAMILY!r} family exports as a Hugging "
            f"Face GPT2LMHeadModel: train the model with model.family = {gpt2.FAMILY!r}"
        )
    dtype = cfg_model.get("dtype", "float32") or "float32"
    if dtype != "float32":
        raise HFExportError(
            f"model.dtype = {dtype!r}: the model computes in {dtype}, which a GPT-2 config.json "
            "cannot say (Hugging Face computes in the dtype the weights are loaded in); export "
            "a copy of the model section with dtype = 'float32' (the weights are written in "
            "float32 either way; its logits then differ from the run's at bfloat16 precision)"
        )


def _special_ids(tokenizer: Any) -> dict[str, tuple[str, int] | None]:
    """``{role: (token, id) or None}`` of the special tokens ``tokenizer`` has."""
    out: dict[str, tuple[str, int] | None] = {}
    for role, names in _SPECIAL_NAMES.items():
        out[role] = None
        if tokenizer is None:
            continue
        for name in names:
            token_id = tokenizer.token_to_id(name)
            if token_id is not None:
                out[role] = (name, int(token_id))
                break
    return out


def hf_config(cfg_model: Mapping | Any, vocab_size: int, tokenizer: Any = None) -> dict:
    """The ``config.json`` dict of the GPT-2 that ``cfg_model`` (family ``"gpt2"``) builds.

    Sizes and options come from ``trackstar.hf.gpt2.resolve`` (the named size filled in), so
    ``gpt2.config_from_hf`` of the result resolves to the same model. Dropouts are 0 (the
    trackstar model has none). ``bos/eos/pad_token_id`` are the ids of ``tokenizer``'s
    special tokens (``[BOS]``, ``[EOS]``, ``[PAD]`` or the usual Hugging Face names), None
    without a tokenizer or without such a token.

    Raises:
      HFExportError: a family other than ``"gpt2"`` or a compute dtype other than float32.
    """
    check_exportable(cfg_model)
    spec = gpt2.resolve(cfg_model, int(vocab_size))
    special = _special_ids(tokenizer)
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": spec.vocab_size,
        "n_embd": spec.d_model,
        "n_layer": spec.n_layers,
        "n_head": spec.n_heads,
        "n_inner": spec.d_ff,
        "n_positions": spec.max_len,
        "n_ctx": spec.max_len,
        "layer_norm_epsilon": float(spec.layer_norm_epsilon),
        "activation_function": str(spec.activation),
        "scale_attn_weights": bool(spec.scale_attn_weights),
        "scale_attn_by_inverse_layer_idx": bool(spec.scale_attn_by_inverse_layer_idx),
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "tie_word_embeddings": bool(spec.tie_word_embeddings),
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": special["bos"][1] if special["bos"] else None,
        "eos_token_id": special["eos"][1] if special["eos"] else None,
        "pad_token_id": special["pad"][1] if special["pad"] else None,
        "torch_dtype": "float32",  # transformers < 5
        "dtype": "float32",  # transformers >= 5
    }


# ----------------------------------------------------------------------------- tensors


def _vocab_size(params: PyTree) -> int:
    try:
        return int(np.shape(params["embed"]["embedding"])[0])
    except (KeyError, TypeError, IndexError):
        raise HFExportError(
            "params has no 'embed/embedding' leaf; pass the params tree of a 'gpt2'-family "
            "model (trackstar.families.make_model or trackstar.hf.loader.load_checkpoint)"
        ) from None


def _hf_names(spec: gpt2.Spec) -> dict[str, str]:
    """trackstar path -> Hugging Face tensor name, from gpt2's mapping tables."""
    names = {path: "transformer." + name for path, name in gpt2.TOP_TENSORS.items()}
    for i in range(spec.n_layers):
        for path, name in gpt2.BLOCK_TENSORS.items():
            names[f"blocks/{i}/{path}"] = "transformer." + name.format(i=i)
    if not spec.tie_word_embeddings:
        names["unembed/kernel"] = gpt2.HEAD_TENSOR  # stored transposed: (vocab, d)
    return names


def params_to_hf(params: PyTree, cfg_model: Mapping | Any) -> dict[str, np.ndarray]:
    """The tensors of a ``GPT2LMHeadModel`` checkpoint from a ``"gpt2"``-family params tree.

    The inverse of ``gpt2.params_from_hf`` through its tables: names carry the
    ``transformer.`` prefix; ``lm_head.weight`` is ``unembed/kernel.T`` for an untied head and
    absent for a tied one (``save_pretrained`` writes the tied table once, as ``wte``). Every
    tensor is a C-contiguous float32 array (bfloat16 leaves are widened exactly). The vocab
    size is the token embedding's row count.

    Raises:
      HFExportError: the family or dtype is not exportable (``hf_config``), a leaf has no
        GPT-2 tensor (e.g. ``unembed/bias``: GPT-2's head has no bias), a leaf is missing, or a
        leaf's shape is not the one ``cfg_model`` builds.
    """
    check_exportable(cfg_model)
    vocab_size = _vocab_size(params)
    declared = cfg_model.get("vocab_size", None)
    if declared and int(declared) != vocab_size:
        raise HFExportError(
            f"model.vocab_size = {declared} but params' embed/embedding has {vocab_size} rows; "
            "pass the model section the params were built with"
        )
    spec = gpt2.resolve(cfg_model, vocab_size)
    names = _hf_names(spec)
    abstract = dict(named_leaves(gpt2.abstract_params(cfg_model, vocab_size)))
    leaves = dict(named_leaves(params))
    extra = sorted(set(leaves) - set(names))
    if extra:
        raise HFExportError(
            f"params leaves {extra} have no GPT-2 tensor (GPT2LMHeadModel's lm_head has no "
            "bias; tie_word_embeddings decides whether unembed/kernel exists); export a model "
            "the 'gpt2' family builds from this config"
        )
    missing = sorted(set(names) - set(leaves))
    if missing:
        raise HFExportError(
            f"params lack the leaves {missing} that model.tie_word_embeddings = "
            f"{spec.tie_word_embeddings} and model.n_layers = {spec.n_layers} make; pass the "
            "model section the params were built with"
        )
    tensors: dict[str, np.ndarray] = {}
    for path, hf_name in names.items():
        value = np.asarray(leaves[path])
        want = tuple(abstract[path].shape)
        if tuple(value.shape) != want:
            raise HFExportError(
                f"params leaf {path!r} has shape {tuple(value.shape)}; the model section builds "
                f"{want}: pass the model section the params were built with"
            )
        if not np.issubdtype(value.dtype, np.floating) and value.dtype.name != "bfloat16":
            raise HFExportError(f"params leaf {path!r} has dtype {value.dtype}, not floating")
        value = value.astype(np.float32)
        if path == "unembed/kernel":
            value = value.T
        tensors[hf_name] = np.ascontiguousarray(value)
    return tensors


# ----------------------------------------------------------------------------- files


def _hf_tokenizer(tokenizer: Any) -> Any:
    """The ``tokenizers.Tokenizer`` of ``tokenizer`` (itself, or a wrapper's ``_tokenizer``)."""
    from tokenizers import Tokenizer

    for candidate in (tokenizer, getattr(tokenizer, "_tokenizer", None)):
        if isinstance(candidate, Tokenizer):
            return candidate
    raise HFExportError(
        f"tokenizer of type {type(tokenizer).__name__} is not a tokenizers.Tokenizer (the "
        "project's trackstar.tokenizer builds one); pass that, or tokenizer=None"
    )


def _tokenizer_config(tokenizer: Any, max_len: int) -> dict:
    """``tokenizer_config.json``: a fast tokenizer with the special tokens named."""
    out: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": int(max_len),
        "clean_up_tokenization_spaces": False,
    }
    for role, found in _special_ids(tokenizer).items():
        if found:
            out[f"{role}_token"] = found[0]
    return out


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(
    out_dir: str | os.PathLike,
    params: PyTree,
    cfg_model: Mapping | Any,
    tokenizer: Any = None,
    *,
    overwrite: bool = False,
) -> str:
    """Writes a ``GPT2LMHeadModel`` checkpoint directory; returns its path.

    ``config.json`` (``hf_config``), ``model.safetensors`` (``params_to_hf``, metadata
    ``{"format": "pt"}``) and, with a ``tokenizers.Tokenizer``, ``tokenizer.json`` and
    ``tokenizer_config.json``. Everything is written to a temporary sibling directory, synced,
    then renamed to ``out_dir``: a reader sees no directory or a complete one.

    Raises:
      HFExportError: what ``params_to_hf`` refuses, a tokenizer that is not a
        ``tokenizers.Tokenizer`` or whose vocabulary is larger than the model's, or an
        ``out_dir`` that is a file or a non-empty directory (pass ``overwrite=True`` to replace
        the directory).
    """
    from safetensors.numpy import save

    out = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out) and not os.path.isdir(out):
        raise HFExportError(f"{out!r} is a file; pass a directory path to export to")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise HFExportError(
            f"{out!r} exists and is not empty; pick a new directory or pass overwrite=True "
            "to replace it"
        )
    tensors = params_to_hf(params, cfg_model)
    vocab_size = int(tensors["transformer.wte.weight"].shape[0])
    tok = _hf_tokenizer(tokenizer) if tokenizer is not None else None
    if tok is not None and tok.get_vocab_size(with_added_tokens=True) > vocab_size:
        raise HFExportError(
            f"the tokenizer has {tok.get_vocab_size(with_added_tokens=True)} ids but the model "
            f"only {vocab_size} rows: pass the tokenizer the model was trained with"
        )
    config = hf_config(cfg_model, vocab_size, tok)

    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        # Each file is written synced (trackstar.files), then the directory is renamed.
        files.write_json(os.path.join(tmp, CONFIG_FILE), config, sort_keys=True)
        files.write_bytes(os.path.join(tmp, SINGLE_FILE), save(tensors, metadata={"format": "pt"}))
        if tok is not None:
            files.write_text(os.path.join(tmp, TOKENIZER_FILE), tok.to_str())
            files.write_json(
                os.path.join(tmp, TOKENIZER_CONFIG_FILE),
                _tokenizer_config(tok, config["n_positions"]),
                sort_keys=True,
            )
        _fsync_dir(tmp)
        _move_into_place(tmp, out)
        _fsync_dir(parent)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _move_into_place(tmp: str, out: str) -> None:
    """Renames ``tmp`` to ``out``; an existing ``out`` is renamed aside first, then removed."""
    if not os.path.exists(out):
        os.rename(tmp, out)
        return
    if not os.listdir(out):
        os.rmdir(out)
        os.rename(tmp, out)
        return
    old = f"{tmp}.old"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        os.rename(old, out)  # put the previous checkpoint back
        raise
    shutil.rmtree(old, ignore_errors=True)
