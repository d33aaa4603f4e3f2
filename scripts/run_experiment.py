"""The main job, end to end: world -> train -> featurize -> R -> score -> proponents, then
the E1 table (every scoring preset + bm25 + random: MRR, Recall@10, tail-patch with its lr sweep).

    python scripts/run_experiment.py --config configs/demo.py

Every stage resumes: rerunning after an interruption continues where it stopped. The E1 table
is printed and saved to <run_dir>/results/summary.md and <run_dir>/experiments/e1/.

The `trackstar run` command (trackstar/cli.py); same flags.
"""

from _cli import run_command

if __name__ == "__main__":
    run_command("run")
