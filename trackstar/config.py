"""Config files, command-line overrides, validation, and the config a run directory remembers.

Configs are Python files in ``configs/`` with a ``get_config()`` returning an
``ml_collections.ConfigDict`` (nanodo / big_vision style). Overrides use the
``--config.a.b=value`` syntax of ``ml_collections.config_flags``. Before any work starts:

- an unknown field is an error naming it and the closest valid names;
- an override's value must fit the field's type (``train.steps expects an int, got 'abc'``);
- every value is checked against ``RULES`` (ranges, choices, files) and ``CROSS_CHECKS``
  (relations between fields) by ``validate``: one ``ConfigError`` lists every problem;
- on a run directory that already holds a world, the settings that define what was built
  (``BUILT_SECTIONS``: seed, world, tokenizer, model, train) come from the run's saved config,
  not from the config file; an override contradicting them is refused
  (``resolve_for_run_dir``). The rest (featurize, hessian, score, eval, tailpatch,
  experiment, mesh, logging) comes from the command. Stores are not pinned here: each records
  the featurize settings that made it and refuses another (``store.VectorStore.create``).

``config.json`` in a run directory is written once, when the run directory's world is first
built (``stages.stage_world``); world fields the world source ignores
(``world.unused_fields``) are left out of it and listed under ``"unused_fields"``.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import importlib.util
import json
import math
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections

from trackstar import world as world_lib
from trackstar.files import write_json

# The repository's configs/ (next to the package in a checkout or editable install).
_REPO_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def default_config_path(name: str = "demo.py") -> str:
    """``configs/<name>`` of the working directory when it exists, else of the repository
    this package lives in, else the working directory's (whose absence the config error names)."""
    here = os.path.join("configs", name)
    if os.path.isfile(here):
        return here
    repo = os.path.join(_REPO_CONFIGS, name)
    return repo if os.path.isfile(repo) else here


# ----- config + arguments -----------------------------------------------------------------------


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says how to fix it."""


# ----- loading and overrides ------------------------------------------------------------------


def _flat_keys(cfg: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in cfg.items():
        full = f"{prefix}{k}"
        keys.append(full)
        if isinstance(v, ml_collections.ConfigDict):
            keys.extend(_flat_keys(v, full + "."))
    return keys


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """Imports ``path`` and returns its ``get_config()``, optionally with ``path:arg``."""
    arg = None
    if ":" in os.path.basename(path):
        path, arg = path.rsplit(":", 1)
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist (see configs/ for the choices)")
    spec = importlib.util.spec_from_file_location(f"_trackstar_cfg_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} has no get_config() function")
    cfg = module.get_config(arg) if arg is not None else module.get_config()
    return cfg


# Fields that hold either a number or a keyword; an override keeps whichever it is.
MIXED_FIELDS = ("hessian.lambda_mix",)


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _coerce_scalar(key: str, value: Any, text: str, like: Any, what: str = "") -> Any:
    """``value`` as the type of ``like``; ``ConfigError`` naming ``key`` when it does not fit."""
    if isinstance(like, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{key} expects {what or 'a bool'} (True or False), got {text!r}")
    if isinstance(like, int):
        if _is_int(value):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} expects {what or 'an int'}, got {text!r}")
    if isinstance(like, float):
        if _is_number(value):
            return float(value)
        raise ConfigError(f"{key} expects {what or 'a number (float)'}, got {text!r}")
    if isinstance(like, str):
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} expects {what or 'a string'}, got {text!r}")
    return value


def _parse_value(key: str, text: str, current: Any) -> Any:
    """The override ``text`` as a value of ``current``'s type (``key`` names it in errors)."""
    value = _literal(text.strip())
    if key in MIXED_FIELDS:
        return float(value) if _is_number(value) else (value if isinstance(value, str) else text)
    if current is None:
        return value
    if isinstance(current, str):
        # A string field takes the text as typed ("0.9" stays "0.9"); a quoted string is unquoted.
        return value if isinstance(value, str) else text
    if isinstance(current, tuple | list):
        if isinstance(value, list | tuple):
            items = list(value)
        elif isinstance(value, str):
            # Unquoted lists: --config.experiment.methods=bm25,trackstar
            body = text.strip().strip("()[]")
            items = [_literal(p.strip()) for p in body.split(",") if p.strip()]
        else:
            items = [value]
        kinds = {type(x) for x in current}
        if len(kinds) == 1:
            like = current[0]
            what = {bool: "bools", int: "ints", float: "numbers", str: "strings"}.get(type(like))
            what = f"a tuple of {what}" if what else "a tuple"
            items = [_coerce_scalar(key, x, text, like, what) for x in items]
        return tuple(items)
    return _coerce_scalar(key, value, text, current)


