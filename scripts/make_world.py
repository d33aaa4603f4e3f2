"""Stage 1: generate (or load) the fact world and train the tokenizer into the run directory.

The `trackstar world` command (trackstar/cli.py); same flags.
"""

from _cli import run_command

if __name__ == "__main__":
    run_command("world")
