"""Tables (Markdown, printed and saved) and plots (PNG) of results: no log dumps."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Collection, Mapping, Sequence
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


def preview_picks(buckets: Sequence[int], n_queries: int = 3) -> list[int]:
    """Row indices of a preview: the first query of each bucket (ascending), or the first
    ``n_queries`` rows when there are no buckets."""
    if not len(buckets):
        return list(range(n_queries))
    first: dict[int, int] = {}
    for i, b in enumerate(buckets):
        first.setdefault(int(b), i)
    return [first[b] for b in sorted(first)]


def proponents_preview(
    rows: Sequence[Mapping[str, Any]],
    n_queries: int = 3,
    k: int = 3,
    *,
    buckets: Sequence[int] = (),
    ground_truth: Sequence[Collection[int]] = (),
    answers: Sequence[tuple[str, float]] = (),
) -> str:
    """The top-k proponents of a sample of queries, as readable text.

    With ``buckets`` (one per row), one query per frequency bucket, rarest first (a reader
    sees where attribution works and where it does not); else the first ``n_queries``.
    ``ground_truth`` (the candidate ids stating each row's fact) marks proponents that state
    it with ``*``; ``answers`` (the model's answer and its probability) shows what the model
    says.
    """
    out = []
    for i in preview_picks(buckets, n_queries):
        if i >= len(rows):
            continue
        r = rows[i]
        head = f"query: {r['prompt']} -> {r['target']}"
        if len(buckets):
            head += f"   (fact seen {buckets[i]}x"
            if len(answers):
                answer, p = answers[i]
                mark = "right" if answer.strip() == str(r["target"]).strip() else "wrong"
                head += f"; model says {answer!r}, p = {p:.2f}, {mark}"
            head += ")"
        out.append(head)
        gt = set(ground_truth[i]) if len(ground_truth) else set()
        for rank, (pid, s, text) in enumerate(
            zip(r["proponent_ids"][:k], r["scores"][:k], r["texts"][:k], strict=False), 1
        ):
            mark = "*" if pid in gt else " "
            out.append(f" {mark}{rank}. [{pid}] {s:+.3f}  {text}")
    if len(ground_truth):
        out.append("(* states the query's fact)")
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


def paired_table(
    rows: Sequence[Mapping[str, Any]],
    lead: Sequence[tuple[str, Callable[[Mapping[str, Any]], Any]]],
    diff_header: str = "difference",
) -> str:
    """Paired per-query differences (``evaluation.paired_rows``: ``mean``, ``se``, ``n``) as a
    table: the ``lead`` columns (header, cell of a row), then mean ± se and n."""
    return markdown_table(
        [*(h for h, _ in lead), diff_header, "n"],
        [[*(cell(r) for _, cell in lead), pm(r["mean"], r["se"], 3), r["n"]] for r in rows],
    )


def comparison(row: Mapping[str, Any]) -> str:
    """``"a − b"`` of a paired row."""
    return f"{row['a']} − {row['b']}"


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


def sweeps_of(rows: Mapping[str, Mapping[str, Any]]) -> dict[str, Sequence[Mapping[str, Any]]]:
    """The lr sweep of every row that has one (``rows[name]["sweep"]``), in row order."""
    return {name: r["sweep"] for name, r in rows.items() if "sweep" in r}


def sweep_section(rows: Mapping[str, Mapping[str, Any]], k_max: int) -> str:
    """A titled ``sweep_markdown`` of tail-patch@k_max over the rows' lr sweeps."""
    return (
        f"Tail-patch@{k_max} (pp) over learning-rate multipliers (1× = final training lr):\n\n"
        + sweep_markdown(sweeps_of(rows), f"tailpatch@{k_max}")
    )


# ----- experiment tables ----------------------------------------------------------------------


def metric_headers(at_k: int, k_max: int) -> list[str]:
    """The headers of ``metric_cells``."""
    return ["MRR", f"Recall@{at_k}", f"tail-patch@{k_max} (pp)"]


def metric_cells(row: Mapping[str, Any], at_k: int, k_max: int) -> list[str]:
    """MRR, Recall@at_k and tail-patch@k_max (pp, ± standard error) of one result row."""
    return [
        pm(row.get("mrr"), None, 3, sign=False),
        pm(row.get(f"recall@{at_k}"), None, 3, sign=False),
        pm(row.get(f"tailpatch@{k_max}"), row.get(f"tailpatch@{k_max}_se")),
    ]


def nested_metric_table(
    rows: Mapping[str, Mapping[str, Mapping[str, Any]]],
    headers: Sequence[str],
    at_k: int,
    k_max: int,
    sweep_label: Callable[[str, str], str],
) -> str:
    """A metric table over two-level results ``rows[outer][inner]`` (E3: method, d; E5: output
    function, method), followed by the tail-patch@k_max lr sweep of every row that has one,
    labelled ``sweep_label(outer, inner)``."""
    body = [
        [outer, inner, *metric_cells(r, at_k, k_max)]
        for outer, by_inner in rows.items()
        for inner, r in by_inner.items()
    ]
    sweeps = {
        sweep_label(outer, inner): r["sweep"]
        for outer, by_inner in rows.items()
        for inner, r in by_inner.items()
        if "sweep" in r
    }
    return "\n\n".join(
        [
            markdown_table([*headers, *metric_headers(at_k, k_max)], body),
            f"Tail-patch@{k_max} (pp) over lr multipliers:\n\n"
            + sweep_markdown(sweeps, f"tailpatch@{k_max}"),
        ]
    )


def metric_bar_charts(
    groups: Sequence[str],
    rows: Mapping[str, Mapping[str, Mapping[str, Any]]],
    keys: Sequence[str],
    methods_for: Callable[[str], Sequence[str]],
    k_max: int,
    xlabel: str,
    title: str,
    out_dir: str,
    file_name: str,
) -> None:
    """Grouped bar charts of MRR and tail-patch@k_max, one group per ``keys`` entry of
    ``rows[key][method]`` (E4: model variants, E5: output functions). ``methods_for(metric)``
    picks the bars; ``title`` is formatted with ``label``, ``file_name`` with ``metric``."""
    for metric, label in (("mrr", "MRR"), (f"tailpatch@{k_max}", f"tail-patch@{k_max} (pp)")):
        grouped_bars(
            groups,
            metric_series(rows, keys, methods_for(metric), metric),
            xlabel,
            label,
            title.format(label=label),
            os.path.join(out_dir, file_name.format(metric=metric.replace("@", "_at_"))),
        )


def main_table(rows: Mapping[str, Mapping[str, Any]], at_k: int, k_max: int) -> str:
    """Method | MRR | Recall@k | tail-patch@1 | tail-patch@max k (pp, ± standard error)."""
    headers = ["method", "MRR", f"Recall@{at_k}", "tail-patch@1 (pp)", f"tail-patch@{k_max} (pp)"]
    body = [
        [
            name,
            pm(r.get("mrr"), None, 3, sign=False),
            pm(r.get(f"recall@{at_k}"), None, 3, sign=False),
            pm(r.get("tailpatch@1"), r.get("tailpatch@1_se")),
            pm(r.get(f"tailpatch@{k_max}"), r.get(f"tailpatch@{k_max}_se")),
        ]
        for name, r in rows.items()
    ]
    return markdown_table(headers, body)


def tailpatch_at_k_table(rows: Mapping[str, Mapping[str, Any]], ks: Sequence[int]) -> str:
    """Method | tail-patch@k for every k (pp, ± standard error)."""
    return markdown_table(
        ["method", *[f"tail-patch@{k} (pp)" for k in ks]],
        [
            [n, *[pm(r.get(f"tailpatch@{k}"), r.get(f"tailpatch@{k}_se")) for k in ks]]
            for n, r in rows.items()
        ],
    )


def split_table(
    splits: Mapping[str, Mapping[str, Any]],
    split: str,
    sizes: Mapping[str, int],
    at_k: int,
    k_max: int,
) -> str:
    """Method | split label | queries | MRR | Recall | tail-patch, a row per method and label.

    ``splits[method][metric]["by"][split][label]`` holds ``mean`` and ``se``
    (``metrics.summarize``); ``sizes[label]`` the queries with that label.
    """
    body = []
    for method, s in splits.items():
        for label in sorted(sizes, key=label_order):
            row: dict[str, Any] = {}
            for metric, by_split in s.items():
                cell = by_split["by"][split].get(label, {})
                row[metric], row[f"{metric}_se"] = cell.get("mean"), cell.get("se")
            body.append([method, label, sizes[label], *metric_cells(row, at_k, k_max)])
    return markdown_table(["method", split, "queries", *metric_headers(at_k, k_max)], body)


def retrieval_header(title: str, results: Mapping[str, Any], candidates: str) -> str:
    """The heading of a retrieval table: query, candidate and tail-patch counts, accuracy, λ."""
    tp = results["tailpatch"]
    return (
        f"## {title}\n\n{results['n_queries']} queries (MRR, recall), {tp['n_queries']} "
        f"tail-patched; {results['n_candidates']} candidates ({candidates}); greedy "
        f"accuracy {results['accuracy']:.3f}; λ = {results.get('lambda_mix')}; tail-patch lr "
        f"{tp['lr']:.1e}, scale {tp['scale']} (1/{tp['counted_tokens_per_batch']:.0f}).\n"
    )


def label_order(label: str) -> tuple:
    """Sort key of split labels: numbers by value first, then other labels by text."""
    try:
        return (0, float(label))
    except ValueError:
        return (1, label)


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


# ----- experiment plots -----------------------------------------------------------------------


def method_bars(
    rows: Mapping[str, Mapping[str, Any]],
    extra: Mapping[str, Mapping[str, Any]],
    k_max: int,
    title: str,
    file: str,
) -> str:
    """MRR of ``rows`` and tail-patch@k_max of ``rows`` then ``extra`` (rows without MRR,
    e.g. the ground truth), side by side."""
    names = list(rows) + list(extra)
    tp_rows = {**rows, **extra}
    return bar_panels(
        names,
        [
            ("MRR", [rows[n].get("mrr") for n in rows] + [None] * len(extra), None),
            (
                f"tail-patch@{k_max} (pp)",
                [tp_rows[n].get(f"tailpatch@{k_max}") for n in names],
                [tp_rows[n].get(f"tailpatch@{k_max}_se") for n in names],
            ),
        ],
        title,
        file,
    )


def sweep_chart(
    rows: Mapping[str, Mapping[str, Any]],
    lr_multipliers: Sequence[float],
    k_max: int,
    title: str,
    file: str,
) -> str | None:
    """Tail-patch@k_max over the lr multipliers, a line per row with a sweep (None: no row)."""
    sweeps = sweeps_of(rows)
    if not sweeps:
        return None
    key = f"tailpatch@{k_max}"
    series = {n: ([r[key] for r in s], [r[f"{key}_se"] for r in s]) for n, s in sweeps.items()}
    mults = [float(m) for m in lr_multipliers]
    return line_chart(
        mults, series, "lr multiplier", f"tail-patch@{k_max} (pp)", title, file, logx=True
    )


def metric_series(
    table: Mapping[str, Mapping[str, Mapping[str, Any]]],
    groups: Sequence[str],
    names: Sequence[str],
    metric: str,
) -> dict[str, tuple[list, list]]:
    """``{name: (values, errors)}`` of ``table[group][name][metric]`` (and ``_se``) over
    ``groups``: the series of ``grouped_bars`` and ``line_chart``."""
    return {
        n: (
            [table[g][n].get(metric) for g in groups],
            [table[g][n].get(f"{metric}_se") for g in groups],
        )
        for n in names
    }


def split_bars(
    splits: Mapping[str, Mapping[str, Any]],
    split: str,
    labels: Sequence[str],
    metric: str,
    ylabel: str,
    title: str,
    file: str,
    skip: Sequence[str] = (),
) -> str:
    """``grouped_bars`` of one metric over a split's labels, a colour per method (``splits`` as
    in ``split_table``); methods in ``skip`` or without the metric are left out."""
    series = {}
    for method, s in splits.items():
        if metric not in s or method in skip:
            continue
        by = s[metric]["by"][split]
        series[method] = (
            [by.get(lab, {}).get("mean") for lab in labels],
            [by.get(lab, {}).get("se") for lab in labels],
        )
    return grouped_bars(labels, series, split, ylabel, title, file)


def _save(fig, file: str) -> str:
    os.makedirs(os.path.dirname(file) or ".", exist_ok=True)
    fig.savefig(file, dpi=110)
    _pyplot().close(fig)
    return file
