"""Stage 2: train the LM with Orbax checkpoints (resumes), then report greedy fact accuracy.

The `trackstar train` command (trackstar/cli.py); same flags.
"""

from _cli import run_command

if __name__ == "__main__":
    run_command("train")
