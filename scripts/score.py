"""Stage 5: stream the candidate store, score the task queries, write top-k proponents.

The `trackstar score` command (trackstar/cli.py); same flags.
"""

from _cli import run_command

if __name__ == "__main__":
    run_command("score")
