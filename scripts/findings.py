"""The paper's findings, checked per world from E1's per-query metrics: one Markdown table.

    python scripts/findings.py                      # runs/demo runs/world_seed1 runs/world_uniform
    python scripts/findings.py runs/a runs/b --json
    python scripts/findings.py --wall demo=1200 --wall world_seed1=1800
    python scripts/findings.py --lds demo=runs/e8 --lds world_seed1=runs/e8_seed1

Reads <run_dir>/experiments/e1/results.json (accuracy, query counts, wall time) and
<run_dir>/experiments/e1/proponents/<method>.jsonl.gz, whose records hold each query's
``metrics`` (mrr, recall@10, precision@10, tailpatch@k; tail-patch is null where the query was
not tail-patched). Each finding compares two methods on one metric, paired per query over the
queries both have a value for: diff = mean(a - b) ± se (sample std / sqrt(n)). The verdict is
"yes" when the diff has the finding's sign and |diff| > 2 se, "no" when it has the opposite
sign and |diff| > 2 se, "tie" otherwise. Tail-patch is in percentage points of p(target), as
the metrics hold it and the E1 tables show it.

Each finding says where its claim comes from: "paper" (TrackStar's paper, as EXPERIMENTS.md
phrases it in "The paper's findings, point by point") or "demo" (what the demo world showed
where it differs from the paper or goes beyond it: EXPERIMENTS.md "The paper's findings", E6
and "What R buys and what it costs") or "question" (no claim made; the direction is the one
asked) or "hypothesis" (the claim under test in EXPERIMENTS.md "What R buys and what it
costs"). ``--lds WORLD=E8_RUN_DIR`` adds LDS rows from E8's per-query paired differences
(``experiments/e8/results.json``, "paired") of an E8 run on a smaller world of that kind.
``ground_truth`` (the query's own fact statements as proponents) has no proponents
file; its per-query tail-patch is read from the run's tail-patch cache when it can be
identified (``ground_truth_metrics``), else its rows stay empty.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import math
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trackstar.config import SCORE_PRESETS  # noqa: E402

DEFAULT_RUN_DIRS = ("runs/demo", "runs/world_seed1", "runs/world_uniform")
GRADIENT = tuple(p for p in SCORE_PRESETS if p != "trackstar")  # every other gradient preset
METRIC_LABELS = {
    "mrr": "MRR",
    "recall@10": "Recall@10",
    "precision@10": "Precision@10",
    "tailpatch@1": "tail-patch@1",
    "tailpatch@10": "tail-patch@10",
}


@dataclass(frozen=True)
class Finding:
    """Claim: sign * (metric(a) - metric(b)) > 0, paired per query."""

    label: str
    metric: str
    a: str
    b: str
    sign: int = 1  # +1: a above b; -1: a below b.
    source: str = "paper"


def _label(method: str) -> str:
    return {"trackstar": "TrackStar", "bm25": "BM25"}.get(method, method)


def findings() -> list[Finding]:
    out = [Finding(f"TrackStar > {m} on MRR", "mrr", "trackstar", m) for m in GRADIENT]  # Paper 3.
    out += [
        Finding(f"BM25 > TrackStar on {METRIC_LABELS[k]}", k, "bm25", "trackstar")
        for k in ("mrr", "recall@10", "precision@10")
    ]  # Paper 1.
    out += [
        Finding(
            "correction raises MRR (exp_opt_norm - grad_cosine)",
            "mrr",
            "exp_opt_norm",
            "grad_cosine",
        ),
        Finding("correction raises MRR (exp_opt - grad_dot)", "mrr", "exp_opt", "grad_dot"),
        Finding("unit norm raises MRR (exp_opt_norm - exp_opt)", "mrr", "exp_opt_norm", "exp_opt"),
        Finding("unit norm raises MRR (grad_cosine - grad_dot)", "mrr", "grad_cosine", "grad_dot"),
        Finding(
            "R_train raises MRR (exp_opt_norm_rtrain - exp_opt_norm)",
            "mrr",
            "exp_opt_norm_rtrain",
            "exp_opt_norm",
        ),
        Finding(
            "mixing raises MRR (trackstar - exp_opt_norm_rtrain)",
            "mrr",
            "trackstar",
            "exp_opt_norm_rtrain",
        ),
    ]  # Paper 4.
    out += [
        Finding(f"TrackStar > {m} on tail-patch@10", "tailpatch@10", "trackstar", m)
        for m in ("bm25", *GRADIENT)
    ]  # Paper 2.
    out += [
        Finding(f"{m} > BM25 on tail-patch@10", "tailpatch@10", m, "bm25") for m in GRADIENT
    ]  # Paper 2 (every gradient method above the lexical baseline; TrackStar's row is above).
    out += [
        Finding(
            "R_train lowers tail-patch@10 (exp_opt_norm_rtrain - exp_opt_norm)",
            "tailpatch@10",
            "exp_opt_norm_rtrain",
            "exp_opt_norm",
            sign=-1,
            source="demo",
        ),
        Finding(
            "mixing lowers tail-patch@10 (trackstar - exp_opt_norm_rtrain)",
            "tailpatch@10",
            "trackstar",
            "exp_opt_norm_rtrain",
            sign=-1,
            source="demo",
        ),
        Finding(
            "step_influence > TrackStar on tail-patch@10",
            "tailpatch@10",
            "step_influence",
            "trackstar",
            source="demo",
        ),
        Finding(
            "step_influence > TrackStar on tail-patch@1",
            "tailpatch@1",
            "step_influence",
            "trackstar",
            source="demo",
        ),
        Finding(
            "step_influence < exp_opt on tail-patch@10",
            "tailpatch@10",
            "step_influence",
            "exp_opt",
            sign=-1,
            source="demo",
        ),
        Finding("TRAK > grad_dot on MRR", "mrr", "trak", "grad_dot", source="demo"),
        Finding("TRAK < grad_cosine on MRR", "mrr", "trak", "grad_cosine", sign=-1, source="demo"),
    ]
    out += [
        Finding(
            "TrackStar < ground truth on tail-patch@10",
            "tailpatch@10",
            "trackstar",
            "ground_truth",
            sign=-1,
            source="demo",
        ),
        Finding(
            "exp_opt > ground truth on tail-patch@10",
            "tailpatch@10",
            "exp_opt",
            "ground_truth",
            source="question",
        ),
    ]  # E6: at k = 10 the fact statements are level with the methods but TrackStar (1.9 se).
    out += [
        Finding(
            f"{_label(m)} > ground truth on tail-patch@1",
            "tailpatch@1",
            m,
            "ground_truth",
            source="demo",
        )
        for m in ("trackstar", *GRADIENT)
    ]  # E6: every gradient method's top-1 beats the query's own fact statements.
    return out


# LDS rows (E8, `--lds WORLD=E8_RUN_DIR`): (label, key of E8's results.json "paired", sign,
# source). "hypothesis": the claim under test in EXPERIMENTS.md "What R buys and what it costs".
LDS_FINDINGS = (
    ("R_train raises LDS", "exp_opt_norm_rtrain − exp_opt_norm", 1, "hypothesis"),
    ("mixed R raises LDS", "trackstar − exp_opt_norm", 1, "hypothesis"),
    ("mixing raises LDS", "trackstar − exp_opt_norm_rtrain", 1, "hypothesis"),
    ("correction raises LDS (exp_opt_norm - grad_cosine)", "exp_opt_norm − grad_cosine", 1, "demo"),
    ("TrackStar > BM25 on LDS", "trackstar − bm25", 1, "question"),
)


def lds_rows(lds_dirs: Mapping[str, str], names: Sequence[str]) -> list[dict]:
    """``LDS_FINDINGS`` per world from each E8 run's ``experiments/e8/results.json`` (its
    per-query paired differences); a world without an E8 run gets empty cells."""
    paired_by_world = {}
    for name, run_dir in lds_dirs.items():
        file = os.path.join(run_dir, "experiments", "e8", "results.json")
        if not os.path.exists(file):
            sys.exit(f"no {file}; run configs/e8.py there first")
        with open(file) as f:
            paired_by_world[name] = json.load(f).get("paired") or {}
    rows = []
    for label, key, sign, source in LDS_FINDINGS:
        cells = {}
        for name in names:
            d = paired_by_world.get(name, {}).get(key)
            cells[name] = (
                None
                if d is None
                else {
                    "diff": d["mean"],
                    "se": math.nan if d["se"] is None else d["se"],
                    "n": d["n"],
                    "verdict": verdict(d["mean"], math.nan if d["se"] is None else d["se"], sign),
                    "run_dir": lds_dirs[name],
                }
            )
        rows.append(
            {"label": label, "metric": "lds", "a": key, "b": "", "sign": sign, "source": source}
            | {"worlds": cells}
        )
    return rows


def load_metrics(path: str) -> dict[int, dict[str, float | None]]:
    """``example_id -> metrics`` of one proponents file."""
    out = {}
    with gzip.open(path, "rt") as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                out[int(rec["example_id"])] = dict(rec.get("metrics") or {})
    return out


def paired(
    a: Mapping[int, Mapping[str, float | None]],
    b: Mapping[int, Mapping[str, float | None]],
    metric: str,
) -> tuple[float, float, int]:
    """Mean and standard error of a - b over the queries both have ``metric`` for, and n."""
    diffs = []
    for qid in sorted(set(a) & set(b)):
        va, vb = a[qid].get(metric), b[qid].get(metric)
        if va is None or vb is None:
            continue
        diffs.append(float(va) - float(vb))
    n = len(diffs)
    if n == 0:
        return math.nan, math.nan, 0
    mean = sum(diffs) / n
    if n < 2:
        return mean, math.nan, n
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1)
    return mean, math.sqrt(var / n), n


def verdict(diff: float, se: float, sign: int = 1) -> str:
    """ "yes" (the claimed sign, beyond 2 se), "no" (the other sign, beyond 2 se), or "tie"."""
    if math.isnan(diff) or math.isnan(se):
        return "n/a"
    if abs(diff) > 2.0 * se:
        return "yes" if sign * diff > 0 else "no"
    return "tie"


def world_name(run_dir: str) -> str:
    return os.path.basename(os.path.normpath(run_dir))


def ground_truth_metrics(run_dir: str, results: Mapping, methods: Mapping) -> dict | None:
    """Per-query tail-patch of ``ground_truth`` (the query's own fact statements), or None.

    E1 keeps it only as a mean in results.json; the per-query deltas are in the run's tail-patch
    cache (results/cache/tailpatch_candidates_*.npz, ``value``: lr multipliers x tail-patched
    queries x 10 proponents, fractions of p(target), NaN past a query's last statement), which
    names no method. The file is taken only when it is the one cache whose tail-patch@1 and @10
    reproduce results.json's ground-truth means, and the row order (tail-patched queries by
    example id) only when some cache file reproduces trackstar's per-query tail-patch@10.
    """
    try:
        import numpy as np
    except ImportError:
        return None
    gt, tp = results.get("ground_truth") or {}, results.get("tailpatch") or {}
    mults = list(tp.get("lr_multipliers") or [])
    track = methods.get("trackstar")
    if "tailpatch@10" not in gt or 1.0 not in mults or not track:
        return None
    ids = sorted(q for q, m in track.items() if m.get("tailpatch@10") is not None)
    want = np.array([track[q]["tailpatch@10"] for q in ids])
    paths = sorted(
        glob.glob(os.path.join(run_dir, "results", "cache", "tailpatch_candidates_*.npz"))
    )
    at1 = mults.index(1.0)
    found, order_ok = [], False
    for path in paths:
        with np.load(path) as z:
            value = z["value"] if "value" in z.files else None
        if value is None or value.ndim != 3 or value.shape[1] != len(ids) or value.shape[2] < 10:
            continue
        deltas = 100.0 * value[at1]  # Percentage points.
        with np.errstate(all="ignore"):
            per_k = {k: np.nanmean(deltas[:, :k], axis=1) for k in (1, 3, 5, 10)}
        if np.allclose(per_k[10], want, rtol=1e-6, atol=1e-9):
            order_ok = True
        if all(
            f"tailpatch@{k}" in gt and abs(np.nanmean(per_k[k]) - gt[f"tailpatch@{k}"]) < 1e-6
            for k in (1, 10)
        ):
            found.append(per_k)
    if len(found) != 1 or not order_ok:
        return None
    per_k = found[0]
    return {
        q: {f"tailpatch@{k}": (None if np.isnan(v[i]) else float(v[i])) for k, v in per_k.items()}
        for i, q in enumerate(ids)
    }


def load_world(run_dir: str) -> dict:
    e1 = os.path.join(run_dir, "experiments", "e1")
    with open(os.path.join(e1, "results.json")) as f:
        results = json.load(f)
    props = os.path.join(e1, "proponents")
    methods = {}
    if os.path.isdir(props):
        for name in sorted(os.listdir(props)):
            if name.endswith(".jsonl.gz"):
                methods[name[: -len(".jsonl.gz")]] = load_metrics(os.path.join(props, name))
    gt_file = os.path.join(e1, "ground_truth_metrics.json")  # written by E1 since it exists
    if os.path.exists(gt_file):
        with open(gt_file) as f:
            rows = json.load(f)
        gt = {r["example_id"]: {k: v for k, v in r.items() if k != "example_id"} for r in rows}
    else:  # runs from before: recover it from the tail-patch cache, when unambiguous
        gt = ground_truth_metrics(run_dir, results, methods)
    if gt is not None:
        methods["ground_truth"] = gt
    tp = results.get("tailpatch", {})
    return {
        "name": world_name(run_dir),
        "run_dir": run_dir,
        "accuracy": results.get("accuracy"),
        "n_queries": results.get("n_queries"),
        "n_candidates": results.get("n_candidates"),
        "n_tailpatch_queries": tp.get("n_queries"),
        "lambda_mix": results.get("lambda_mix"),
        "e1_wall_s": results.get("wall_s"),
        "methods": methods,
    }


def evaluate(worlds: Sequence[Mapping], items: Iterable[Finding]) -> list[dict]:
    rows = []
    for fd in items:
        cells = {}
        for w in worlds:
            m = w["methods"]
            if fd.a not in m or fd.b not in m:
                cells[w["name"]] = None
                continue
            diff, se, n = paired(m[fd.a], m[fd.b], fd.metric)
            cells[w["name"]] = {
                "diff": diff,
                "se": se,
                "n": n,
                "verdict": verdict(diff, se, fd.sign),
            }
        rows.append({**fd.__dict__, "worlds": cells})
    return rows


def _fmt(cell: Mapping | None, metric: str) -> str:
    if cell is None or cell["n"] == 0:
        return "–"
    digits = 2 if metric.startswith("tailpatch") else 3  # MRR, recall, precision, LDS: 3.
    se = "–" if math.isnan(cell["se"]) else f"{cell['se']:.{digits}f}"
    return f"{cell['verdict']} ({cell['diff']:+.{digits}f} ± {se})"


def _fmt_wall(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    return f"{seconds / 60:.1f} min" if seconds >= 120 else f"{seconds:.0f} s"


def markdown(worlds: Sequence[Mapping], rows: Sequence[Mapping], wall: Mapping[str, float]) -> str:
    names = [w["name"] for w in worlds]
    lines = [
        "| | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
        "| greedy accuracy (task queries) | "
        + " | ".join("–" if w["accuracy"] is None else f"{w['accuracy']:.3f}" for w in worlds)
        + " |",
        "| queries / tail-patched | "
        + " | ".join(f"{w['n_queries']} / {w['n_tailpatch_queries']}" for w in worlds)
        + " |",
        "| λ (auto_trace) | "
        + " | ".join("–" if w["lambda_mix"] is None else f"{w['lambda_mix']:.3f}" for w in worlds)
        + " |",
        "| E1 command wall time (results.json) | "
        + " | ".join(_fmt_wall(w["e1_wall_s"]) for w in worlds)
        + " |",
    ]
    if wall:
        lines.append(
            "| end-to-end wall time | " + " | ".join(_fmt_wall(wall.get(n)) for n in names) + " |"
        )
    lines += ["", "| finding (claim from) | " + " | ".join(names) + " |"]
    lines.append("|---|" + "---|" * len(names))
    for r in rows:
        cells = [_fmt(r["worlds"][n], r["metric"]) for n in names]
        lines.append(f"| {r['label']} ({r['source']}) | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Cells: verdict (paired diff ± se), diff = first-named method minus the second (for "
        "'X > Y' / 'X < Y': X - Y); MRR, Recall@10 and Precision@10 over every query, "
        "tail-patch in pp over the tail-patched queries; LDS rows (when given) from E8's "
        "smaller world of the same kind, over its task queries. yes = the claimed sign beyond "
        "2 se, no = the opposite sign beyond 2 se, tie = within 2 se.",
    ]
    return "\n".join(lines) + "\n"


def _parse_pairs(items: Sequence[str], flag: str, kind=float) -> dict:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"{flag} takes WORLD=VALUE, got {item!r}")
        out[name] = kind(value)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="*", default=list(DEFAULT_RUN_DIRS))
    parser.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    parser.add_argument(
        "--lds",
        action="append",
        default=[],
        metavar="WORLD=E8_RUN_DIR",
        help="add LDS rows from an E8 run of that world's kind (repeatable)",
    )
    parser.add_argument(
        "--wall",
        action="append",
        default=[],
        metavar="WORLD=SECONDS",
        help="end-to-end wall time of a world (measured outside; repeatable)",
    )
    args = parser.parse_args(argv)
    wall = _parse_pairs(args.wall, "--wall")
    missing = [
        d
        for d in args.run_dirs
        if not os.path.exists(os.path.join(d, "experiments/e1/results.json"))
    ]
    if missing:
        sys.exit(f"no experiments/e1/results.json in {missing}; run trackstar run there first")
    worlds = [load_world(d) for d in args.run_dirs]
    rows = evaluate(worlds, findings())
    rows += lds_rows(_parse_pairs(args.lds, "--lds", str), [w["name"] for w in worlds])
    if args.json:
        info = [{k: v for k, v in w.items() if k != "methods"} for w in worlds]
        for w in info:
            w["wall_s"] = wall.get(w["name"])
        print(json.dumps({"worlds": info, "findings": _no_nan(rows)}, indent=1))
    else:
        print(markdown(worlds, rows, wall), end="")
    return 0


def _no_nan(obj):
    if isinstance(obj, float):
        return None if math.isnan(obj) else obj
    if isinstance(obj, Mapping):
        return {k: _no_nan(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_no_nan(v) for v in obj]
    return obj


if __name__ == "__main__":
    sys.exit(main())
