"""Shared command-line handling for the scripts: the parser of ``trackstar.cli``.

The stage scripts are the ``trackstar`` console script's commands (``run_command``); scripts
with their own flow call ``parse``: the config file with its ``--config.a.b=value`` overrides,
resolved against its run directory and validated before any work, then the script's flags.
Errors of the library print as one line, without a traceback; set ``TRACKSTAR_TRACEBACK=1``
to see it.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trackstar import cli  # noqa: E402
from trackstar.cli import save_resolved  # noqa: E402, F401  (re-exported for the scripts)


def parse(description: str, add_arguments=None, default_config: str | None = None):
    """Returns ``(config, args)`` of ``sys.argv``; config errors exit with code 2 and one line."""
    cli.install_one_line_errors()
    return cli.parse(description, add_arguments, default_config)


def run_command(name: str) -> None:
    """Runs ``trackstar <name>`` on this script's arguments and exits with its code."""
    prog = os.path.basename(sys.argv[0])
    sys.exit(cli.run_command(name, sys.argv[1:], prog=prog))
