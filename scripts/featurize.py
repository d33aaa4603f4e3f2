"""Stage 3: per-example gradients -> V correction -> projection -> store (resumable).

The `trackstar featurize` command (trackstar/cli.py); same flags.
"""

from _cli import run_command

if __name__ == "__main__":
    run_command("featurize")
