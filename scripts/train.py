"""Stage 2: train the LM with Orbax checkpoints (resumes), then report greedy fact accuracy."""

from _cli import parse

from trackstar import report, stages

if __name__ == "__main__":
    cfg, _ = parse(__doc__)
    acc = stages.stage_train(cfg)
    print(report.accuracy_table(acc))
