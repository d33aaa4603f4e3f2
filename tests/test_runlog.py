"""Run log: records appended one line at a time, read back; a cut last line is skipped."""

import json
import math
import os

import numpy as np
import pytest

from trackstar.runlog import METRICS_FILE, RunLogError, log_metrics, read_metrics


def test_records_round_trip_with_plain_values(tmp_path):
    run = str(tmp_path)
    a = log_metrics(run, "train", step=np.int64(10), loss=np.float32(2.5), lr=1e-3)
    b = log_metrics(run, "hessian", lambda_mix=None, eig_max=math.inf, per_bucket={1: 0.5})
    assert a["step"] == 10 and isinstance(a["step"], int) and a["loss"] == 2.5
    assert b["eig_max"] is None  # JSON has no infinity
    got = read_metrics(run)
    assert got == [a, b]
    assert [r["stage"] for r in got] == ["train", "hessian"] and got[1]["per_bucket"] == {"1": 0.5}
    assert read_metrics(run, "hessian") == [b]
    assert read_metrics(str(tmp_path / "none")) == []


def test_a_cut_last_line_is_skipped_and_a_damaged_one_is_refused(tmp_path):
    run = str(tmp_path)
    first = log_metrics(run, "score", rows=3)
    file = os.path.join(run, METRICS_FILE)
    with open(file, "a") as f:
        f.write('{"stage": "score", "ro')  # a run killed mid-write
    assert read_metrics(run) == [first]
    second = log_metrics(run, "score", rows=4)  # the next run ends the cut line first
    assert read_metrics(run) == [first, second]
    lines = open(file).read().splitlines()
    assert json.loads(lines[0]) == first and len(lines) == 3 and json.loads(lines[2]) == second
    with open(file, "a") as f:
        f.write('{"stage": "score", rows: 5}\n')  # damaged, not cut: refused, named
    with pytest.raises(RunLogError, match=r"metrics.jsonl:4: not valid JSON"):
        read_metrics(run)
