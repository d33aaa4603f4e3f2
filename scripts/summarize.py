"""Collects every experiment's table into one Markdown file (and optionally its plots).

    python scripts/summarize.py runs/demo --out docs/results/summary.md --copy docs/results

Reads <run_dir>/experiments/<name>/table.md (+ results.json for the timing) of each run dir,
in experiment order; with --copy, each experiment's table.md and PNG plots are copied to
<copy>/<name>/ so they can be committed beside the summary.
"""

import argparse
import glob
import json
import os
import shutil
import sys


def collect(run_dirs: list[str]) -> list[tuple[str, str]]:
    """``(experiment dir, name)`` pairs, sorted by name then run dir."""
    found = []
    for run_dir in run_dirs:
        for table in glob.glob(os.path.join(run_dir, "experiments", "*", "table.md")):
            exp_dir = os.path.dirname(table)
            found.append((exp_dir, os.path.basename(exp_dir)))
    return sorted(found, key=lambda x: (x[1], x[0]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", help="run directories holding experiments/")
    parser.add_argument("--out", default="", help="write the summary here (default: print)")
    parser.add_argument("--copy", default="", help="copy each table.md and PNG to COPY/<name>/")
    args = parser.parse_args()
    found = collect(args.run_dirs)
    if not found:
        sys.exit(f"no experiments/*/table.md under {args.run_dirs}; run scripts/experiment.py")
    parts = ["# Experiment results\n"]
    for exp_dir, name in found:
        with open(os.path.join(exp_dir, "table.md")) as f:
            table = f.read().strip()
        wall = ""
        res_file = os.path.join(exp_dir, "results.json")
        if os.path.exists(res_file):
            with open(res_file) as f:
                w = json.load(f).get("wall_s")
            wall = f" ({w:.0f} s)" if isinstance(w, int | float) else ""
        pngs = sorted(glob.glob(os.path.join(exp_dir, "*.png")))
        parts.append(f"<!-- {exp_dir}{wall} -->\n{table}\n")
        if args.copy:
            dest = os.path.join(args.copy, name)
            os.makedirs(dest, exist_ok=True)
            for f in [os.path.join(exp_dir, "table.md"), *pngs]:
                shutil.copy2(f, dest)
            parts.extend(
                f"![{name} {os.path.basename(p)}]({name}/{os.path.basename(p)})\n" for p in pngs
            )
    text = "\n".join(parts)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
        print(f"wrote {args.out} ({len(found)} experiments)")
    else:
        print(text)


if __name__ == "__main__":
    main()