def _node_and_name(cfg: ml_collections.ConfigDict, key: str) -> tuple[Any, str]:
    parts = key.split(".")
    node = cfg
    for i, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            valid = _flat_keys(cfg)
            close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise ConfigError(f"unknown config field {key!r}.{hint}")
        if i < len(parts) - 1:
            node = node[part]
    return node, parts[-1]


def get_field(cfg: ml_collections.ConfigDict, key: str) -> Any:
    """The value of the dotted field ``key``; ``ConfigError`` when there is no such field."""
    node, name = _node_and_name(cfg, key)
    return node[name]


def _assign(node: ml_collections.ConfigDict, name: str, key: str, value: Any) -> None:
    with node.unlocked():
        if key in MIXED_FIELDS:
            # ConfigDict keeps a field's first type; a mixed field may change it.
            del node[name]
            node[name] = value
            return
        try:
            node[name] = value
        except TypeError:
            kind = type(node[name]).__name__
            raise ConfigError(f"{key} expects a value of type {kind}, got {value!r}") from None


def set_override(cfg: ml_collections.ConfigDict, key: str, text: str) -> None:
    """Sets ``cfg.<key>`` from the string ``text``.

    An unknown key, a section, or a value that does not fit the field's type raises a one-line
    ``ConfigError`` naming the field.
    """
    node, name = _node_and_name(cfg, key)
    current = node[name]
    if isinstance(current, ml_collections.ConfigDict):
        raise ConfigError(f"{key!r} is a section; set one of its fields instead")
    _assign(node, name, key, _parse_value(key, text, current))


def split_args(argv: Sequence[str]) -> tuple[str | None, list[tuple[str, str]], list[str]]:
    """``(config path or None, [(key, text) overrides], other args)`` of a command line."""
    path = None
    overrides: list[tuple[str, str]] = []
    rest: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--config" and i + 1 < len(args):
            path = args[i + 1]
            i += 2
            continue
        if a.startswith("--config="):
            path = a.split("=", 1)[1]
        elif a.startswith("--config."):
            body = a[len("--config.") :]
            if "=" in body:
                k, v = body.split("=", 1)
            elif i + 1 < len(args):
                k, v = body, args[i + 1]
                i += 1
            else:
                raise ConfigError(f"override {a!r} has no value; write --config.{body}=VALUE")
            overrides.append((k, v))
        else:
            rest.append(a)
        i += 1
    return path, overrides, rest


@dataclasses.dataclass
class Command:
    """A command's resolved config and what went into it."""

    config: ml_collections.ConfigDict
    rest: list[str]  # Arguments that are not --config ones.
    path: str  # The config file.
    overrides: list[tuple[str, str]]  # (field, text) in command-line order.
    from_run_dir: list[str]  # Fields whose config-file value the run directory's replaced.


def load_command(argv: Sequence[str], default_config: str | None = None) -> Command:
    """Config file + overrides, resolved against the run directory, then validated."""
    path, overrides, rest = split_args(argv)
    path = path or default_config
    if path is None:
        raise ConfigError("no config given; pass --config configs/demo.py (or another file)")
    cfg = load_config_file(path)
    for k, v in overrides:
        set_override(cfg, k, v)
    cfg, replaced = resolve_for_run_dir(cfg, overrides)
    validate(cfg)
    return Command(cfg, rest, path, overrides, replaced)


def parse_args(argv: Sequence[str], default_config: str | None = None):
    """Parses ``--config PATH`` and ``--config.a.b=value`` arguments (see ``load_command``).

    Returns ``(config, rest)`` where ``rest`` are the arguments this function did not consume.
    """
    cmd = load_command(argv, default_config)
    return cmd.config, cmd.rest


def save_config(cfg: ml_collections.ConfigDict, path: str, unused: Sequence[str] = ()) -> None:
    """Writes ``cfg`` as JSON; the dotted fields in ``unused`` are left out and listed under
    ``"unused_fields"`` (they had no effect on what was built)."""
    d = cfg.to_dict()
    for key in unused:
        *parents, name = key.split(".")
        node = d
        for p in parents:
            node = node.get(p, {})
        node.pop(name, None)
    if unused:
        d["unused_fields"] = sorted(unused)
    write_json(path, d, sort_keys=True, default=str)


# ----- validation -----------------------------------------------------------------------------

# Choices defined in modules that import JAX; tests/test_config.py checks they match.
SCORE_PRESETS = (
    "grad_dot",
    "grad_cosine",
    "trak",
    "exp_opt",
    "exp_opt_norm",
    "exp_opt_norm_rtrain",
    "trackstar",
    "step_influence",
)  # trackstar.score.PRESETS
METHODS = ("bm25", "random", *SCORE_PRESETS)  # trackstar.experiments.ALL_METHODS
# Modules of trackstar/experiments/ that are not experiments (the shared harness, and the
# rerank / mix variants that scripts/variants.py measures).
EXPERIMENT_SUPPORT_MODULES = ("harness", "evaluation", "records", "variants")


