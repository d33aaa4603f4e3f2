"""Can one ranking lead on both MRR and tail-patch? TrackStar reranked or mixed with
step_influence (trackstar.experiments.variants), measured with E1's machinery.

    python scripts/variants.py                                  # runs/demo, E1's config
    python scripts/variants.py --standardize z,rank --out runs/demo/experiments/variants
    python scripts/variants.py --config configs/e1.py:tiny --config.run_dir=runs/tiny

On a run with E1's stores and rankings (``harness.rank``'s cache; missing ones are made):
first checks each preset's pair scoring against its own stored top k, then evaluates
(``evaluation.evaluate``: MRR, Recall@k, tail-patch@1 / @max k with the lr sweep, tail-patch
cached by the ranking) the variants

- ``rerank(trackstar by p)``: TrackStar's top K reordered by preset p's score (``--rerank-by``);
- ``mix_<how>(α: trackstar, step_influence)``: the union of both top K ranked by
  α·z_trackstar + (1 − α)·z_step, standardized per query over the union (``--standardize``:
  ``z`` z-score, ``rank`` rank in [0, 1])

beside ``--methods``. Prints a Markdown table, the lr sweep, and per-query paired differences
(mean ± se) of each variant against every listed method on MRR and tail-patch@max k; a
variant *leads* when it beats every listed method on tail-patch@max k and every listed
gradient method on MRR by more than 2 se. ``--out DIR`` writes table.md and results.json,
``--json FILE`` the results.
"""

from __future__ import annotations

import os
import time

import numpy as np
from _cli import parse

from trackstar import report, score
from trackstar.experiments import evaluation, harness, variants
from trackstar.files import write_json, write_text

FIRST, SECOND = "trackstar", "step_influence"
# The paired-difference threshold in standard errors for "leads".
LEAD_SE = 2.0


def _args(p):
    p.add_argument("--alphas", default="0.25,0.5,0.75", help="comma-separated mix weights α")
    p.add_argument(
        "--standardize", default="z", help="comma-separated: z (z-score) and/or rank (rank-based)"
    )
    p.add_argument(
        "--rerank-by",
        default="step_influence,exp_opt",
        help="comma-separated presets that reorder TrackStar's top K ('' for none)",
    )
    p.add_argument(
        "--methods",
        default="trackstar,step_influence,exp_opt,bm25",
        help="comma-separated methods shown beside the variants (harness.ALL_METHODS)",
    )
    p.add_argument("--out", default="", help="write table.md and results.json to this folder")
    p.add_argument("--json", default="", help="also write the results to this JSON file")


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _diff_cell(d: dict) -> str:
    return report.pm(d["mean"], d["se"], 3) + (" *" if _beats(d) else "")


def _beats(d: dict) -> bool:
    """Ahead by more than ``LEAD_SE`` standard errors."""
    return bool(np.isfinite(d["se"]) and d["mean"] > LEAD_SE * d["se"])


def main() -> None:
    cfg, args = parse(__doc__, _args, default_config="configs/e1.py")
    t0 = time.perf_counter()
    methods = _split(args.methods)
    unknown = [m for m in methods if m not in harness.ALL_METHODS]
    if unknown:
        raise SystemExit(f"--methods has unknown {unknown}; use {', '.join(harness.ALL_METHODS)}")
    rerank_by = _split(args.rerank_by)
    alphas = [float(a) for a in _split(args.alphas)]
    how = _split(args.standardize)
    at_k, k_max = harness.cutoffs(cfg)
    tp_key = f"tailpatch@{k_max}"

    setup = harness.make_setup(cfg, "candidates")
    # Pair scoring must reproduce each preset's own ranking scores before it ranks anything.
    checks = {
        p: variants.check_pair_scores(cfg, p, setup.candidates)
        for p in dict.fromkeys([FIRST, SECOND, *rerank_by])
    }
    t_check = time.perf_counter() - t0

    rows, per_query = {}, {}
    for m in methods:
        rows[m], per_query[m] = evaluation.evaluate(setup, harness.rank(setup, m))
    built = variants.build_variants(setup, FIRST, SECOND, alphas, how, rerank_by)
    for name, ids in built.items():
        t = time.perf_counter()
        rows[name], per_query[name] = evaluation.evaluate(setup, ids)
        rows[name]["wall_s"] = time.perf_counter() - t

    # Paired per-query differences of every variant against every listed method.
    gradient = [m for m in methods if m in score.PRESETS]
    diffs = {
        v: {
            m: {
                metric: variants.paired_difference(per_query[v], per_query[m], metric)
                for metric in ("mrr", tp_key)
            }
            for m in methods
        }
        for v in built
    }
    best_tp = max(methods, key=lambda m: rows[m][tp_key])
    best_mrr = max(gradient, key=lambda m: rows[m]["mrr"]) if gradient else None
    leads = {
        v: all(_beats(d[m][tp_key]) for m in methods) and all(_beats(d[m]["mrr"]) for m in gradient)
        for v, d in diffs.items()
    }

    header = (
        f"Variants on {cfg.run_dir} ({setup.n_queries} queries, {len(setup.texts)} candidates; "
        f"tail-patch on {setup.n_tailpatch} queries, lr {setup.lr:g}). Pair scoring vs the "
        "stored top-k scores, largest relative difference: "
        + ", ".join(f"{p} {e:.1e}" for p, e in checks.items())
        + "."
    )
    paired_headers = ["variant"]
    if best_mrr:
        paired_headers.append(f"MRR − {best_mrr}")
    paired_headers += [f"{tp_key} − {best_tp} (pp)", f"{tp_key} − {FIRST} (pp)", "leads"]
    paired_rows = []
    for v, d in diffs.items():
        cells = [v]
        if best_mrr:
            cells.append(_diff_cell(d[best_mrr]["mrr"]))
        cells += [_diff_cell(d[best_tp][tp_key]), _diff_cell(d[FIRST][tp_key])]
        cells.append("yes" if leads[v] else "no")
        paired_rows.append(cells)
    md = "\n\n".join(
        [
            header,
            report.main_table(rows, at_k, k_max),
            report.sweep_section(rows, k_max),
            "Paired differences over queries (mean ± se; * = ahead by more than "
            f"{LEAD_SE:g} se). 'leads': ahead of every listed method on {tp_key} and every "
            f"listed gradient method ({', '.join(gradient)}) on MRR.\n\n"
            + report.markdown_table(paired_headers, paired_rows),
        ]
    )
    results = {
        "run_dir": str(cfg.run_dir),
        "first": FIRST,
        "second": SECOND,
        "alphas": alphas,
        "standardize": how,
        "rerank_by": rerank_by,
        "pair_score_check": checks,
        "methods": rows,
        "paired": diffs,
        "best_tailpatch_method": best_tp,
        "best_mrr_gradient_method": best_mrr,
        "leads": leads,
        "tailpatch": evaluation.tailpatch_info(setup),
        "check_s": t_check,
        "wall_s": time.perf_counter() - t0,
    }
    print(md)
    print(f"\n({results['wall_s']:.0f} s; pair-score checks {t_check:.0f} s)")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        write_text(os.path.join(args.out, "table.md"), md)
        write_json(os.path.join(args.out, "results.json"), harness.jsonable(results))
    if args.json:
        write_json(args.json, harness.jsonable(results))


if __name__ == "__main__":
    main()
