"""Shared command-line handling for the stage scripts: config + overrides, then extra flags."""

from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trackstar.config import ConfigError, parse_args  # noqa: E402


def parse(description: str, add_arguments=None, default_config: str = "configs/demo.py"):
    """Returns ``(config, args)``; config errors exit with the message, not a traceback."""
    parser = argparse.ArgumentParser(
        description=description,
        epilog="Config: --config PATH and any --config.section.field=VALUE override.",
    )
    if add_arguments:
        add_arguments(parser)
    try:
        cfg, rest = parse_args(sys.argv[1:], default_config=default_config)
    except ConfigError as e:
        parser.exit(2, f"config error: {e}\n")
    args = parser.parse_args(rest)
    # Third-party chatter (index building, read-only checkpoint notices) is not results.
    for name in ("bm25s", "absl"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return cfg, args
