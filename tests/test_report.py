"""Report helpers: the experiment tables' cells, rows and order, and that plots write files."""

import os

from trackstar import report

ROW = {
    "mrr": 0.51234,
    "recall@10": 0.9,
    "tailpatch@1": 1.5,
    "tailpatch@1_se": 0.25,
    "tailpatch@3": -0.125,
    "tailpatch@3_se": float("nan"),
    "sweep": [
        {"lr_multiplier": 1.0, "lr": 1e-4, "tailpatch@3": 0.5, "tailpatch@3_se": 0.1},
        {"lr_multiplier": 30.0, "lr": 3e-3, "tailpatch@3": 2.0, "tailpatch@3_se": 0.2},
    ],
}
GT = {"tailpatch@1": 4.0, "tailpatch@1_se": 1.0, "tailpatch@3": 3.0, "tailpatch@3_se": 0.5}


def test_pm_and_metric_cells():
    assert report.pm(None) == report.pm(float("inf")) == "–"
    assert report.pm(1.234, 0.1) == "+1.23 ± 0.10"
    assert report.pm(0.5, None, 3, sign=False) == "0.500"
    assert report.metric_headers(10, 3) == ["MRR", "Recall@10", "tail-patch@3 (pp)"]
    # A NaN standard error is left out; a missing metric is a dash.
    assert report.metric_cells(ROW, 10, 3) == ["0.512", "0.900", "-0.12"]
    assert report.metric_cells(GT, 10, 3) == ["–", "–", "+3.00 ± 0.50"]


def test_main_table_rows_in_order_and_sweeps():
    table = report.main_table({"trackstar": ROW, "ground_truth": GT}, 10, 3)
    lines = table.split("\n")
    assert lines[0] == ("| method | MRR | Recall@10 | tail-patch@1 (pp) | tail-patch@3 (pp) |")
    assert lines[2] == "| trackstar | 0.512 | 0.900 | +1.50 ± 0.25 | -0.12 |"
    assert lines[3] == "| ground_truth | – | – | +4.00 ± 1.00 | +3.00 ± 0.50 |"
    assert list(report.sweeps_of({"a": ROW, "gt": GT})) == ["a"]
    section = report.sweep_section({"a": ROW}, 3)
    assert "| a | +0.50 ± 0.10 | +2.00 ± 0.20 |" in section
    assert "30× lr (3.0e-03)" in section


def test_split_table_and_label_order():
    assert sorted(["10", "2", "all", "1"], key=report.label_order) == ["1", "2", "10", "all"]
    splits = {
        "bm25": {
            "mrr": {"by": {"bucket": {"2": {"mean": 0.25, "se": 0.1}, "10": {"mean": 0.75}}}},
            "tailpatch@3": {"by": {"bucket": {"10": {"mean": 1.0, "se": 0.5}}}},
        }
    }
    lines = report.split_table(splits, "bucket", {"10": 4, "2": 6}, 10, 3).split("\n")
    assert lines[0] == "| method | bucket | queries | MRR | Recall@10 | tail-patch@3 (pp) |"
    assert lines[2:] == [
        "| bm25 | 2 | 6 | 0.250 | – | – |",
        "| bm25 | 10 | 4 | 0.750 | – | +1.00 ± 0.50 |",
    ]


def test_experiment_plots_write_files(tmp_path):
    rows = {"trackstar": ROW}
    files = [
        report.method_bars(rows, {"ground_truth": GT}, 3, "t", str(tmp_path / "m.png")),
        report.sweep_chart(rows, (1.0, 30.0), 3, "t", str(tmp_path / "s.png")),
        report.grouped_bars(
            ["a", "b"],
            report.metric_series({"a": rows, "b": rows}, ["a", "b"], ["trackstar"], "mrr"),
            "x",
            "y",
            "t",
            str(tmp_path / "g.png"),
        ),
    ]
    assert report.sweep_chart({"gt": GT}, (1.0,), 3, "t", str(tmp_path / "none.png")) is None
    for file in files:
        assert os.path.getsize(file) > 0


def test_proponents_preview_one_query_per_bucket_with_marks():
    rows = [
        {"prompt": f"p{i}", "target": "x", "proponent_ids": [i, 100 + i], "scores": [0.5, 0.25],
         "texts": [f"a{i}", f"b{i}"]}
        for i in range(6)
    ]  # fmt: skip
    buckets = [1, 1, 2, 2, 16, 16]
    gt = [{0}, set(), {99}, set(), {104}, set()]
    answers = [("x", 0.9), ("y", 0.1)] * 3
    text = report.proponents_preview(rows, k=2, buckets=buckets, ground_truth=gt, answers=answers)
    queries = [line for line in text.splitlines() if line.startswith("query:")]
    # The first query of each bucket, rarest first.
    assert [q.split()[1] for q in queries] == ["p0", "p2", "p4"]
    assert "fact seen 16x; model says 'x', p = 0.90, right" in queries[2]
    assert " *1. [0] +0.500  a0" in text and "  2. [100]" in text  # ground truth marked
    assert " *2. [104]" in text and "(* states the query's fact)" in text
    assert report.preview_picks([], 2) == [0, 1]  # no buckets: the first queries
