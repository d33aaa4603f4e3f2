"""Model families found by name: ``cfg.model.family`` -> how to build, size and shard a model.

A ``ModelFamily`` gives everything the library needs of one kind of model (docs/models.md):

- ``build(cfg_model, vocab_size, seed) -> (apply_fn, params)``: the pure apply function
  (``trackstar.taps.ApplyFn``; with ``tapped`` it takes the fast path) and a nested-dict params
  tree, read from the ``model`` config section (its other fields are the family's business);
- ``abstract_params(cfg_model, vocab_size)``: the params' ``jax.ShapeDtypeStruct``s, for the
  memory report (default: ``jax.eval_shape`` of ``build``);
- ``tensor_rules``: its tensor-parallel sharding rules, what ``mesh.rules = "tensor"`` means
  for it (``trackstar.sharding``; ``"fsdp"`` and ``"replicated"`` work for any model).

``MODEL_FAMILIES`` holds the registered families; ``LAZY_FAMILIES`` names the modules of the
project's families (the Hugging Face architectures of ``trackstar.hf``; the demo model is a
small GPT-2), imported and so registered the first time ``get_family`` is asked for one;
``register_family`` adds one at run time (tests, plugins); ``make_model`` builds the one a
config names.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import Any

import jax

from trackstar.model import ModelConfigError
from trackstar.taps import ApplyFn

PyTree = Any
Rules = tuple[tuple[str, Any], ...]
DEFAULT_FAMILY = "gpt2"  # cfg.model.family when the field is absent or empty


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """One kind of model, as the library builds, sizes and shards it (module docstring)."""

    name: str
    build: Callable[[Any, int, int], tuple[ApplyFn, PyTree]]
    tensor_rules: Rules | None = None  # None: the family has no "tensor" preset
    abstract: Callable[[Any, int], PyTree] | None = None  # None: jax.eval_shape of build
    description: str = ""

    def abstract_params(self, cfg_model: Any, vocab_size: int) -> PyTree:
        """ShapeDtypeStructs of ``build``'s params for ``cfg_model`` (nothing allocated)."""
        if self.abstract is not None:
            return self.abstract(cfg_model, vocab_size)
        return jax.eval_shape(lambda: self.build(cfg_model, vocab_size, 0)[1])


MODEL_FAMILIES: dict[str, ModelFamily] = {}  # registered (the project's register on import)


# The project's families, each defined in a module of its own and imported (and so registered)
# the first time ``get_family`` is asked for it: the Hugging Face architectures of trackstar.hf,
# which ``trackstar.hf.loader.load_checkpoint`` fills with a checkpoint's weights. The demo model
# is a small configuration of "gpt2" (configs/demo.py).
LAZY_FAMILIES: dict[str, str] = {
    "gpt2": "trackstar.hf.gpt2",
    "llama": "trackstar.hf.llama",
    "neox": "trackstar.hf.neox",
}


# Family names the project no longer has, with what to write instead (a clear error, not a guess).
RETIRED_FAMILIES: dict[str, str] = {
    "transformer": (
        "the project's own Transformer is now a configuration of the GPT-2 family: set "
        "model.family = 'gpt2' and model.tie_word_embeddings = False (configs/demo.py); a run "
        "trained with the old model must be retrained"
    ),
}


def project_family_names() -> tuple[str, ...]:
    """The project's own family names (the default first)."""
    return (DEFAULT_FAMILY, *(n for n in LAZY_FAMILIES if n != DEFAULT_FAMILY))


def register_family(family: ModelFamily, *, replace: bool = False) -> ModelFamily:
    """Adds ``family`` to ``MODEL_FAMILIES`` (refuses a taken name unless ``replace``)."""
    if not family.name or not isinstance(family.name, str):
        raise ValueError(f"a model family needs a non-empty name, got {family.name!r}")
    if family.name in MODEL_FAMILIES and not replace:
        raise ValueError(
            f"model family {family.name!r} is registered already; pick another name or pass "
            "replace=True"
        )
    MODEL_FAMILIES[family.name] = family
    return family


def family_name(cfg_model: Mapping | Any) -> str:
    """The family a ``model`` config section names (``DEFAULT_FAMILY`` when it names none)."""
    return str(cfg_model.get("family", DEFAULT_FAMILY) or DEFAULT_FAMILY)


def get_family(which: str | ModelFamily | Mapping | Any | None = None) -> ModelFamily:
    """The family named by ``which``: a name, a ``model`` config section, a family, or None.

    None means ``DEFAULT_FAMILY``. Raises ``ModelConfigError`` naming the known families for
    an unknown name.
    """
    if isinstance(which, ModelFamily):
        return which
    if which is None:
        name = DEFAULT_FAMILY
    elif isinstance(which, str):
        name = which
    else:
        name = family_name(which)
    if name not in MODEL_FAMILIES and name in LAZY_FAMILIES:
        _load_lazy(name)
    if name not in MODEL_FAMILIES and name in RETIRED_FAMILIES:
        raise ModelConfigError(f"model.family = {name!r}: {RETIRED_FAMILIES[name]}")
    if name not in MODEL_FAMILIES:
        raise ModelConfigError(
            f"unknown model family {name!r}; set model.family to one of "
            f"{', '.join(sorted(set(MODEL_FAMILIES) | set(LAZY_FAMILIES)))}, or register one with "
            "trackstar.families.register_family (docs/models.md)"
        )
    return MODEL_FAMILIES[name]


def _load_lazy(name: str) -> None:
    """Imports ``LAZY_FAMILIES[name]``, which registers the family (again if it was dropped)."""
    module = importlib.import_module(LAZY_FAMILIES[name])
    family = getattr(module, "MODEL_FAMILY", None)
    if name not in MODEL_FAMILIES and isinstance(family, ModelFamily) and family.name == name:
        MODEL_FAMILIES[name] = family  # imported earlier, under another MODEL_FAMILIES


def make_model(cfg_model: Mapping | Any, vocab_size: int, seed: int) -> tuple[ApplyFn, PyTree]:
    """``(apply_fn, params)`` of the family ``cfg_model.family`` names, built from ``cfg_model``."""
    return get_family(cfg_model).build(cfg_model, vocab_size, seed)


def abstract_params(cfg_model: Mapping | Any, vocab_size: int) -> PyTree:
    """ShapeDtypeStructs of the params ``make_model`` would build (nothing allocated)."""
    return get_family(cfg_model).abstract_params(cfg_model, vocab_size)
