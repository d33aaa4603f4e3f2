"""Run log: the metrics of every stage of a run, one JSON object per line.

Training, featurize, the Hessian fit and scoring append what they measured (loss, tokens/s,
examples/s, store MB, λ, a spectrum summary, rows/s) to ``<run_dir>/logs/metrics.jsonl``
through ``log_metrics``, one writer for every stage. Each record is
``{"time": ISO-8601 UTC, "stage": name, ...metrics}``; non-finite floats are written as
``null`` (JSON has no NaN). Lines are appended and flushed one at a time, so an interrupted run
leaves at most one cut line; the next write ends it first, and ``read_metrics`` skips it (a
line that does not parse and lacks its closing brace). Only process 0 writes.
Progress bars are unchanged.

With ``logging.tensorboard = True`` (``configure_from_config``, called by each stage that logs)
every record is also written as TensorBoard scalars under ``<run_dir>/logs/tensorboard/``:
tag ``<stage>/<metric>`` (``<stage>/<metric>/<key>`` for a dict's entries) for each numeric
value, at the record's ``step`` or else at the record's index among its stage's records in
the metrics file (so a resumed run continues the count). The writer of a run directory is
kept open and flushed after each record. tensorboardX is optional: it is imported only then.
"""

from __future__ import annotations

import atexit
import datetime
import json
import math
import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from trackstar.multihost import is_main_process

# The run directory's metrics file, relative to the run directory.
METRICS_FILE = os.path.join("logs", "metrics.jsonl")
# The TensorBoard event files (logging.tensorboard), relative to the run directory.
TENSORBOARD_DIR = os.path.join("logs", "tensorboard")

# Per run directory (absolute path): whether records also go to TensorBoard, its open writer,
# and, per stage, the step of the next record that has no ``step`` of its own. The option is
# set per process by ``configure`` (the command's config), not stored in the run directory.
_TENSORBOARD: dict[str, bool] = {}
_WRITERS: dict[str, Any] = {}
_NEXT_STEP: dict[tuple[str, str], int] = {}
_OPENED = [0]  # Event files this process has opened (their names' count).


class RunLogError(ValueError):
    """A metrics file that cannot be read; the message names the line."""


class TensorBoardMissing(ImportError):
    """``logging.tensorboard`` is on but tensorboardX is not installed; the message says how
    to fix it."""


def _tensorboardx() -> tuple[type, Any, Any]:
    """tensorboardX's ``(EventsWriter, event_pb2, summary_pb2)``.

    Imported only when asked for: tensorboardX is an optional dependency (extra 'tensorboard').
    Its synchronous ``EventsWriter`` is used rather than ``SummaryWriter``, whose events go
    through a queue to a writer thread that its ``flush()`` does not wait for: a run killed
    right after a record could lose it.
    """
    try:
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto import event_pb2, summary_pb2
    except ImportError as e:
        raise TensorBoardMissing(
            "logging.tensorboard = True needs tensorboardX, which is not installed "
            f"({e}): pip install 'trackstar[tensorboard]', or set "
            "--config.logging.tensorboard=False"
        ) from None
    return EventsWriter, event_pb2, summary_pb2


def configure(run_dir: str, tensorboard: bool = False) -> None:
    """Sets whether ``log_metrics`` also writes ``run_dir``'s records to TensorBoard.

    Turning it on checks tensorboardX is importable now (``TensorBoardMissing`` otherwise, on
    every process, so a run fails before any work rather than at its first record); turning
    it off closes the run directory's writer.
    """
    key = os.path.abspath(run_dir)
    if tensorboard:
        _tensorboardx()
    else:
        _close_writer(key)
    _TENSORBOARD[key] = bool(tensorboard)


def configure_from_config(cfg: Any) -> None:
    """``configure`` from a run config's ``logging.tensorboard`` (off when the config has no
    ``logging`` section: a config built in code, or one older than the field)."""
    section = cfg.get("logging")
    on = bool(section.get("tensorboard", False)) if section is not None else False
    configure(str(cfg.run_dir), tensorboard=on)


def _close_writer(key: str) -> None:
    writer = _WRITERS.pop(key, None)
    if writer is not None:
        writer.close()
    for k in [k for k in _NEXT_STEP if k[0] == key]:
        del _NEXT_STEP[k]


@atexit.register
def close_writers() -> None:
    """Closes every open TensorBoard writer and forgets the step counts (each record is
    already flushed; this closes the files, as at the end of the process)."""
    for key in list(_WRITERS):
        _close_writer(key)


def _scalars(prefix: str, value: Any) -> Iterator[tuple[str, float]]:
    """``(tag, value)`` of each numeric leaf of a JSON-ready value (bools and None skipped;
    TensorBoard keeps the values as float32)."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _scalars(f"{prefix}/{k}", v)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield prefix, float(value)


def _records_of(file: str, stage: str) -> int:
    """How many records of ``stage`` the metrics file holds; lines that do not parse are not
    counted (the step numbering must never stop the log)."""
    n = 0
    with open(file, encoding="utf-8") as f:
        for line in f:
            try:
                n += json.loads(line).get("stage") == stage
            except (ValueError, AttributeError):
                continue
    return n


def _write_tensorboard(run_dir: str, record: dict) -> None:
    key = os.path.abspath(run_dir)
    stage = record["stage"]
    step = record.get("step")
    if not isinstance(step, int) or isinstance(step, bool):
        # No step of its own: its index among the stage's records (the file already holds it).
        counter = (key, stage)
        if counter not in _NEXT_STEP:
            _NEXT_STEP[counter] = _records_of(os.path.join(run_dir, METRICS_FILE), stage) - 1
        step = _NEXT_STEP[counter]
        _NEXT_STEP[counter] += 1
    events_writer, event_pb2, summary_pb2 = _tensorboardx()
    if key not in _WRITERS:
        logdir = os.path.join(run_dir, TENSORBOARD_DIR)
        os.makedirs(logdir, exist_ok=True)
        # Event files are named by the second they were opened: the pid and a count keep a
        # writer opened in the same second (another command, a reconfigured run) from
        # truncating an earlier one's file.
        _OPENED[0] += 1
        _WRITERS[key] = events_writer(
            os.path.join(logdir, "events"), filename_suffix=f".{os.getpid()}.{_OPENED[0]}"
        )
    values = [
        summary_pb2.Summary.Value(tag=tag, simple_value=v)
        for name, value in record.items()
        if name not in ("time", "stage", "step")
        for tag, v in _scalars(f"{stage}/{name}", value)
    ]
    if values:
        event = event_pb2.Event(
            wall_time=time.time(), step=step, summary=summary_pb2.Summary(value=values)
        )
        _WRITERS[key].write_event(event)
        _WRITERS[key].flush()  # An interrupted run keeps every record it logged.


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
    process other than 0, which writes nothing); also to TensorBoard when ``configure`` turned
    it on for ``run_dir``."""
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
    if _TENSORBOARD.get(os.path.abspath(run_dir), False):
        _write_tensorboard(run_dir, record)
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