def experiment_names(folder: str | None = None) -> tuple[str, ...]:
    """The experiments: every module of ``trackstar/experiments/`` but the support modules,
    in natural order (e2 before e10). Listed from the files, so that a new experiment is its
    module (plus its config file) and this config check needs no import of the package."""
    folder = folder or os.path.join(os.path.dirname(os.path.abspath(__file__)), "experiments")
    names = [
        f[: -len(".py")]
        for f in os.listdir(folder)
        if f.endswith(".py")
        and not f.startswith("_")
        and f[: -len(".py")] not in EXPERIMENT_SUPPORT_MODULES
    ]
    return tuple(
        sorted(names, key=lambda n: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", n)])
    )


EXPERIMENTS = experiment_names()  # trackstar.experiments.NAMES
MODEL_MAX_LEN = {"tiny": 48, "small": 64, "base": 128}  # trackstar.model.SIZES: max_len
MODEL_DTYPES = ("float32", "bfloat16")  # trackstar.hf.gpt2._DTYPES
# trackstar.families.project_family_names(): its own family and the lazily loaded HF ones
MODEL_FAMILIES = ("gpt2", "llama", "neox")
# trackstar.hf.gpt2.ACTIVATIONS (Hugging Face activation_function names)
GPT2_ACTIVATIONS = (
    "gelu",
    "gelu_fast",
    "gelu_new",
    "gelu_pytorch_tanh",
    "quick_gelu",
    "relu",
    "silu",
    "swish",
)
OPTIMIZERS = ("adamw", "adafactor")  # trackstar.train.OPTIMIZERS
QUERY_OUTPUT_FNS = ("loss", "margin", "logit")  # trackstar.losses.OUTPUT_FNS
PROJECTION_MODES = ("global", "per_tensor", "dense")  # trackstar.projection.MODES
STORE_DTYPES = ("float32", "bfloat16")
TAILPATCH_SCALES = ("batch_share", "single")  # trackstar.tailpatch.SCALES
MESH_RULES = ("tensor", "fsdp", "replicated")  # trackstar.sharding.RULE_PRESETS
CORRECTION_SOURCES = ("optimizer", "estimate", "none")  # trackstar.stages.CORRECTION_SOURCES


@dataclasses.dataclass(frozen=True)
class Rule:
    """What one field must hold: ``ok(value)``, described as ``expects`` ("an int >= 1").

    ``when(cfg)``, if given, says whether the rule applies (e.g. only for a LAMA world).
    """

    expects: str
    ok: Callable[[Any], bool]
    when: Callable[[ml_collections.ConfigDict], bool] | None = None


def _bounds(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f" in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f" {'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f" {'<' if hi_open else '<='} {hi}"
    return ""


def _in_bounds(v: float, lo, hi, lo_open: bool, hi_open: bool) -> bool:
    if lo is not None and (v <= lo if lo_open else v < lo):
        return False
    return not (hi is not None and (v >= hi if hi_open else v > hi))


def Int(lo: int | None = None, hi: int | None = None, when=None) -> Rule:
    """An int (not a bool) in ``[lo, hi]``."""
    return Rule(
        f"an int{_bounds(lo, hi, False, False)}",
        lambda v: _is_int(v) and _in_bounds(v, lo, hi, False, False),
        when,
    )


def Num(lo=None, hi=None, lo_open: bool = False, hi_open: bool = False, when=None) -> Rule:
    """A finite int or float within the bounds (open or closed)."""
    return Rule(
        f"a number{_bounds(lo, hi, lo_open, hi_open)}",
        lambda v: _is_number(v) and math.isfinite(v) and _in_bounds(v, lo, hi, lo_open, hi_open),
        when,
    )


def Bool() -> Rule:
    """True or False."""
    return Rule("True or False", lambda v: isinstance(v, bool))


def OneOf(*choices: str, when=None) -> Rule:
    """One of the given strings."""
    return Rule(f"one of {', '.join(map(repr, choices))}", lambda v: v in choices, when)


def Text(nonempty: bool = False, pattern: str | None = None, expects: str = "") -> Rule:
    """A string (non-empty, or matching ``pattern`` in full, when asked)."""

    def ok(v: Any) -> bool:
        if not isinstance(v, str) or (nonempty and not v):
            return False
        return pattern is None or v == "" or re.fullmatch(pattern, v) is not None

    return Rule(expects or ("a non-empty string" if nonempty else "a string"), ok)


def Seq(
    item: Rule,
    items: str,
    min_len: int = 0,
    length: int | None = None,
    distinct: bool = False,
    when=None,
) -> Rule:
    """A tuple (or list) whose every element passes ``item``; ``items`` describes them."""

    def ok(v: Any) -> bool:
        if not isinstance(v, tuple | list) or len(v) < min_len:
            return False
        if length is not None and len(v) != length:
            return False
        if distinct and len(set(v)) != len(v):
            return False
        return all(item.ok(x) for x in v)

    if length is not None:
        head = f"a tuple of {length}"
    else:
        head = "a non-empty tuple of" if min_len else "a tuple of"
    return Rule(f"{head} {'distinct ' if distinct else ''}{items}", ok, when)


def _lambda_mix_ok(v: Any) -> bool:
    if isinstance(v, str):
        if v.strip() in ("auto", "auto_trace"):
            return True
        try:
            v = float(v)
        except ValueError:
            return False
    return _is_number(v) and math.isfinite(v) and 0.0 <= v <= 1.0


def _world_built(cfg: ml_collections.ConfigDict) -> bool:
    return os.path.isfile(os.path.join(str(cfg.get("run_dir", "")), "world", "manifest.json"))


def _uses(field: str) -> Callable[[ml_collections.ConfigDict], bool]:
    """Applies when the world source reads ``world.<field>``."""

    def when(cfg: ml_collections.ConfigDict) -> bool:
        w = cfg.get("world")
        if w is None or w.get("source") not in world_lib.SOURCES:
            return True
        return field not in world_lib.unused_fields(w)

    return when


def _file_needed(field: str) -> Callable[[ml_collections.ConfigDict], bool]:
    """Applies when the world is still to be built and its source reads ``world.<field>``.

    A built world is saved in the run directory, so its input files may have moved since.
    """
    uses = _uses(field)
    return lambda cfg: uses(cfg) and bool(cfg.world.get(field)) and not _world_built(cfg)


def _lama(cfg: ml_collections.ConfigDict) -> bool:
    return cfg.world.get("source") == "lama" and not _world_built(cfg)


_FILE = Rule(
    "an existing file (world.source = 'lama' reads it)",
    lambda v: isinstance(v, str) and os.path.isfile(v),
)
# LAMA and ParaRel publish one jsonl file per relation: a directory of them reads them all.
_FILE_OR_DIR = Rule(
    "an existing file or directory of jsonl files (world.source = 'lama' reads it)",
    lambda v: isinstance(v, str) and (os.path.isfile(v) or os.path.isdir(v)),
)
_POS = Int(1)
_FOLDER_NAME = re.compile(r"[A-Za-z0-9_.-]*")
_NONNEG = Int(0)
_PROB = Num(0.0, 1.0)

# Field -> rule. A field missing from a config is skipped; a field missing here is not checked.
RULES: dict[str, Rule] = {
    "seed": _NONNEG,
    "run_dir": Text(nonempty=True),
    # world
    "world.seed": _NONNEG,
    "world.source": OneOf(*world_lib.SOURCES),
    "world.lama_facts_path": Rule(_FILE_OR_DIR.expects, _FILE_OR_DIR.ok, _lama),
    "world.lama_templates_path": Rule(_FILE_OR_DIR.expects, _FILE_OR_DIR.ok, _lama),
    "world.lama_query_patterns": Seq(
        _NONNEG, "pattern indices >= 0", distinct=True, when=_uses("lama_query_patterns")
    ),
    "world.trex_candidates_path": Rule(
        "an existing file (or '' for the built candidates)",
        _FILE.ok,
        _file_needed("trex_candidates_path"),
    ),
    "world.n_subjects": Int(1, when=_uses("n_subjects")),
    "world.n_relations": Int(1, world_lib.MAX_RELATIONS, when=_uses("n_relations")),
    "world.n_objects_per_type": Int(1, when=_uses("n_objects_per_type")),
    "world.freq_buckets": Seq(_POS, "ints >= 1", min_len=1, distinct=True),
    "world.anchor_frac": Num(0.0, 1.0, hi_open=True),
    "world.anchor_query_form_p": _PROB,
    "world.zipf_exponent": Num(0.0, when=_uses("zipf_exponent")),
    "world.n_prefixes": Int(1, world_lib.MAX_PREFIXES),
    "world.n_templates": Int(0, world_lib.MAX_TEMPLATES, when=_uses("n_templates")),
    "world.doc_sentences": Rule(
        "(min, max) with 1 <= min <= max",
        lambda v: Seq(_POS, "", length=2).ok(v) and v[0] <= v[1],
    ),
    "world.filler_p": _PROB,
    "world.distractor_p": _PROB,
    "world.n_distractor_candidates": Int(0, when=_uses("n_distractor_candidates")),
    "world.rare_token_candidates": Int(0, when=_uses("rare_token_candidates")),
    "world.n_queries": _POS,
    "world.n_heldout_queries": _NONNEG,
    # tokenizer
    "tokenizer.kind": OneOf("word"),
    "tokenizer.vocab_size": Rule(
        "0 (all the world's words plus the special tokens) or an int >= 5",
        lambda v: _is_int(v) and (v == 0 or v >= 5),
    ),
    # model (a size field of 0 takes the named size's value)
    "model.family": Rule(
        f"a model family: one of {MODEL_FAMILIES} or a registered one (trackstar.families)",
        # The retired name passes here to get its own message (_check_retired_family).
        lambda v: _known_family(v) or v == "transformer",
    ),
    "model.size": OneOf(*MODEL_MAX_LEN),
    "model.d_model": _NONNEG,
    "model.n_layers": _NONNEG,
    "model.n_heads": _NONNEG,
    "model.d_ff": _NONNEG,
    "model.max_len": _NONNEG,
    "model.dtype": OneOf(*MODEL_DTYPES),
    # GPT-2 options (trackstar.hf.gpt2: the activation names are its ACTIVATIONS)
    "model.tie_word_embeddings": Bool(),
    "model.layer_norm_epsilon": Num(0.0, lo_open=True),
    "model.activation": OneOf(*GPT2_ACTIVATIONS),
    # train
    "train.optimizer": OneOf(*OPTIMIZERS),
    "train.steps": _POS,
    "train.batch_size": _POS,
    "train.seq_len": Int(2),
    "train.lr": Num(0.0, lo_open=True),
    "train.final_lr": Num(0.0),
    "train.warmup_steps": _NONNEG,
    "train.b1": Num(0.0, 1.0, hi_open=True),
    "train.b2": Num(0.0, 1.0, hi_open=True),
    "train.eps": Num(0.0),
    "train.weight_decay": Num(0.0),
    "train.adafactor_eps": Num(0.0, lo_open=True),
    "train.checkpoint_every": _POS,
    "train.keep_checkpoints": _POS,
    "train.log_every": _POS,
    "train.checkpoint_step": _NONNEG,
    # featurize
    "featurize.query_output_fn": OneOf(*QUERY_OUTPUT_FNS),
    "featurize.projection_mode": OneOf(*PROJECTION_MODES),
    "featurize.k_in": _POS,
    "featurize.k_out": _POS,
    "featurize.dense_dim": _POS,
    "featurize.projection_seed": _NONNEG,
    "featurize.eps": Num(),  # < 0 means the optimizer's.
    "featurize.batch_size": _POS,
    "featurize.chunk_size": _POS,
    "featurize.dtype": OneOf(*STORE_DTYPES),
    "featurize.skip_bad_examples": Bool(),
    "featurize.v_floor": Num(0.0),  # 0 disables the V floor.
    "featurize.drop_unmoved": Bool(),  # Factor 0 where the second moment is exactly 0.
    # Where V comes from (trackstar.stages.CORRECTION_SOURCES).
    "featurize.correction_source": OneOf(*CORRECTION_SOURCES),
    "featurize.v_estimate_examples": Rule("an int >= 0 (0 = all)", Int(0).ok),
    "featurize.v_estimate_seed": _NONNEG,
    "featurize.v_estimate_batch": _POS,
    "featurize.max_unk_frac": Num(0.0, 1.0),
    "featurize.unk_error": Bool(),
    # hessian
    "hessian.lambda_mix": Rule("a number in [0, 1], 'auto' or 'auto_trace'", _lambda_mix_ok),
    "hessian.crossing_per_65536": Num(0.0),
    "hessian.damping": Num(0.0),
    "hessian.train_sample": Rule("an int >= 0 (0 = all rows)", Int(0).ok),
    "hessian.eval_source": OneOf("task", "heldout"),
    "hessian.sample_seed": _NONNEG,
    # trackstar.hessian.LOW_RANK_MODES: R as Q diag(s) Qᵀ + δI when n_t + n_e < d ("auto").
    "hessian.low_rank": OneOf("auto", "never", "always"),
    # queries of trackstar attribute (trackstar.checkpoint_run.QUERY_FORMATS)
    "queries.format": OneOf("auto", "prompt_target", "release"),
    "queries.prompt_index": Int(0, 2),  # prompt0 .. prompt2 of a release query file
    # score
    "score.preset": OneOf(*SCORE_PRESETS),
    "score.top_k": _POS,
    "score.chunk_rows": _POS,
    "score.opponents": Bool(),
    # viewer
    "viewer.write": Bool(),
    "viewer.top_k": _POS,
    "viewer.methods": Seq(OneOf(*METHODS), f"methods from {', '.join(METHODS)}"),
    "viewer.breakdown_preset": OneOf(*SCORE_PRESETS),
    "viewer.breakdown_queries": _NONNEG,
    # eval
    "eval.mrr_k": _POS,
    "eval.at_k": _POS,
    "eval.bm25_stopwords": OneOf("english", "none"),
    "eval.random_seed": _NONNEG,
    # tailpatch
    "tailpatch.scale": OneOf(*TAILPATCH_SCALES),
    "tailpatch.lr": Num(),  # < 0 means the final learning rate of training.
    "tailpatch.lr_multipliers": Seq(Num(0.0, lo_open=True), "numbers > 0", min_len=1),
    "tailpatch.ks": Seq(_POS, "ints >= 1", min_len=1),
    "tailpatch.n_queries": Rule("an int >= 0 (0 = all)", Int(0).ok),
    "tailpatch.carry_momentum": Bool(),
    "tailpatch.pair_batch": _POS,
    # experiment
    "experiment.name": OneOf(*EXPERIMENTS),
    "experiment.output_name": Rule(
        "a folder name (letters, digits, '_', '-', '.'), or '' for the runner's name",
        lambda v: (
            isinstance(v, str) and _FOLDER_NAME.fullmatch(v) is not None and v not in (".", "..")
        ),
    ),
    "experiment.methods": Seq(OneOf(*METHODS), f"methods from {', '.join(METHODS)}"),
    "experiment.tailpatch_methods": Seq(OneOf(*METHODS), f"methods from {', '.join(METHODS)}"),
    "experiment.k_values": Seq(_POS, "ints >= 1", min_len=1),
    "experiment.e3_full_dims_k": Seq(_POS, "ints >= 1", distinct=True),
    "experiment.e4_dims_k": Seq(_POS, "ints >= 1", distinct=True),
    "experiment.paired": Rule(
        f"(a, b) pairs of methods from {', '.join(METHODS)}",
        lambda v: (
            isinstance(v, (tuple, list))
            and all(
                isinstance(p, (tuple, list)) and len(p) == 2 and all(m in METHODS for m in p)
                for p in v
            )
        ),
    ),
    "experiment.output_fns": Seq(OneOf(*QUERY_OUTPUT_FNS), "loss, margin or logit"),
    "experiment.store_tag": Text(pattern=r"[A-Za-z0-9_.]+", expects="letters, digits, _ or ."),
    "experiment.lds_subsets": Int(2),  # Spearman over K subsets needs at least two.
    "experiment.lds_fraction": Num(0.0, 1.0, lo_open=True, hi_open=True),
    "experiment.lds_seed": _NONNEG,
    # mesh
    "mesh.data": Rule("-1 (all devices) or an int >= 1", lambda v: v == -1 or _POS.ok(v)),
    "mesh.model": _POS,
    "mesh.rules": OneOf(*MESH_RULES),
    "mesh.rule_overrides": Seq(Text(pattern=r".+=.*"), "'regex=spec' strings"),
    "mesh.featurize_scope": OneOf("local", "global"),
    "mesh.distributed": OneOf("auto", "on", "off"),
    "mesh.coordinator": Text(pattern=r"[^:\s]+:\d+", expects="'' or 'host:port'"),
    "mesh.num_processes": _NONNEG,
    "mesh.process_id": Rule("-1 (auto-detect) or an int >= 0", lambda v: _is_int(v) and v >= -1),
    "mesh.cpu_collectives": Text(),
    "mesh.memory_vocab_size": _POS,
    # logging (trackstar.runlog)
    "logging.tensorboard": Bool(),
}


def _has(cfg: ml_collections.ConfigDict, *keys: str) -> bool:
    try:
        for key in keys:
            get_field(cfg, key)
    except ConfigError:
        return False
    return True


def _check_warmup(cfg) -> str | None:
    if not _has(cfg, "train.warmup_steps", "train.steps"):
        return None
    w, s = cfg.train.warmup_steps, cfg.train.steps
    if _is_int(w) and _is_int(s) and w >= s:
        return f"train.warmup_steps = {w} must be < train.steps = {s}"
    return None


def _check_checkpoint_step(cfg) -> str | None:
    if not _has(cfg, "train.checkpoint_step", "train.steps"):
        return None
    n, s = cfg.train.checkpoint_step, cfg.train.steps
    if _is_int(n) and _is_int(s) and n > s:
        return (
            f"train.checkpoint_step = {n} is past train.steps = {s}; "
            "use a step in 1..train.steps, or 0 for the last"
        )
    return None


def _known_family(v: Any) -> bool:
    """A family of the project's, or one registered at run time (trackstar.families, if loaded)."""
    registered = getattr(sys.modules.get("trackstar.families"), "MODEL_FAMILIES", {})
    return isinstance(v, str) and (v in MODEL_FAMILIES or v in registered)


def _other_family(cfg) -> bool:
    """Whether ``cfg`` names a model family without the named sizes (only gpt2 has them)."""
    return _has(cfg, "model.family") and cfg.model.family not in ("", "gpt2")


def _check_retired_family(cfg) -> str | None:
    if _has(cfg, "model.family") and cfg.model.family == "transformer":
        return (
            "model.family = 'transformer' is gone: the demo model is now a configuration of the "
            "GPT-2 family; set model.family = 'gpt2' and model.tie_word_embeddings = False "
            "(configs/demo.py) and retrain"
        )
    return None


def _check_context(cfg) -> str | None:
    if _other_family(cfg) or not _has(cfg, "train.seq_len", "model.max_len", "model.size"):
        return None
    max_len = cfg.model.max_len or MODEL_MAX_LEN.get(cfg.model.size)
    if _is_int(max_len) and _is_int(cfg.train.seq_len) and cfg.train.seq_len > max_len:
        return (
            f"train.seq_len = {cfg.train.seq_len} exceeds the model's context model.max_len = "
            f"{max_len}; lower train.seq_len or raise model.max_len"
        )
    return None


def _check_heads(cfg) -> str | None:
    if _other_family(cfg) or not _has(cfg, "model.d_model", "model.n_heads"):
        return None
    d, h = cfg.model.d_model, cfg.model.n_heads
    if _is_int(d) and _is_int(h) and d > 0 and h > 0 and d % h:
        return f"model.d_model = {d} is not divisible by model.n_heads = {h}"
    return None


def _check_heldout(cfg) -> str | None:
    if not _has(cfg, "hessian.eval_source", "world.n_heldout_queries"):
        return None
    if cfg.hessian.eval_source == "heldout" and cfg.world.n_heldout_queries == 0:
        return (
            "hessian.eval_source = 'heldout' needs world.n_heldout_queries >= 1; raise it or "
            "set hessian.eval_source = 'task'"
        )
    return None


def _check_default_step(cfg) -> str | None:
    if not _has(cfg, "tailpatch.lr_multipliers"):
        return None
    mults = cfg.tailpatch.lr_multipliers
    if isinstance(mults, tuple | list) and all(map(_is_number, mults)) and 1.0 not in mults:
        return f"tailpatch.lr_multipliers = {tuple(mults)} must include 1.0 (the default step)"
    return None


def _check_k_values(cfg) -> str | None:
    if not _has(cfg, "experiment.k_values", "featurize.k_in", "featurize.k_out"):
        return None
    f = cfg.featurize
    if not (_is_int(f.k_in) and _is_int(f.k_out)):
        return None
    top = min(f.k_in, f.k_out)
    big = [k for k in cfg.experiment.k_values if _is_int(k) and k > top]
    if big:
        return (
            f"experiment.k_values {big} exceed min(featurize.k_in, featurize.k_out) = {top}; "
            "E3's sub-grids are cut from the stored k_in x k_out grid"
        )
    return None


def _check_e3_full_dims_k(cfg) -> str | None:
    # Only E3 reads the field; a config with a wider grid (large.py) keeps demo's default.
    keys = ("experiment.name", "experiment.e3_full_dims_k", "featurize.k_in", "featurize.k_out")
    if not _has(cfg, *keys) or cfg.experiment.name != "e3":
        return None
    f = cfg.featurize
    if not (_is_int(f.k_in) and _is_int(f.k_out)):
        return None
    top = min(f.k_in, f.k_out)
    small = [k for k in cfg.experiment.e3_full_dims_k if _is_int(k) and k <= top]
    if small:
        return (
            f"experiment.e3_full_dims_k {small} must exceed min(featurize.k_in, featurize.k_out) "
            f"= {top}; sides up to it are sub-grids of the stored grid (experiment.k_values)"
        )
    return None


# Relations between fields (each returns a message, or None when it holds).
CROSS_CHECKS: tuple[Callable[[ml_collections.ConfigDict], str | None], ...] = (
    _check_warmup,
    _check_checkpoint_step,
    _check_retired_family,
    _check_context,
    _check_heads,
    _check_heldout,
    _check_default_step,
    _check_k_values,
    _check_e3_full_dims_k,
)


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Checks every field of ``RULES`` present in ``cfg``, then ``CROSS_CHECKS``.

    Raises one ``ConfigError`` listing every problem ("field must be X, got Y"), so a command
    fails before any work instead of after training. Fields absent from ``RULES`` pass.
    """
    problems = []
    for key, rule in RULES.items():
        try:
            value = get_field(cfg, key)
        except ConfigError:
            continue
        if rule.when is not None and not rule.when(cfg):
            continue
        if not rule.ok(value):
            problems.append(f"{key} must be {rule.expects}, got {value!r}")
    if not problems:  # Relations assume each field is well typed.
        problems += [p for p in (check(cfg) for check in CROSS_CHECKS) if p]
    if problems:
        raise ConfigError("; ".join(problems))


# ----- the config a run directory remembers ---------------------------------------------------

# Sections that define what a run directory holds: its world, tokenizer and trained model.
BUILT_SECTIONS = ("seed", "world", "tokenizer", "model", "train")
# Train fields that do not change the trajectory (trackstar.train's bookkeeping fields).
BOOKKEEPING_FIELDS = ("train.checkpoint_every", "train.keep_checkpoints", "train.log_every")


def _flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _is_built_field(key: str) -> bool:
    return key.split(".")[0] in BUILT_SECTIONS and key not in BOOKKEEPING_FIELDS


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path} ({e}); restore it from a backup") from None


def built_config(run_dir: str) -> dict[str, Any] | None:
    """The settings a run directory was built with, as ``{dotted field: value}``.

    None when the run directory holds no world yet (nothing is built). The world section is
    the one recorded in ``world/manifest.json`` (written once, with the world); the other
    built sections come from ``config.json``. World fields the world source ignored are absent.
    """
    manifest = os.path.join(run_dir, "world", "manifest.json")
    if not os.path.isfile(manifest):
        return None
    saved: dict[str, Any] = {}
    cfg_file = os.path.join(run_dir, "config.json")
    if os.path.isfile(cfg_file):
        d = _read_json(cfg_file)
        for section in BUILT_SECTIONS:
            if section in d:
                flat = _flatten({section: d[section]})
                saved.update({k: v for k, v in flat.items() if not k.startswith("world.")})
    world_cfg = _read_json(manifest).get("config")
    if isinstance(world_cfg, dict) and world_cfg:
        unused = set(world_lib.unused_fields(world_cfg)) if "source" in world_cfg else set()
        saved.update({f"world.{k}": v for k, v in world_cfg.items() if k not in unused})
    elif os.path.isfile(cfg_file):
        world_section = _read_json(cfg_file).get("world", {})
        saved.update(_flatten({"world": world_section}))
    order = {s: i for i, s in enumerate(BUILT_SECTIONS)}
    keys = sorted(saved, key=lambda k: (order[k.split(".")[0]], k))
    return {k: saved[k] for k in keys if _is_built_field(k)}


def _normal(v: Any) -> Any:
    return json.loads(json.dumps(v, default=str))


def _same(a: Any, b: Any) -> bool:
    return _normal(a) == _normal(b)


def _as_field_type(saved: Any, current: Any) -> Any:
    """A value read from JSON as the current field's type (lists -> tuples, ints -> floats)."""
    if isinstance(current, tuple) and isinstance(saved, list):
        return tuple(saved)
    if isinstance(current, float) and _is_int(saved):
        return float(saved)
    return saved


def resolve_for_run_dir(
    cfg: ml_collections.ConfigDict, overrides: Sequence[tuple[str, str]] = ()
) -> tuple[ml_collections.ConfigDict, list[str]]:
    """``cfg`` with the built settings of its run directory, and the fields that changed.

    ``cfg`` is the config file's config with the command-line ``overrides`` already applied.
    When ``cfg.run_dir`` holds a world, every field of ``BUILT_SECTIONS`` it recorded replaces
    the config file's (bookkeeping train fields excepted); an override of such a field must
    equal the recorded value, and an override of a world field the run's source ignored is
    refused. On a fresh run directory ``cfg`` is returned unchanged.
    """
    saved = built_config(str(cfg.run_dir))
    if saved is None:
        return cfg, []
    out = copy.deepcopy(cfg)
    overridden = dict(overrides)
    run = str(cfg.run_dir)
    for key in overridden:
        if _is_built_field(key) and key not in saved:
            raise ConfigError(
                f"--config.{key} cannot apply to {run}: the run was built without recording it "
                "(a world field its world source ignores, or a field newer than the run); drop "
                "the override, or pass a new --config.run_dir"
            )
    replaced = []
    for key, value in saved.items():
        try:
            node, name = _node_and_name(out, key)
        except ConfigError:
            continue  # A field this version no longer has.
        current = node[name]
        if key in overridden:
            if not _same(value, current):
                raise ConfigError(
                    f"--config.{key}={overridden[key]} contradicts {run}, built with "
                    f"{key} = {value!r}; drop the override, or pass a new --config.run_dir "
                    "to build another run"
                )
            continue
        if _same(value, current):
            continue
        try:
            _assign(node, name, key, _as_field_type(value, current))
        except ConfigError:
            raise ConfigError(
                f"{run}/config.json has {key} = {value!r}, which does not fit this version's "
                f"field ({type(current).__name__}); use a new --config.run_dir"
            ) from None
        replaced.append(key)
    return out, replaced


def run_dir_conflicts(cfg: ml_collections.ConfigDict) -> list[str]:
    """``["field: built with X, config has Y", ...]`` for each built setting ``cfg`` changes.

    Empty when ``cfg.run_dir`` holds no world, or ``cfg`` agrees with everything it built.
    """
    saved = built_config(str(cfg.run_dir))
    if not saved:
        return []
    out = []
    for key, value in saved.items():
        try:
            current = get_field(cfg, key)
        except ConfigError:
            continue
        if not _same(value, current):
            out.append(f"{key}: built with {value!r}, config has {current!r}")
    return out
