"""Reads a Hugging Face ``save_pretrained`` directory into one of trackstar's model families.

- ``read_tensors(dir)``: every tensor of ``model.safetensors`` or of the shards a
  ``model.safetensors.index.json`` names (its ``weight_map``), as numpy arrays in their stored
  dtype; bfloat16 (which safetensors' numpy reader refuses) is read from the raw file through
  ``ml_dtypes.bfloat16``.
- ``read_hf_config(dir)``: ``config.json`` as a dict.
- ``load_checkpoint(dir, dtype)``: both, mapped by the family module ``MODEL_TYPES`` names for
  the config's ``model_type`` (``trackstar.hf`` documents a family module's interface), plus
  the tokenizer from ``tokenizer.json`` when there is one.

Nothing is downloaded: ``dir`` is a local directory.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import struct
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

PyTree = Any

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"

# Hugging Face ``model_type`` -> the trackstar.hf module that maps it (imported on use).
MODEL_TYPES: dict[str, str] = {
    "gpt2": "trackstar.hf.gpt2",
    "llama": "trackstar.hf.llama",
    "mistral": "trackstar.hf.llama",
    "qwen2": "trackstar.hf.llama",
    "gpt_neox": "trackstar.hf.neox",
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# safetensors dtype names -> numpy dtypes (the raw reader's; bfloat16 through ml_dtypes).
_ST_DTYPES: dict[str, Any] = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class HFImportError(ValueError):
    """A checkpoint that cannot be imported; the message names the file, type or tensor."""


@dataclasses.dataclass
class ImportedModel:
    """A Hugging Face checkpoint as a trackstar model (``load_checkpoint``)."""

    family: str  # the trackstar.families name ("gpt2", "llama", "neox")
    cfg_model: ml_collections.ConfigDict  # the ``model`` config section (``family`` included)
    apply_fn: Any  # apply_fn(params, tokens_BxT) -> logits_BxTxV, with .tapped (taps contract)
    params: PyTree  # nested dict of jnp arrays, the family's paths
    hf_config: dict  # config.json
    tokenizer: Any = None  # tokenizers.Tokenizer from tokenizer.json, or None


# ----------------------------------------------------------------------------- files


def read_hf_config(checkpoint_dir: str | os.PathLike) -> dict:
    """``config.json`` of a checkpoint directory (a missing file is named in the error)."""
    path = os.path.join(os.fspath(checkpoint_dir), CONFIG_FILE)
    if not os.path.isfile(path):
        raise HFImportError(
            f"no {CONFIG_FILE} in {os.fspath(checkpoint_dir)!r}; pass a directory written by "
            "save_pretrained"
        )
    with open(path) as f:
        return json.load(f)


def read_tensors(checkpoint_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint directory by their Hugging Face names, as numpy arrays.

    Reads ``model.safetensors``, or every shard ``model.safetensors.index.json`` names; dtypes
    are kept (bfloat16 as ``ml_dtypes.bfloat16``). A missing file or shard is named.
    """
    root = os.fspath(checkpoint_dir)
    index = os.path.join(root, INDEX_FILE)
    single = os.path.join(root, SINGLE_FILE)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map: dict[str, str] = json.load(f).get("weight_map", {})
        if not weight_map:
            raise HFImportError(f"{index!r} has no weight_map")
        tensors: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            path = os.path.join(root, shard)
            if not os.path.isfile(path):
                raise HFImportError(
                    f"shard {shard!r} named in {INDEX_FILE} is missing from {root!r}"
                )
            tensors.update(read_safetensors_file(path))
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise HFImportError(
                f"tensors {missing[:5]} named in {INDEX_FILE} are in none of the shards of {root!r}"
            )
        return tensors
    if os.path.isfile(single):
        return read_safetensors_file(single)
    raise HFImportError(
        f"no {SINGLE_FILE} or {INDEX_FILE} in {root!r}; save the model with "
        "save_pretrained(..., safe_serialization=True) (pytorch_model.bin is not read)"
    )


