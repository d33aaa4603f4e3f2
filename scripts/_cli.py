"""Shared command-line handling for the stage scripts: config + overrides, then extra flags.

The config is the config file with the ``--config.a.b=value`` overrides on top; on a run
directory that already holds a world, the settings it was built with (seed, world, tokenizer,
model, train) come from its saved config instead (``trackstar.config.resolve_for_run_dir``).
Everything is validated before any work. Errors of the library (config, world, stage, store
... errors, whose messages say how to fix them) print as one line, without a traceback; set
``TRACKSTAR_TRACEBACK=1`` to see it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trackstar.config import ConfigError, load_command, save_config  # noqa: E402
from trackstar.world import unused_fields  # noqa: E402


def _one_line_errors() -> None:
    """Library errors (classes defined in ``trackstar``) print one line and exit with 1."""
    default = sys.excepthook

    def hook(etype, value, tb):
        mine = getattr(etype, "__module__", "").startswith("trackstar")
        if not mine or os.environ.get("TRACKSTAR_TRACEBACK"):
            default(etype, value, tb)
            return
        text = " ".join(str(value).split())  # One line, whatever the message holds.
        sys.stderr.write(f"error ({etype.__name__}): {text}\n")

    sys.excepthook = hook


def parse(description: str, add_arguments=None, default_config: str = "configs/demo.py"):
    """Returns ``(config, args)``; config errors exit with code 2 and one line, no traceback."""
    parser = argparse.ArgumentParser(
        description=description,
        epilog="Config: --config PATH and any --config.section.field=VALUE override.",
    )
    if add_arguments:
        add_arguments(parser)
    _one_line_errors()
    try:
        cmd = load_command(sys.argv[1:], default_config=default_config)
    except ConfigError as e:
        parser.exit(2, f"config error: {' '.join(str(e).split())}\n")
    if cmd.from_run_dir:
        shown = ", ".join(cmd.from_run_dir[:8])
        more = f" (+{len(cmd.from_run_dir) - 8} more)" if len(cmd.from_run_dir) > 8 else ""
        print(
            f"note: {cmd.config.run_dir} was built with other settings than {cmd.path}; "
            f"using the run's {shown}{more}",
            file=sys.stderr,
        )
    args = parser.parse_args(cmd.rest)
    # Third-party chatter (index building, read-only checkpoint notices) is not results.
    for name in ("bm25s", "absl"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return cmd.config, args


def save_resolved(cfg, directory: str) -> str:
    """Writes the command's resolved config as ``<directory>/config.json`` (after success)."""
    out = os.path.join(directory, "config.json")
    save_config(cfg, out, unused=[f"world.{f}" for f in unused_fields(cfg.world)])
    return out
