"""Tables (Markdown, printed and saved) and plots (PNG) of results: no log dumps."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from trackstar.files import write_text


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
    write_text(file, text)


# ----- numbers with errors --------------------------------------------------------------------


def pm(mean: float | None, se: float | None = None, digits: int = 2, sign: bool = True) -> str:
    """``"+1.23 ± 0.10"``; a missing value is ``"–"`` and a missing error is left out."""
    if mean is None or not math.isfinite(mean):
        return "–"
    text = f"{mean:+.{digits}f}" if sign else f"{mean:.{digits}f}"
    if se is not None and math.isfinite(se):
        text += f" ± {se:.{digits}f}"
    return text


def sweep_markdown(
    sweeps: Mapping[str, Sequence[Mapping[str, Any]]], key: str = "tailpatch@10"
) -> str:
    """The learning-rate sweep of one tail-patch metric: a row per method, a column per
    multiplier (``sweeps[method]`` are ``tailpatch.sweep_table`` rows)."""
    if not sweeps:
        return ""
    first = next(iter(sweeps.values()))
    mults = [r["lr_multiplier"] for r in first]
    headers = ["method", *[f"{m:g}× lr ({r['lr']:.1e})" for m, r in zip(mults, first, strict=True)]]
    rows = []
    for name, sweep in sweeps.items():
        rows.append([name, *[pm(r.get(key), r.get(f"{key}_se")) for r in sweep]])
    return markdown_table(headers, rows)


# ----- plots (matplotlib, Agg: files only, no display) ----------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finite(values: Sequence[float | None]) -> list[float]:
    return [v if v is not None and math.isfinite(v) else float("nan") for v in values]


def bar_panels(
    labels: Sequence[str],
    panels: Sequence[tuple[str, Sequence[float | None], Sequence[float | None] | None]],
    title: str,
    file: str,
) -> str:
    """Side-by-side bar charts sharing the x labels: one ``(ylabel, values, errors)`` per panel."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    x = list(range(len(labels)))
    for ax, (ylabel, values, errors) in zip(axes[0], panels, strict=True):
        err = _finite(errors) if errors is not None else None
        ax.bar(x, _finite(values), yerr=err, capsize=3, color="tab:blue", alpha=0.85)
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel(ylabel)
        ax.axhline(0.0, color="black", linewidth=0.6)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, file)


def line_chart(
    x: Sequence[float],
    series: Mapping[str, tuple[Sequence[float | None], Sequence[float | None] | None]],
    xlabel: str,
    ylabel: str,
    title: str,
    file: str,
    logx: bool = False,
    xticklabels: Sequence[str] | None = None,
) -> str:
    """One line (with error bars when given) per series over shared x values."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    for name, (values, errors) in series.items():
        err = _finite(errors) if errors is not None else None
        ax.errorbar(list(x), _finite(values), yerr=err, marker="o", capsize=3, label=name)
    if logx:
        ax.set_xscale("log", base=2)
    if xticklabels is not None:
        ax.set_xticks(list(x))
        ax.set_xticklabels(xticklabels)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, file)


def grouped_bars(
    groups: Sequence[str],
    series: Mapping[str, tuple[Sequence[float | None], Sequence[float | None] | None]],
    xlabel: str,
    ylabel: str,
    title: str,
    file: str,
) -> str:
    """Bars grouped by ``groups`` (x), one colour per series (e.g. method)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.2, 0.9 * len(groups) * max(1, len(series)) / 2), 3.8))
    width = 0.8 / max(1, len(series))
    for i, (name, (values, errors)) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        err = _finite(errors) if errors is not None else None
        ax.bar(xs, _finite(values), width=width, yerr=err, capsize=2, label=name)
    ax.set_xticks(list(range(len(groups))))
    ax.set_xticklabels(groups)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, file)


def _save(fig, file: str) -> str:
    os.makedirs(os.path.dirname(file) or ".", exist_ok=True)
    fig.savefig(file, dpi=110)
    _pyplot().close(fig)
    return file