def read_safetensors_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """One ``.safetensors`` file as numpy arrays (bfloat16 read raw, through ml_dtypes)."""
    from safetensors import safe_open

    path = os.fspath(path)
    out: dict[str, np.ndarray] = {}
    raw: list[str] = []
    with safe_open(path, framework="np") as f:
        for name in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
            if f.get_slice(name).get_dtype() in _ST_DTYPES:
                out[name] = f.get_tensor(name)
            else:
                raw.append(name)
    if raw:
        out.update(_read_raw(path, raw))
    return out


def _read_raw(path: str, names: list[str]) -> dict[str, np.ndarray]:
    """Tensors ``names`` of a safetensors file from its header (for dtypes numpy lacks)."""
    import ml_dtypes

    dtypes = {
        **_ST_DTYPES,
        "BF16": ml_dtypes.bfloat16,
        "F8_E4M3": ml_dtypes.float8_e4m3fn,
        "F8_E5M2": ml_dtypes.float8_e5m2,
    }
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        base = 8 + header_len
        out = {}
        for name in names:
            entry = header[name]
            if entry["dtype"] not in dtypes:
                raise HFImportError(
                    f"tensor {name!r} in {path!r} has dtype {entry['dtype']}, which is not "
                    f"supported (supported: {sorted(dtypes)})"
                )
            start, end = entry["data_offsets"]
            f.seek(base + start)
            buf = f.read(end - start)
            out[name] = np.frombuffer(buf, dtype=dtypes[entry["dtype"]]).reshape(entry["shape"])
    return out


def read_tokenizer(checkpoint_dir: str | os.PathLike) -> Any:
    """``tokenizers.Tokenizer`` of ``tokenizer.json`` in the directory, or None without one."""
    path = os.path.join(os.fspath(checkpoint_dir), TOKENIZER_FILE)
    if not os.path.isfile(path):
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path)


# ----------------------------------------------------------------------------- families


def family_module(model_type: str) -> Any:
    """The trackstar.hf module mapping checkpoints of ``model_type`` (imported on first use)."""
    if model_type not in MODEL_TYPES:
        raise HFImportError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(MODEL_TYPES))}"
        )
    return importlib.import_module(MODEL_TYPES[model_type])


def require(tensors: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    """``tensors[name]``, or ``HFImportError`` naming the missing Hugging Face tensor."""
    if name not in tensors:
        raise HFImportError(
            f"the checkpoint has no tensor {name!r} (it has {len(tensors)} tensors, e.g. "
            f"{sorted(tensors)[:4]}); is it complete and of the model_type its config says?"
        )
    return tensors[name]


def _as_jax(a: Any, dtype: Any) -> jax.Array:
    """``a`` as a jax array, floating point ones cast to ``dtype``."""
    a = np.asarray(a) if not isinstance(a, jax.Array) else a
    return jnp.asarray(a, dtype if jnp.issubdtype(a.dtype, jnp.floating) else None)


def load_checkpoint(checkpoint_dir: str | os.PathLike, dtype: str = "float32") -> ImportedModel:
    """A ``save_pretrained`` directory as an ``ImportedModel`` with params in ``dtype``.

    ``dtype`` ("float32" or "bfloat16") is the params' dtype and ``cfg_model.dtype`` (the
    compute dtype the family uses). An unsupported ``model_type`` or a tensor the family needs
    but the checkpoint lacks raises ``HFImportError`` naming it.
    """
    if dtype not in DTYPES:
        raise HFImportError(f"dtype {dtype!r}; use one of {sorted(DTYPES)}")
    hf_config = read_hf_config(checkpoint_dir)
    model_type = hf_config.get("model_type")
    module = family_module(str(model_type))
    cfg_model = module.config_from_hf(hf_config)
    cfg_model.dtype = dtype
    tensors = read_tensors(checkpoint_dir)
    params = module.params_from_hf(tensors, cfg_model)
    params = jax.tree.map(lambda a: _as_jax(a, DTYPES[dtype]), params)
    vocab_size = int(cfg_model.vocab_size)
    make_apply = getattr(module, "make_apply", None)
    apply_fn = (
        make_apply(cfg_model, vocab_size)
        if make_apply is not None
        else module.build(cfg_model, vocab_size, 0)[0]
    )
    return ImportedModel(
        family=module.FAMILY,
        cfg_model=cfg_model,
        apply_fn=apply_fn,
        params=params,
        hf_config=hf_config,
        tokenizer=read_tokenizer(checkpoint_dir),
    )
