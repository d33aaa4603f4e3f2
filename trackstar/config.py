"""Config files and command-line overrides.

Configs are Python files in ``configs/`` with a ``get_config()`` returning an
``ml_collections.ConfigDict`` (nanodo / big_vision style). Overrides use the
``--config.a.b=value`` syntax of ``ml_collections.config_flags``; this module adds the checks
researchers need before any work starts: an unknown field is an error naming it and the closest
valid names, and a value is coerced to the field's type.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
from collections.abc import Sequence
from typing import Any

import ml_collections

from trackstar.files import write_json


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says how to fix it."""


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


def _parse_value(text: str, current: Any) -> Any:
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if isinstance(current, bool):
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise ConfigError(f"expected a bool (True/False), got {text!r}")
    elif isinstance(current, int) and isinstance(value, float) and value.is_integer():
        return int(value)
    elif isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    elif isinstance(current, str):
        # String fields keep the raw text: mixed fields such as lambda_mix ("auto" or "0.9")
        # are parsed and validated by the stage that reads them.
        return text
    elif isinstance(current, tuple) and isinstance(value, list):
        return tuple(value)
    return value


def set_override(cfg: ml_collections.ConfigDict, key: str, text: str) -> None:
    """Sets ``cfg.<key>`` from the string ``text``; unknown keys raise ``ConfigError``."""
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
    current = node[parts[-1]]
    if isinstance(current, ml_collections.ConfigDict):
        raise ConfigError(f"{key!r} is a section; set one of its fields instead")
    value = _parse_value(text, current)
    with node.unlocked():
        node[parts[-1]] = value


def parse_args(argv: Sequence[str], default_config: str | None = None):
    """Parses ``--config PATH`` and ``--config.a.b=value`` arguments.

    Returns ``(config, rest)`` where ``rest`` are the arguments this function did not consume.
    """
    path = default_config
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
    if path is None:
        raise ConfigError("no config given; pass --config configs/demo.py (or another file)")
    cfg = load_config_file(path)
    for k, v in overrides:
        set_override(cfg, k, v)
    return cfg, rest


def save_config(cfg: ml_collections.ConfigDict, path: str) -> None:
    """Writes the resolved config as JSON beside the results it produced."""
    write_json(path, cfg.to_dict(), sort_keys=True, default=str)
