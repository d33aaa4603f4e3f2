"""E3 (paper Fig. 2 left): MRR and tail-patch vs projection dimension d = k·k.

Smaller d are exact ``subgrid``s of the stored global-mode ``featurize.k_in x k_out`` vectors;
their rankings are cached as ``rank_candidates_<method>-k<k>``. Sides beyond the stored grid
(``experiment.e3_full_dims_k``) are featurized on their own into stores tagged ``k<k>``.
"""

from __future__ import annotations

import math
import os
import time

import ml_collections
import numpy as np

from trackstar import hessian, report, score, stages
from trackstar.experiments.evaluation import (
    evaluate,
    methods_from,
    paired_rows,
    tailpatch_info,
)
from trackstar.experiments.harness import (
    ExperimentError,
    cutoffs,
    ensure_stores,
    experiment_section,
    make_setup,
    rank,
    with_overrides,
    write_results,
)


def subgrid(vectors_NxD: np.ndarray, k_in: int, k_out: int, k: int) -> np.ndarray:
    """The top-left ``k x k`` block of global-mode Kronecker vectors, rescaled to variance 1/k.

    A global-mode vector is ``sum_l A_l^T G_l B_l`` flattened row-major from a ``k_in x k_out``
    grid; its ``[:k, :k]`` block is the same sum with only the first ``k`` columns of every
    ``A_l`` and ``B_l``, i.e. an independent Gaussian Kronecker projection to ``d = k^2``. The
    factor ``sqrt(k_in/k) * sqrt(k_out/k)`` restores the ``1/k`` entry variance (E[PᵀP] = I).
    """
    n = vectors_NxD.shape[0]
    if vectors_NxD.shape[1] != k_in * k_out:
        raise ExperimentError(
            f"vectors have d = {vectors_NxD.shape[1]}, not k_in * k_out = {k_in * k_out}"
        )
    if not 0 < k <= min(k_in, k_out):
        raise ExperimentError(f"sub-grid k = {k} must be in [1, min(k_in, k_out)]")
    grid = np.asarray(vectors_NxD, np.float32).reshape(n, k_in, k_out)[:, :k, :k]
    return grid.reshape(n, k * k) * np.float32(math.sqrt(k_in / k) * math.sqrt(k_out / k))


def full_dim_config(cfg: ml_collections.ConfigDict, k: int) -> ml_collections.ConfigDict:
    """``cfg`` featurizing at ``k x k`` (d = k²): the side of ``experiment.e3_full_dims_k``
    beyond the stored grid. Its stores, Hessian fit and rankings go by the tag ``full_dim_tag``."""
    return with_overrides(cfg, {"featurize": {"k_in": int(k), "k_out": int(k)}})


def full_dim_tag(k: int) -> str:
    return f"k{int(k)}"


