"""Does the step_influence score predict the tail-patch gain? (docs/method.md, step_influence)

    python scripts/step_influence_check.py                      # runs/demo, 50 queries
    python scripts/step_influence_check.py --n-queries 20 --json out.json
    python scripts/step_influence_check.py --config configs/e1.py --config.run_dir=runs/other

On a trained and featurized run (default: E1's config, ``runs/demo``): ranks the candidates with
``step_influence`` (``harness.rank``: E1's cached ranking), takes ``--n-queries`` task queries
evenly spaced over the buckets (``Setup.tailpatch_index``) and their top ``--k`` proponents, and
tail-patches each pair at every ``--multipliers`` step (``evaluation.tailpatch_deltas``, with
the run's η, scale and correction; cached like E1's). The first-order prediction of a step at
multiplier μ is

    Δlog p ≈ μ · η · s · score            Δp ≈ p · (exp(Δlog p) − 1)

with s the tail-patch scale (1 / counted tokens per batch for ``batch_share``, 1 / the
proponent's own counted tokens for ``single``). Prints, per multiplier, the Pearson and
Spearman correlations of predicted vs measured Δp and Δlog p over all (query, proponent)
pairs, and the least-squares slope (through 0) of measured on predicted Δlog p (1 = exact
first order); ``--json`` also writes them.
"""

from __future__ import annotations

import time

import numpy as np
from _cli import parse
from scipy import stats

from trackstar import losses, stages
from trackstar.experiments import evaluation, harness
from trackstar.files import write_json

METHOD = "step_influence"


def _args(p):
    p.add_argument("--n-queries", type=int, default=50, help="task queries (evenly spaced)")
    p.add_argument("--k", type=int, default=10, help="top proponents per query")
    p.add_argument(
        "--multipliers",
        default="0.01,0.1,1",
        help="comma-separated tail-patch learning-rate multipliers",
    )
    p.add_argument("--json", default=None, help="also write the table to this JSON file")


def _target_logprob(setup: harness.Setup, index: np.ndarray, batch: int = 64) -> np.ndarray:
    """log p(target | prompt) of the queries at ``index`` (the tail-patch's own quantity)."""
    t = setup.trained
    out = []
    for s in range(0, len(index), batch):
        rows = index[s : s + batch]
        tokens, weights = setup.query_tokens_QxT[rows], setup.query_weights_QxT[rows]
        out.append(
            np.asarray(losses.sequence_logprob(t.apply_fn(t.params, tokens), tokens, weights))
        )
    return np.concatenate(out).astype(np.float64)


def _scores(cfg, ids_QxK: np.ndarray) -> np.ndarray:
    """The step_influence scores of ``ids_QxK`` from the score stage's proponents file (the
    ranking ``harness.rank`` cached was read from the same scoring)."""
    path = stages.proponents_path(cfg, "candidates", METHOD) + ".npz"
    with np.load(path) as f:
        ids, scores = f["ids"], f["scores"]
    k = ids_QxK.shape[1]
    if not np.array_equal(ids[:, :k], ids_QxK):
        raise SystemExit(f"{path} does not hold the cached ranking; rerun the score stage")
    return scores[:, :k].astype(np.float64)


def _correlations(pred: np.ndarray, meas: np.ndarray) -> dict:
    ok = np.isfinite(pred) & np.isfinite(meas)
    x, y = pred[ok], meas[ok]
    return {
        "pearson": float(stats.pearsonr(x, y).statistic),
        "spearman": float(stats.spearmanr(x, y).statistic),
    }


def main() -> None:
    cfg, args = parse(__doc__, _args, default_config="configs/e1.py")
    if cfg.tailpatch.carry_momentum:
        raise SystemExit("tailpatch.carry_momentum steps are not the preconditioned step predicted")
    mults = tuple(float(m) for m in args.multipliers.split(","))
    # The tail-patch cache is keyed by the tailpatch section, so these overrides get their own.
    cfg.tailpatch.n_queries = int(args.n_queries)
    cfg.tailpatch.lr_multipliers = mults
    cfg.tailpatch.ks = (int(args.k),)
    t0 = time.perf_counter()
    setup = harness.make_setup(cfg, "candidates")
    ranked = harness.rank(setup, METHOD)
    index = setup.tailpatch_index
    ids = ranked[index, : args.k]
    scores = _scores(cfg, ranked[:, : args.k])[index]
    deltas_MxQxK = evaluation.tailpatch_deltas(setup, ranked)
    p = np.exp(_target_logprob(setup, index))[:, None]
    if cfg.tailpatch.scale == "batch_share":
        s = np.full(ids.shape, 1.0 / setup.counted_tokens_per_batch)
    else:
        s = 1.0 / np.maximum(setup.cand_weights_NxS[ids].sum(axis=2), 1.0)
    rows = []
    for mult, dp in zip(mults, deltas_MxQxK, strict=True):
        pred_dlogp = mult * setup.lr * s * scores
        pred_dp = p * np.expm1(pred_dlogp)
        meas_dlogp = np.log1p(dp / p)
        x, y = pred_dlogp.ravel(), meas_dlogp.ravel()
        ok = np.isfinite(x) & np.isfinite(y)
        rows.append(
            {
                "lr_multiplier": mult,
                "dp": _correlations(pred_dp.ravel(), dp.ravel()),
                "dlogp": _correlations(x, y),
                "slope_dlogp": float(x[ok] @ y[ok] / (x[ok] @ x[ok])),
                "mean_pred_dlogp": float(np.nanmean(x)),
                "mean_meas_dlogp": float(np.nanmean(y)),
            }
        )
    result = {
        "run_dir": str(cfg.run_dir),
        "method": METHOD,
        "n_queries": len(index),
        "k": int(args.k),
        "pairs": int(np.isfinite(deltas_MxQxK[0]).sum()),
        "lr": setup.lr,
        "scale": str(cfg.tailpatch.scale),
        "counted_tokens_per_batch": setup.counted_tokens_per_batch,
        "rows": rows,
        "seconds": time.perf_counter() - t0,
    }
    print(
        f"step_influence vs tail-patch on {result['run_dir']}: {result['n_queries']} queries x "
        f"top {result['k']} ({result['pairs']} pairs), lr {setup.lr:g}, scale {result['scale']}"
    )
    print(
        "| lr mult | Δp Pearson | Δp Spearman | Δlog p Pearson | Δlog p Spearman | "
        "slope Δlog p | mean pred Δlog p | mean meas Δlog p |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['lr_multiplier']:g} | {r['dp']['pearson']:.3f} | {r['dp']['spearman']:.3f} | "
            f"{r['dlogp']['pearson']:.3f} | {r['dlogp']['spearman']:.3f} | "
            f"{r['slope_dlogp']:.3f} | {r['mean_pred_dlogp']:.3g} | {r['mean_meas_dlogp']:.3g} |"
        )
    print(f"({result['seconds']:.0f} s)")
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
