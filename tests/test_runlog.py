"""Run log: records appended one line at a time, read back; a cut last line is skipped."""

import glob
import json
import math
import os
import struct
import sys

import ml_collections
import numpy as np
import pytest

from trackstar import runlog
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


def _scalars(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the run's TensorBoard event files: ``{tag: [(step, value), ...]}``.

    Reads the TFRecord framing directly (length, CRC, event, CRC) and parses each event with
    tensorboardX's own proto, so no TensorBoard install is needed.
    Values come back as float32 (TensorBoard's ``simple_value``).
    """
    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for file in sorted(glob.glob(os.path.join(run_dir, runlog.TENSORBOARD_DIR, "events.*"))):
        data = open(file, "rb").read()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


@pytest.fixture
def tensorboard_run(tmp_path):
    run = str(tmp_path / "run")
    cfg = ml_collections.ConfigDict({"run_dir": run, "logging": {"tensorboard": True}})
    runlog.configure_from_config(cfg)
    yield run
    runlog.configure(run, tensorboard=False)  # closes the writer; other tests start clean


def test_tensorboard_scalars_at_the_record_step_or_the_stage_count(tensorboard_run):
    run = tensorboard_run
    log_metrics(run, "train", step=10, loss=np.float32(2.5), tokens_per_s=100.0)
    log_metrics(run, "train", step=20, loss=2.0, tokens_per_s=120.0)
    log_metrics(run, "score", preset="trackstar", rows=7, rows_per_s=3.5, ok=True)
    log_metrics(run, "score", preset="bm25", rows=8, rows_per_s=math.nan)
    log_metrics(run, "train_accuracy", accuracy=0.5, per_bucket={1: 0.25, 8: 0.75})
    # Written and flushed per record: readable while the writer is still open.
    got = _scalars(run)
    assert got == {
        "train/loss": [(10, 2.5), (20, 2.0)],
        "train/tokens_per_s": [(10, 100.0), (20, 120.0)],
        "score/rows": [(0, 7.0), (1, 8.0)],
        "score/rows_per_s": [(0, 3.5)],  # non-finite (null in the log), strings, bools skipped
        "train_accuracy/accuracy": [(0, 0.5)],
        "train_accuracy/per_bucket/1": [(0, 0.25)],
        "train_accuracy/per_bucket/8": [(0, 0.75)],
    }
    assert len(read_metrics(run)) == 5  # the metrics file is unchanged by the option


def test_a_new_process_continues_the_stage_count(tensorboard_run):
    run = tensorboard_run
    log_metrics(run, "hessian", lambda_mix=0.25)
    runlog.close_writers()  # as at the end of a process: the step counters are forgotten
    runlog.configure(run, tensorboard=True)
    log_metrics(run, "hessian", lambda_mix=0.5)
    assert _scalars(run) == {"hessian/lambda_mix": [(0, 0.25), (1, 0.5)]}


def test_tensorboard_is_off_by_default(tmp_path):
    run = str(tmp_path)
    runlog.configure_from_config(ml_collections.ConfigDict({"run_dir": run}))  # no section
    log_metrics(run, "train", step=1, loss=1.0)
    other = str(tmp_path / "never_configured")
    log_metrics(other, "train", step=1, loss=1.0)
    for d in (run, other):
        assert read_metrics(d) and not os.path.exists(os.path.join(d, runlog.TENSORBOARD_DIR))


def test_a_missing_tensorboardx_is_a_clear_error(tmp_path, monkeypatch):
    # A None entry makes its import fail; submodules too (an imported one would be found).
    for name in [m for m in sys.modules if m.split(".")[0] == "tensorboardX"] + ["tensorboardX"]:
        monkeypatch.setitem(sys.modules, name, None)
    cfg = ml_collections.ConfigDict({"run_dir": str(tmp_path), "logging": {"tensorboard": True}})
    with pytest.raises(runlog.TensorBoardMissing, match=r"pip install 'trackstar\[tensorboard\]'"):
        runlog.configure_from_config(cfg)
    with pytest.raises(ImportError, match=r"logging.tensorboard=False"):
        runlog.configure(str(tmp_path), tensorboard=True)
    log_metrics(str(tmp_path), "train", step=1, loss=1.0)  # still off: the JSON log goes on
    assert not os.path.exists(os.path.join(str(tmp_path), runlog.TENSORBOARD_DIR))


def test_only_process_0_writes_tensorboard(tensorboard_run, monkeypatch):
    monkeypatch.setattr(runlog, "is_main_process", lambda: False)
    assert log_metrics(tensorboard_run, "train", step=1, loss=1.0) is None
    assert not os.path.exists(os.path.join(tensorboard_run, runlog.TENSORBOARD_DIR))
