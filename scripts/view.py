"""Writes the static HTML viewer of a run's proponents and prints its path.

    python scripts/view.py runs/demo
    python scripts/view.py runs/demo --release other_tool=results.jsonl.gz

The `trackstar view` command (trackstar/cli.py); same flags.
"""

from _cli import run_command

if __name__ == "__main__":
    run_command("view")
