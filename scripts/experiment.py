"""Runs one experiment (E1-E7, docs/method.md) over a run directory and prints its table.

    python scripts/experiment.py --config configs/e1.py
    python scripts/experiment.py --config configs/e3.py:tiny --config.run_dir=runs/tiny

The run directory is trained first when it has no final checkpoint; stores, Hessian fits,
rankings and tail-patch deltas already there are reused. Results land in
<run_dir>/experiments/<name>/: results.json, table.md, PNG plots and config.json (the
resolved config of this command). On an existing run directory, the world, tokenizer, model
and training settings are the run's own (its config.json), whatever the config file says.
"""

import time

from _cli import parse, save_resolved

from trackstar import experiments, report, stages


def main():
    cfg, _ = parse(__doc__, default_config="configs/e1.py")
    t0 = time.perf_counter()
    stages.stage_world(cfg)
    acc = stages.stage_train(cfg)
    print(report.accuracy_table(acc) + "\n")
    results = experiments.run(cfg)
    print(results["markdown"])
    out = experiments.output_dir(cfg)
    save_resolved(cfg, out)  # The settings these results came from, beside them.
    print(f"\n{cfg.experiment.name} done in {time.perf_counter() - t0:.0f} s; results in {out}")


if __name__ == "__main__":
    main()
