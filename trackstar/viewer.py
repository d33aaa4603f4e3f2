"""A static, self-contained HTML viewer of proponents (``trackstar view``).

One HTML file, no server and no network: the page's script, style and data are inlined. Per
query it shows the prompt, the target, the model's own answer and confidence, the fact's
frequency bucket and relation; beside each other, the top proponents of each chosen method
with their scores and ground-truth marks (subject and object highlighted), the opponents
where the method has them, and the score breakdown by layer and by token where one was
computed (``trackstar.breakdown``). Filters: method, bucket, model correct/incorrect,
relation, free text. The metrics table averages the per-query values of the queries shown;
with no filter it equals the experiment's ``results.json``.

Inputs are files in the release's results schema (``trackstar.release``): a run's
``experiments/<name>/proponents/<method>.jsonl.gz`` (written by E1/E2,
``experiments.records``), and any other tool's results files, compared by ``example_id``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from typing import Any

from trackstar.files import atomic_write
from trackstar.release import PROPONENTS_DIR, ResultRecord, read_results

VIEW_FILE = "viewer.html"
_SUFFIXES = (".release.jsonl.gz", ".jsonl.gz", ".jsonl")
_DATA_MARK = "/*__VIEWER_DATA__*/"


class ViewerError(ValueError):
    """Input the viewer cannot show; the message says what to pass instead."""


# ----------------------------------------------------------------------------- inputs


def experiment_dir(run_dir: str, experiment: str = "e1") -> str:
    """``<run_dir>/experiments/<experiment>`` (or ``run_dir`` itself when it is one)."""
    if os.path.isdir(os.path.join(run_dir, PROPONENTS_DIR)):
        return run_dir
    out = os.path.join(run_dir, "experiments", experiment)
    if not os.path.isdir(os.path.join(out, PROPONENTS_DIR)):
        raise ViewerError(
            f"{out} has no {PROPONENTS_DIR}/ files to show; run the experiment with "
            f"viewer.write = True (`trackstar run` or `trackstar experiment --config "
            f"configs/{experiment}.py`), or pass results files with --release"
        )
    return out


def method_name(path: str) -> str:
    """A results file's method name: its file name without the results suffix."""
    name = os.path.basename(path)
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return os.path.splitext(name)[0]


def parse_release_arg(arg: str) -> tuple[str, str]:
    """``NAME=PATH`` or ``PATH`` (name from the file name) -> ``(name, path)``."""
    name, sep, path = arg.partition("=")
    if sep and name and not os.path.exists(arg):
        return name, path
    return method_name(arg), arg


def load_methods(
    exp_dir: str | None, release_files: Sequence[tuple[str, str]] = ()
) -> dict[str, list[ResultRecord]]:
    """Records per method: the experiment's proponents files, then the given results files."""
    paths: list[tuple[str, str]] = []
    if exp_dir is not None:
        folder = os.path.join(exp_dir, PROPONENTS_DIR)
        paths += [(method_name(f), os.path.join(folder, f)) for f in sorted(os.listdir(folder))]
    paths += list(release_files)
    methods: dict[str, list[ResultRecord]] = {}
    for name, path in paths:
        if name in methods:
            raise ViewerError(f"two inputs are named {name!r}; name one with NAME={path}")
        if not os.path.exists(path):
            raise ViewerError(f"results file {path} does not exist")
        methods[name] = list(read_results(path))
    if not methods:
        raise ViewerError("nothing to show: pass a run directory or results files")
    return methods


def summary_metrics(results: Mapping[str, Any]) -> tuple[list[str], dict[str, dict]]:
    """``(metric names, {method: {metric: value}})`` from an experiment's ``results.json``:
    MRR, its Recall@k and its largest tail-patch@k, with the ground truth's tail-patch."""
    rows = dict(results.get("methods", {}))
    keys = {k for row in rows.values() for k in row if not k.endswith("_se")}
    recall = sorted(k for k in keys if k.startswith("recall@"))
    tp = sorted((k for k in keys if k.startswith("tailpatch@")), key=lambda k: int(k[10:]))
    names = [k for k in ("mrr", *recall[:1], *tp[-1:]) if k in keys]
    if "ground_truth" in results:
        rows["ground truth"] = results["ground_truth"]
    table = {m: {k: row.get(k) for k in names if row.get(k) is not None} for m, row in rows.items()}
    return names, table


# ----------------------------------------------------------------------------- page data


def _reciprocal_rank(correct: Sequence[bool] | None) -> float | None:
    if correct is None:
        return None
    return next((1.0 / (i + 1) for i, c in enumerate(correct) if c), 0.0)


def _query_info(rec: ResultRecord) -> dict:
    return {
        "id": rec.example_id,
        "prompt": rec.inputs_plaintext,
        "target": rec.targets_plaintext,
        "fact": rec.fact_id,
        "relation": rec.relation,
        "bucket": rec.frequency_bucket,
        "pred": rec.model_prediction,
        "conf": rec.model_confidence,
        "correct": rec.model_correct,
        "e0": rec.extra.get("entity0"),
        "e1": rec.extra.get("entity1", rec.targets_plaintext),
    }


