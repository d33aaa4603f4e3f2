"""E4 (paper Fig. 2 right): the comparison across model sizes on the same world.

Each variant of ``experiment.variants`` trains (or resumes) in its own run dir and is ranked,
evaluated and tail-patched as in E1.
"""

from __future__ import annotations

import time

import ml_collections

from trackstar import model as model_lib
from trackstar import report, stages
from trackstar.experiments.evaluation import methods_from, retrieval_results
from trackstar.experiments.harness import (
    GROUND_TRUTH,
    cutoffs,
    experiment_section,
    with_overrides,
    write_results,
)


def run(cfg: ml_collections.ConfigDict, progress: bool = True) -> dict:
    """E4 (paper Fig. 2 right): the comparison across model sizes.

    ``experiment.variants`` maps a name to config overrides (``model`` sizes, and its own run
    dir as ``run_dir`` or ``run_dir_suffix`` appended to the base one); each variant is trained
    (or resumed) in its run dir on the same world.
    """
    t0 = time.perf_counter()
    ex = experiment_section(cfg)
    methods = methods_from(cfg, ("bm25", "random", "grad_cosine", "exp_opt_norm", "trackstar"))
    variants: dict[str, dict] = {}
    for name, overrides in ex.variants.items():
        overrides = overrides.to_dict() if hasattr(overrides, "to_dict") else dict(overrides)
        # A suffix keeps a variant's run dir beside the base one whatever run_dir is set to.
        suffix = overrides.pop("run_dir_suffix", "")
        vcfg = with_overrides(cfg, overrides)
        if suffix:
            vcfg.run_dir = cfg.run_dir + suffix
        stages.stage_world(vcfg)
        acc = stages.stage_train(vcfg, progress=progress)
        trained = stages.load_trained(vcfg)
        res, _, _ = retrieval_results(vcfg, "candidates", methods, trained, progress=progress)
        res["n_params"] = model_lib.count_params(trained.params)
        res["accuracy_report"] = acc
        res["run_dir"] = vcfg.run_dir
        variants[name] = res
    results = {
        "experiment": ex.name,
        "variants": variants,
        "wall_s": time.perf_counter() - t0,
    }
    at_k, k_max = cutoffs(cfg)
    body = []
    sweeps = {}
    for name, res in variants.items():
        rows = dict(res["methods"], **{GROUND_TRUTH: res["ground_truth"]})
        for method, r in rows.items():
            head = [name, res["n_params"], f"{res['accuracy']:.3f}", method]
            body.append([*head, *report.metric_cells(r, at_k, k_max)])
        sweeps.update({f"{name}: {m}": s for m, s in report.sweeps_of(rows).items()})
    md = "\n\n".join(
        [
            "## E4: across model sizes",
            report.markdown_table(
                ["model", "params", "greedy acc.", "method", *report.metric_headers(at_k, k_max)],
                body,
            ),
            f"Tail-patch@{k_max} (pp) over lr multipliers:\n\n"
            + report.sweep_markdown(sweeps, f"tailpatch@{k_max}"),
        ]
    )
    out = write_results(cfg, results, md)
    names = list(variants)
    groups = [f"{n}\n({variants[n]['n_params'] / 1e6:.2f}M)" for n in names]
    report.metric_bar_charts(
        groups,
        {n: variants[n]["methods"] for n in names},
        names,
        lambda metric: methods,
        k_max,
        "model",
        "E4: {label} by model size",
        out,
        "{metric}_by_model.png",
    )
    results["markdown"] = md
    return results
