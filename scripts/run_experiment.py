"""The main job, end to end: world -> train -> featurize -> R -> score -> proponents + metrics.

    python scripts/run_experiment.py --config configs/demo.py

Every stage resumes: rerunning after an interruption continues where it stopped.
"""

import json
import time

from _cli import parse

from trackstar import metrics, report, stages
from trackstar.baselines import random_rank


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
    gt = [set(q.candidate_ids) for q in w.task_queries]
    rnd = random_rank(len(gt), len(w.candidates), cfg.score.top_k, cfg.seed)
    table = report.markdown_table(
        ["method", "MRR", "Recall@10"],
        [
            ("trackstar", metrics.mrr(res["ids"], gt), metrics.recall_at(res["ids"], gt, 10)),
            ("random", metrics.mrr(rnd, gt), metrics.recall_at(rnd, gt, 10)),
        ],
    )
    print("\n" + table)
    report.save_text(table, stages.path(cfg, "results", "summary.md"))
    print(f"\ndone in {time.perf_counter() - t0:.0f} s; results in {stages.path(cfg, 'results')}")


if __name__ == "__main__":
    main()