def view_data(
    methods: Mapping[str, Sequence[ResultRecord]],
    results: Mapping[str, Any] | None = None,
    *,
    top_k: int = 10,
    shown: Sequence[str] = (),
    title: str = "trackstar proponents",
    source: str = "",
) -> dict:
    """The page's data: queries joined across methods by ``example_id``, texts deduplicated.

    Per method and query: ``p`` / ``o`` (proponents / opponents: ``[text index, id, score,
    correct]``, the first ``top_k``), ``m`` (per-query metrics: the record's ``metrics``, or
    its reciprocal rank from ``proponent_correct`` for files without them) and ``b`` (the
    breakdown, if any).
    """
    texts: dict[str, int] = {}
    queries: list[dict] = []
    row_of: dict[str, int] = {}
    per_method: dict[str, list[dict | None]] = {}

    def text_index(t: str) -> int:
        return texts.setdefault(t, len(texts))

    def entries(
        txts: Iterable[str], ids: Iterable, scores: Iterable[float], correct: Iterable | None
    ) -> list[list]:
        marks = list(correct) if correct is not None else []
        return [
            [text_index(t), i, float(s), marks[j] if j < len(marks) else None]
            for j, (t, i, s) in enumerate(zip(txts, ids, scores, strict=True))
            if j < top_k
        ]

    for method, records in methods.items():
        cells: dict[int, dict] = {}
        for rec in records:
            key = str(rec.example_id)
            if key not in row_of:
                row_of[key] = len(queries)
                queries.append(_query_info(rec))
            info = queries[row_of[key]]
            for field, value in _query_info(rec).items():  # fill what earlier files lacked
                if info.get(field) is None and value is not None:
                    info[field] = value
            metrics = rec.extra.get("metrics")
            if metrics is None:
                rr = _reciprocal_rank(rec.proponent_correct)
                metrics = {} if rr is None else {"mrr": rr}
            cell = {
                "p": entries(
                    rec.proponents, rec.proponent_ids, rec.proponent_scores, rec.proponent_correct
                ),
                "m": metrics,
            }
            if rec.opponents is not None:
                cell["o"] = entries(
                    rec.opponents, rec.opponent_ids or [], rec.opponent_scores or [], None
                )
            if "breakdown" in rec.extra:
                cell["b"] = rec.extra["breakdown"]
            cells[row_of[key]] = cell
        per_method[method] = cells  # type: ignore[assignment]
    names, table = summary_metrics(results or {})
    if not names:
        names = sorted({k for cells in per_method.values() for c in cells.values() for k in c["m"]})
    return {
        "title": title,
        "source": source,
        "top_k": top_k,
        "methods": list(methods),
        "shown": [m for m in shown if m in methods] or list(methods)[:3],
        "metrics": names,
        "results": table,
        "queries": queries,
        "texts": list(texts),
        "records": {
            m: [cells.get(q) for q in range(len(queries))]  # type: ignore[union-attr]
            for m, cells in per_method.items()
        },
    }


def render_html(data: Mapping[str, Any]) -> str:
    """The page: the template with the data inlined (``<`` escaped, so that no text ends the
    script element)."""
    template = resources.files("trackstar").joinpath("viewer_page.html").read_text("utf-8")
    payload = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    # "<" appears only inside JSON strings: as \u003c no text can end or comment out the script.
    payload = payload.replace("<", "\\u003c")
    if _DATA_MARK not in template:
        raise ViewerError("trackstar/viewer_page.html lacks its data mark; reinstall trackstar")
    return template.replace(_DATA_MARK, payload)


def write_viewer(
    run_dir: str | None = None,
    *,
    out: str | None = None,
    experiment: str = "e1",
    release_files: Sequence[str] = (),
    top_k: int | None = None,
    shown: Sequence[str] | None = None,
) -> str:
    """Writes the viewer of a run (and/or results files) and returns its path.

    Args:
      run_dir: a run directory (its ``experiments/<experiment>``) or an experiment directory;
        None to show only ``release_files``.
      out: the HTML file; default ``<experiment dir>/viewer.html`` (or ``viewer.html`` beside
        the first results file).
      release_files: results files in the release schema (``NAME=PATH`` or ``PATH``), shown as
        more methods beside the run's.
      top_k, shown: proponents per method, and the methods shown at first; default the run's
        ``viewer`` config section (10; trackstar, bm25, grad_cosine).
    """
    exp = experiment_dir(run_dir, experiment) if run_dir is not None else None
    methods = load_methods(exp, [parse_release_arg(a) for a in release_files])
    results, settings = None, {}
    if exp is not None:
        results_file = os.path.join(exp, "results.json")
        if os.path.exists(results_file):
            with open(results_file) as f:
                results = json.load(f)
        config_file = os.path.join(exp, "config.json")
        if os.path.exists(config_file):
            with open(config_file) as f:
                settings = json.load(f).get("viewer", {}) or {}
    if results is not None:  # the experiment's table order, then the other files
        order = {m: i for i, m in enumerate(results.get("methods", {}))}
        methods = dict(sorted(methods.items(), key=lambda kv: order.get(kv[0], len(order))))
    top_k = int(top_k or settings.get("top_k", 10))
    shown = list(shown or settings.get("methods", ("trackstar", "bm25", "grad_cosine")))
    shown += [n for n, _ in map(parse_release_arg, release_files) if n not in shown]
    if exp is not None:
        title = f"trackstar · {os.path.basename(exp)} · {exp}"
    else:
        title = "trackstar · results files"
    data = view_data(
        methods, results, top_k=top_k, shown=shown, title=title, source=exp or release_files[0]
    )
    if out is None:
        base = exp if exp is not None else os.path.dirname(os.path.abspath(release_files[0]))
        out = os.path.join(base, VIEW_FILE)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    atomic_write(out, lambda f: f.write(render_html(data)))
    return out
