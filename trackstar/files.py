"""Atomic file writes: a file is written under a temporary name, synced, then renamed.

A reader therefore sees either the previous file or the complete new one, never a half-written
file, even if the writer is killed (rename is atomic on local POSIX filesystems).
"""

from __future__ import annotations

import gzip
import json
import os
import uuid
from collections.abc import Callable, Iterator
from typing import IO, Any


def atomic_write(path: str, write: Callable[[IO], Any], binary: bool = False) -> None:
    """Calls ``write(f)`` on a temporary file and renames it to ``path`` once synced."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str, obj: Any, **dump_kwargs: Any) -> None:
    """Writes ``obj`` as indented JSON, atomically."""
    dump_kwargs.setdefault("indent", 2)
    atomic_write(path, lambda f: json.dump(obj, f, **dump_kwargs))


def write_text(path: str, text: str) -> None:
    """Writes ``text`` (newline-terminated), atomically."""
    atomic_write(path, lambda f: f.write(text if text.endswith("\n") else text + "\n"))


def write_bytes(path: str, data: bytes) -> None:
    """Writes ``data``, atomically."""
    atomic_write(path, lambda f: f.write(data), binary=True)


def iter_jsonl(path: str, error: type[Exception]) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, row)`` of each JSON object of a jsonl file, read line by line.

    Lines are decoded one by one (a UTF-8 byte-order mark is allowed on the first), so a bad line
    raises ``error("path:line: ...")`` naming its line: a non-UTF-8 byte, bad JSON, or a row that
    is not a JSON object. Blank lines are skipped. A path ending in ``.gz`` is read through gzip.
    """
    opener = gzip.open if os.fspath(path).endswith(".gz") else open
    with opener(path, "rb") as fh:
        for i, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8-sig" if i == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise error(
                    f"{path}:{i}: not valid UTF-8 (byte {raw[e.start]:#04x} at column "
                    f"{e.start + 1}); re-encode the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path}:{i}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise error(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
            yield i, row
