"""Estimated V against the checkpoint's Adam nu on one run (EXPERIMENTS.md, "Estimated V").

    python scripts/v_estimate_compare.py --config configs/e1.py
    python scripts/v_estimate_compare.py --config configs/e1.py \
        --config.featurize.v_estimate_examples=1024

Ranks the closed candidate set with ``--method`` (default ``trackstar``) twice on E1's setup:
with the correction from the checkpoint's nu (E1's own stores and caches) and with the V
estimated at the final parameters (``featurize.correction_source = "estimate"``: stores
``<set>-estimate``, Hessian fit ``candidates-estimate.npz``, so nothing of E1's is rewritten).
Both rankings are evaluated the same way: MRR, Recall@k, Precision@k and tail-patch@k, the
tail-patch step using the checkpoint's own correction (E1's step), so only the ranking differs;
``--estimated-step`` adds the estimated-V ranking tail-patched with the estimated factor.

Also reports the Spearman rank correlation between the two V's over every parameter element
(nu / (1 - b2^t) vs the estimate), and of the two correction factors after the V floor, plus
the median of the per-tensor correlations. Prints a table and writes
``<run_dir>/experiments/v_estimate/results.json``.
"""

from __future__ import annotations

import copy
import json
import os
import time

import numpy as np
from _cli import parse, save_resolved
from scipy import stats

from trackstar import correction, stages
from trackstar.experiments import evaluation, harness
from trackstar.files import write_json
from trackstar.tree import named_leaves


def _args(p):
    p.add_argument("--method", default="trackstar", help="scoring preset to compare")
    p.add_argument(
        "--estimated-step",
        action="store_true",
        help="also tail-patch the estimated-V ranking with the estimated factor",
    )


def _flat(tree) -> tuple[np.ndarray, list[tuple[str, np.ndarray]]]:
    named = [(p, np.asarray(correction.as_scale(x).dense(), np.float64)) for p, x in tree]
    return np.concatenate([x.reshape(-1) for _, x in named]), named


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(stats.spearmanr(a, b).statistic)


def _row(r: dict, k: int) -> dict:
    keys = ("mrr", f"recall@{k}", f"precision@{k}", f"tailpatch@{k}")
    return {key: r.get(key) for key in keys} | {f"{key}_se": r.get(f"{key}_se") for key in keys}


def main() -> None:
    cfg, args = parse(__doc__, _args, default_config="configs/e1.py")
    if stages.correction_source(cfg) != "optimizer":
        raise SystemExit("run with featurize.correction_source = 'optimizer' (the reference)")
    est_cfg = copy.deepcopy(cfg)
    est_cfg.featurize.correction_source = "estimate"
    out_dir = stages.path(cfg, "experiments", "v_estimate")
    os.makedirs(out_dir, exist_ok=True)
    save_resolved(cfg, out_dir)
    t0 = time.perf_counter()

    setup = harness.make_setup(cfg, "candidates")
    trained = setup.trained
    at_k = int(cfg.eval.at_k)
    k_tp = max(int(k) for k in cfg.tailpatch.ks)

    # The two V's and the two factors, elementwise over every parameter.
    t_est = time.perf_counter()
    est, record = stages.v_estimate(est_cfg, trained)
    t_est = time.perf_counter() - t_est
    settings = stages.correction_settings(cfg, trained)
    nu = correction.find_moment_states(trained.opt_state)[0][1].nu
    bias = 1.0 / (1.0 - settings.b2**settings.count)
    v_true, true_named = _flat([(p, np.asarray(x) * bias) for p, x in named_leaves(nu)])
    v_est, est_named = _flat(named_leaves(est.v))
    f_true, _ = _flat(named_leaves(stages.make_preconditioner(cfg, trained)))
    f_est, _ = _flat(named_leaves(stages.make_preconditioner(est_cfg, trained)))
    per_tensor = [
        _spearman(a.reshape(-1), b.reshape(-1))
        for (_, a), (_, b) in zip(true_named, est_named, strict=True)
        if a.size > 1
    ]
    v_stats = {
        "n_elements": int(v_true.size),
        "spearman_v": _spearman(v_true, v_est),
        "spearman_factor": _spearman(f_true, f_est),
        "spearman_v_per_tensor_median": float(np.nanmedian(per_tensor)),
        "n_tensors": len(per_tensor),
        "mean_v_true": float(v_true.mean()),
        "mean_v_est": float(v_est.mean()),
        "zero_share_true": float(np.mean(v_true == 0)),
        "zero_share_est": float(np.mean(v_est == 0)),
        "estimate_s": t_est,
    }

    rows, pq = {}, {}
    ids_true = harness.rank(setup, args.method)
    row, pq["true"] = evaluation.evaluate(setup, ids_true)
    rows["optimizer nu"] = _row(row, at_k)
    ids_est = harness.rank(setup, args.method, cfg=est_cfg)
    row, pq["est"] = evaluation.evaluate(setup, ids_est)
    rows["estimated V"] = _row(row, at_k)
    if args.estimated_step:
        est_setup = harness.make_setup(est_cfg, "candidates", trained)
        rows["estimated V, estimated step"] = _row(evaluation.evaluate(est_setup, ids_est)[0], at_k)
    # Paired differences (estimated - true), per query first.
    paired = {}
    for name in ("mrr", f"recall@{at_k}", f"tailpatch@{k_tp}"):
        d = np.asarray(pq["est"][name], np.float64) - np.asarray(pq["true"][name], np.float64)
        d = d[np.isfinite(d)]
        paired[name] = {"mean": float(d.mean()), "se": float(d.std(ddof=1) / np.sqrt(len(d)))}
    overlap = np.mean(
        [len(set(a[:at_k]) & set(b[:at_k])) / at_k for a, b in zip(ids_true, ids_est, strict=True)]
    )
    results = {
        "method": args.method,
        "estimate": record,
        "estimate_batches": int(est.count),
        "v": v_stats,
        "rows": rows,
        "paired_est_minus_true": paired,
        f"top{at_k}_overlap": float(overlap),
        "n_queries": setup.n_queries,
        "n_tailpatch_queries": setup.n_tailpatch,
        "wall_s": time.perf_counter() - t0,
    }
    write_json(os.path.join(out_dir, "results.json"), results, default=str)
    print(json.dumps(results["estimate"]))
    print(json.dumps(v_stats, indent=1))
    head = f"| {args.method} | MRR | Recall@{at_k} | tail-patch@{k_tp} (pp) |"
    print(head + "\n|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['mrr']:.3f} ± {r['mrr_se']:.3f} | {r[f'recall@{at_k}']:.3f} | "
            f"{r[f'tailpatch@{k_tp}']:+.3f} ± {r[f'tailpatch@{k_tp}_se']:.3f} |"
        )
    print("paired (estimated - true): " + json.dumps(paired))
    print(f"top-{at_k} overlap {overlap:.3f}; wall {results['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
