"""Tables (Markdown, printed and saved) and plots (PNG) of results: no log dumps."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table; floats get 3 significant decimals."""

    def fmt(x: Any) -> str:
        if isinstance(x, float):
            return f"{x:.3f}"
        return str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def accuracy_table(acc: Mapping[str, Any]) -> str:
    """Greedy fact accuracy per frequency bucket, with the majority-object baseline."""
    rows = [
        (f"f = {b}", v["accuracy"], v["n"])
        for b, v in sorted(acc["per_bucket"].items(), key=lambda kv: int(kv[0]))
    ]
    rows.append(("all", acc["accuracy"], acc["n_queries"]))
    rows.append(("majority object (baseline)", acc["majority_object_share"], acc["n_queries"]))
    return markdown_table(["facts seen", "greedy accuracy", "queries"], rows)


def proponents_preview(rows: Sequence[Mapping[str, Any]], n_queries: int = 3, k: int = 3) -> str:
    """The top-k proponents of the first queries, as readable text."""
    out = []
    for r in rows[:n_queries]:
        out.append(f"query: {r['prompt']} -> {r['target']}")
        for rank, (pid, s, text) in enumerate(
            zip(r["proponent_ids"][:k], r["scores"][:k], r["texts"][:k], strict=False), 1
        ):
            out.append(f"  {rank}. [{pid}] {s:+.3f}  {text}")
    return "\n".join(out)


def save_text(text: str, file: str) -> None:
    """Writes a table next to the results (atomically)."""
    os.makedirs(os.path.dirname(file) or ".", exist_ok=True)
    tmp = file + ".tmp"
    with open(tmp, "w") as f:
        f.write(text + "\n")
    os.replace(tmp, file)