def run(cfg: ml_collections.ConfigDict, progress: bool = True) -> dict:
    """E3 (paper Fig. 2 left): MRR and tail-patch vs projection dimension d = k·k.

    The stores are featurized once at the config's ``k_in x k_out`` (global mode); every
    smaller d is the ``subgrid`` of those vectors (exact, no re-featurization). Each side in
    ``experiment.e3_full_dims_k`` is featurized on its own (``full_dim_config``: candidate,
    task and R_eval stores tagged ``k<k>``) and ranked through the stages like E1 (its R
    fitted by ``hessian.fit_hessian``: low-rank when the rows are fewer than d). Methods in
    ``experiment.tailpatch_methods`` are tail-patched at every d.
    """
    t0 = time.perf_counter()
    ex = experiment_section(cfg)
    f = cfg.featurize
    if f.projection_mode != "global":
        raise ExperimentError(
            "E3 sub-grids global-mode vectors; set featurize.projection_mode = 'global'"
        )
    methods = methods_from(cfg, ("grad_cosine", "exp_opt_norm", "trackstar"))
    tp_methods = set(ex.get("tailpatch_methods", ("trackstar",)))
    ks = sorted(int(k) for k in ex.k_values)
    full_ks = sorted(int(k) for k in ex.get("e3_full_dims_k", ()))
    too_small = [k for k in full_ks if k <= min(f.k_in, f.k_out)]
    if too_small:
        raise ExperimentError(
            f"experiment.e3_full_dims_k {too_small} are within the stored "
            f"{f.k_in}x{f.k_out} grid; list them in experiment.k_values (sub-grids)"
        )
    setup = make_setup(cfg, "candidates")
    vectors: dict[tuple[bool, str], np.ndarray] = {}

    def read(spec: score.PresetSpec, which: str) -> np.ndarray:
        # The task queries take the query side's correction (step_influence scores raw query
        # gradients against corrected candidates); R's stores take the candidates'.
        corrected = spec.query_side_corrected if which == "task" else spec.corrected
        if (corrected, which) not in vectors:
            # The sub-grid vectors go into R and scores as plain arrays, which carry no
            # metadata to check later: every store must match the candidate store here.
            ref = stages.open_store(stages.store_path(cfg, "candidates", spec.corrected))
            st = stages.open_store(stages.store_path(cfg, which, corrected))
            score.check_query_meta(spec, ref.meta, st.meta, ("candidates", which))
            vectors[(corrected, which)] = np.asarray(st.read_all()[1], np.float32)
        return vectors[(corrected, which)]

    rows: dict[str, dict[str, dict]] = {m: {} for m in methods}
    per_query: dict[tuple[str, int], dict[str, np.ndarray]] = {}
    for method in methods:
        spec = score.get_preset(method)
        ensure_stores(
            cfg, setup.trained, "candidates", spec.corrected, query_corrected=spec.query_corrected
        )
        for k in ks:
            d = k * k
            if k == f.k_in == f.k_out:
                ids = rank(setup, method, progress=progress)  # the stored d: E1's ranking
            else:
                key = stages.config_key(
                    method,
                    k,
                    os.path.abspath(cfg.run_dir),
                    setup.trained.step,
                    [stages.config_section(cfg, s) for s in ("featurize", "hessian", "score")],
                )

                def make(method=method, spec=spec, k=k, d=d) -> np.ndarray:
                    sub = {
                        w: subgrid(read(spec, w), f.k_in, f.k_out, k)
                        for w in ("candidates", "task", cfg.hessian.eval_source)
                    }
                    fit = None
                    if spec.hessian != "none":
                        fit = hessian.fit_hessian(
                            sub["candidates"], sub[cfg.hessian.eval_source], cfg.hessian, d
                        )
                    ids, _ = score.score_preset(
                        sub["candidates"],
                        sub["task"],
                        method,
                        fit,
                        int(cfg.score.top_k),
                        rows_per_step=int(cfg.score.chunk_rows),
                    )
                    return ids

                ids = stages.cached_array(cfg, "rank", f"candidates_{method}-k{k}", key, make)
            row, per_query[(method, d)] = evaluate(setup, ids, with_tailpatch=method in tp_methods)
            rows[method][str(d)] = dict(row, k_in=k, k_out=k, source="subgrid")
    full: dict[str, dict] = {}
    for k in full_ks:
        t_k, cfg_k, tag = time.perf_counter(), full_dim_config(cfg, k), full_dim_tag(k)
        for method in methods:
            ids = rank(setup, method, tag, tag, cfg=cfg_k, progress=progress)
            row, per_query[(method, k * k)] = evaluate(
                setup, ids, with_tailpatch=method in tp_methods
            )
            rows[method][str(k * k)] = dict(row, k_in=k, k_out=k, source="featurized")
        full[str(k * k)] = dict(full_dim_record(cfg_k, tag), wall_s=time.perf_counter() - t_k)
    ds = [k * k for k in ks + full_ks]
    at_k, k_max = cutoffs(cfg)
    paired = [
        dict(p, a=p["a"][0], b=p["b"][0], d=d)
        for d in ds
        for p in paired_rows(
            per_query,
            [((a, d), (b, d)) for i, a in enumerate(methods) for b in methods[i + 1 :]],
            ("mrr", f"tailpatch@{k_max}"),
        )
    ]
    results = {
        "experiment": ex.name,
        "d_values": ds,
        "methods": rows,
        "n_queries": setup.n_queries,
        "tailpatch": tailpatch_info(setup),
        "note": "smaller d = top-left k x k sub-grid of the stored global Kronecker vectors; "
        "d of experiment.e3_full_dims_k featurized on their own (stores tagged k<k>)",
        "featurized_d": full,
        "paired": paired,
        "wall_s": time.perf_counter() - t0,
    }
    md = "\n\n".join(
        [
            f"## E3: quality vs projection dimension d\n\n{setup.n_queries} queries, "
            f"{setup.n_tailpatch} tail-patched; d = k·k from the stored "
            f"{f.k_in}x{f.k_out} grid"
            + "".join(f", d = {k * k} featurized at {k}x{k}" for k in full_ks)
            + ".",
            report.nested_metric_table(
                rows, ["method", "d"], at_k, k_max, lambda m, d: f"{m} d={d}"
            ),
        ]
    )
    if paired:
        md += "\n\nPaired over queries, method against method at the same d:\n\n"
        md += report.paired_table(
            paired,
            [
                ("d", lambda p: p["d"]),
                ("comparison", report.comparison),
                ("metric", lambda p: p["metric"]),
            ],
        )
    out = write_results(cfg, results, md)
    report.line_chart(
        ds,
        {m: ([rows[m][str(d)].get("mrr") for d in ds], None) for m in methods},
        "projection dim d",
        "MRR",
        "E3: MRR vs d",
        os.path.join(out, "mrr_vs_d.png"),
        logx=True,
    )
    tp_series = {
        m: (
            [rows[m][str(d)].get(f"tailpatch@{k_max}") for d in ds],
            [rows[m][str(d)].get(f"tailpatch@{k_max}_se") for d in ds],
        )
        for m in methods
        if m in tp_methods
    }
    if tp_series:
        report.line_chart(
            ds,
            tp_series,
            "projection dim d",
            f"tail-patch@{k_max} (pp)",
            "E3: tail-patch vs d",
            os.path.join(out, "tailpatch_vs_d.png"),
            logx=True,
        )
    results["markdown"] = md
    return results


def full_dim_record(cfg_k: ml_collections.ConfigDict, tag: str) -> dict:
    """The R fits of a featurized d, per correction: low-rank or d×d, rank, rows used (train
    sample + R_eval) and λ, from the saved fits' metadata (absent: no preset used one)."""
    out = {}
    for corrected in (True, False):
        meta = hessian.HessianFit.read_meta(
            stages.hessian_path(cfg_k, "candidates", corrected, tag, tag)
        )
        if meta is None:
            continue
        prov, low_rank = meta.get("provenance", {}), meta.get("low_rank") or {}
        out[stages.correction_kind(cfg_k, corrected)] = {
            "low_rank": bool(low_rank),
            "rank": max((int(v["rank"]) for v in low_rank.values()), default=None),
            "train_rows_used": prov.get("train_rows_used"),
            "eval_rows_used": prov.get("eval_rows_used"),
            "lambda_mix": meta.get("lambda_mix"),
        }
    return out
