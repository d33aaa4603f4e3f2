"""Run log: the metrics of every stage of a run, one JSON object per line.

Training, featurize, the Hessian fit and scoring append what they measured (loss, tokens/s,
examples/s, store MB, λ, a spectrum summary, rows/s) to ``<run_dir>/logs/metrics.jsonl``
through ``log_metrics``, one writer for every stage. Each record is
``{"time": ISO-8601 UTC, "stage": name, ...metrics}``; non-finite floats are written as
``null`` (JSON has no NaN). Lines are appended and flushed one at a time, so an interrupted run
leaves at most one cut line; the next write ends it first, and ``read_metrics`` skips it (a
line that does not parse and lacks its closing brace). Only process 0 writes.
Progress bars are unchanged.
"""

from __future__ import annotations

import datetime
import json
import math
import os
from typing import Any

import numpy as np

from trackstar.multihost import is_main_process

# The run directory's metrics file, relative to the run directory.
METRICS_FILE = os.path.join("logs", "metrics.jsonl")


class RunLogError(ValueError):
    """A metrics file that cannot be read; the message names the line."""


def _plain(value: Any) -> Any:
    """A JSON-ready value: numpy scalars as Python numbers, non-finite floats as None."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def log_metrics(run_dir: str, stage: str, **metrics: Any) -> dict | None:
    """Appends one record for ``stage`` to the run's metrics file and returns it (None on a
    process other than 0, which writes nothing)."""
    if not is_main_process():
        return None
    record = {
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
        "stage": stage,
        **_plain(metrics),
    }
    file = os.path.join(run_dir, METRICS_FILE)
    os.makedirs(os.path.dirname(file), exist_ok=True)
    line = json.dumps(record, allow_nan=False, default=str) + "\n"
    with open(file, "a+b") as f:
        # A run killed mid-write left a cut last line: end it, so this record starts its own.
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write(line.encode("utf-8"))
        f.flush()
    return record


def read_metrics(run_dir: str, stage: str | None = None) -> list[dict]:
    """The records of the run's metrics file (those of ``stage`` when given), oldest first.

    A cut line (a run killed mid-write: no closing brace) is skipped; any other line that does
    not parse raises ``RunLogError`` naming it.
    """
    file = os.path.join(run_dir, METRICS_FILE)
    if not os.path.exists(file):
        return []
    with open(file, encoding="utf-8") as f:
        lines = f.read().split("\n")
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if not line.rstrip().endswith("}"):  # Cut short by an interrupted write.
                continue
            raise RunLogError(
                f"{file}:{i}: not valid JSON; delete that line (the metrics file is a log, "
                "nothing reads it back but this function)"
            ) from None
        if stage is None or record.get("stage") == stage:
            out.append(record)
    return out
