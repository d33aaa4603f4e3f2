"""The main job, end to end: world -> train -> featurize -> R -> score -> proponents, then
the E1 table (every scoring preset + bm25 + random: MRR, Recall@10, tail-patch with its lr sweep).

    python scripts/run_experiment.py --config configs/demo.py

Every stage resumes: rerunning after an interruption continues where it stopped. The E1 table
is printed and saved to <run_dir>/results/summary.md and <run_dir>/experiments/e1/.
"""

import json
import time

from _cli import parse, save_resolved

from trackstar import experiments, report, stages


def main():
    cfg, _ = parse(__doc__)
    t0 = time.perf_counter()
    w = stages.stage_world(cfg)
    print(f"[world] {len(w.facts)} facts, {len(w.candidates)} candidates")
    acc = stages.stage_train(cfg)
    print(report.accuracy_table(acc))
    trained = stages.load_trained(cfg)
    for which in ("candidates", "task", "heldout"):
        stages.stage_featurize(cfg, which, corrected=True, trained=trained)
    stages.stage_hessian(cfg)
    res = stages.stage_score(cfg, "trackstar")
    with open(res["path"]) as f:
        rows = [json.loads(line) for line in f]
    print("\nTrackStar proponents (closed set):")
    print(report.proponents_preview(rows))
    with cfg.unlocked():
        cfg.experiment.name = "e1"
    e1 = experiments.run(cfg)  # cfg.experiment.name = "e1"
    print("\n" + e1["markdown"])
    report.save_text(e1["markdown"], stages.path(cfg, "results", "summary.md"))
    save_resolved(cfg, stages.path(cfg, "results"))  # Beside summary.md.
    print(f"\ndone in {time.perf_counter() - t0:.0f} s; results in {stages.path(cfg, 'results')}")


if __name__ == "__main__":
    main()
