"""Runs one experiment (E1-E8, docs/method.md) over a run directory and prints its table.

    python scripts/experiment.py --config configs/e1.py
    python scripts/experiment.py --config configs/e3.py:tiny --config.run_dir=runs/tiny

The run directory is trained first when it has no final checkpoint; stores, Hessian fits,
rankings and tail-patch deltas already there are reused. Results land in
<run_dir>/experiments/<name>/: results.json, table.md, PNG plots and config.json (the
resolved config of this command). On an existing run directory, the world, tokenizer, model
and training settings are the run's own (its config.json), whatever the config file says.

The `trackstar experiment` command (trackstar/cli.py); same flags.
"""

from _cli import run_command

if __name__ == "__main__":
    run_command("experiment")
