"""E4 (paper Fig. 2 right): the comparison across model sizes, or along one training run.

Each variant of ``experiment.variants`` trains (or resumes) in its own run dir and is ranked,
evaluated and tail-patched as in E1. Variants that differ only in ``train.checkpoint_step``
are checkpoints of one trajectory: each starts from a copy of the latest checkpoint at or before
its step that the run dir or an earlier variant holds (``checkpoint.copy_step``), so the sweep
trains the run once (configs/e4_checkpoints.py).
"""

from __future__ import annotations

import copy
import os
import time

import ml_collections

from trackstar import checkpoint, report, stages
from trackstar import model as model_lib
from trackstar import train as train_lib
from trackstar.experiments import e3
from trackstar.experiments.evaluation import methods_from, paired_rows, retrieval_results
from trackstar.experiments.harness import (
    GROUND_TRUTH,
    cutoffs,
    experiment_section,
    with_overrides,
    write_results,
)


def variant_configs(cfg: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
    """``experiment.variants`` as full configs: overrides applied, ``run_dir_suffix`` (a
    variant's own run dir beside the base one, whatever run_dir is set to) appended."""
    out = {}
    for name, overrides in experiment_section(cfg).variants.items():
        overrides = overrides.to_dict() if hasattr(overrides, "to_dict") else dict(overrides)
        suffix = overrides.pop("run_dir_suffix", "")
        vcfg = with_overrides(cfg, overrides)
        if suffix:
            vcfg.run_dir = cfg.run_dir + suffix
        out[name] = vcfg
    return out


def trajectory_key(cfg: ml_collections.ConfigDict) -> str:
    """Equal for runs on one trajectory: same seed, world, tokenizer, model and training
    (``train.checkpoint_step`` and other bookkeeping fields aside)."""
    return stages.config_key(
        cfg.seed,
        *(stages.config_section(cfg, s) for s in ("world", "tokenizer", "model")),
        train_lib.train_config_fingerprint(cfg.train),
    )


def seed_from_earlier(vcfg: ml_collections.ConfigDict, earlier: list) -> int | None:
    """Copies into ``vcfg``'s empty checkpoint dir the latest checkpoint at or before its
    ``final_step`` held by an ``earlier`` run on the same trajectory; returns its step."""
    dst = stages.path(vcfg, "checkpoints")
    if checkpoint.latest_step(dst) is not None:
        return None
    key, target = trajectory_key(vcfg), stages.final_step(vcfg)
    best = None
    for ecfg in earlier:
        src = stages.path(ecfg, "checkpoints")
        steps = [s for s in checkpoint.all_steps(src) if s <= target]
        if steps and trajectory_key(ecfg) == key and (best is None or steps[-1] > best[1]):
            best = (src, steps[-1])
    if best is None:
        return None
    checkpoint.copy_step(best[0], dst, best[1])
    return best[1]


def smaller_d_rows(vcfg: ml_collections.ConfigDict, progress: bool = True) -> dict[str, dict]:
    """``experiment.e4_dims_k``: E3's sub-grid rows of ``experiment.tailpatch_methods`` at
    d = k·k (ranked, evaluated and tail-patched) as ``{"<method> d=<d>": row}``; {} when unset.
    """
    ks = tuple(int(k) for k in experiment_section(vcfg).get("e4_dims_k", ()))
    if not ks:
        return {}
    e3cfg = copy.deepcopy(vcfg)
    with e3cfg.experiment.unlocked():
        e3cfg.experiment.name = "e3"
        e3cfg.experiment.output_name = ""  # E3's own folder in the variant's run dir.
        e3cfg.experiment.k_values = ks
        e3cfg.experiment.methods = tuple(e3cfg.experiment.tailpatch_methods)
        e3cfg.experiment.e3_full_dims_k = ()
    rows = e3.run(e3cfg, progress=progress)["methods"]
    return {f"{m} d={d}": row for m, by_d in rows.items() for d, row in by_d.items()}


def run(cfg: ml_collections.ConfigDict, progress: bool = True) -> dict:
    """E4 (paper Fig. 2 right): the comparison across model sizes.

    ``experiment.variants`` maps a name to config overrides (``model`` sizes, and its own run
    dir as ``run_dir`` or ``run_dir_suffix`` appended to the base one); each variant is trained
    (or resumed) in its run dir on the same world.
    """
    t0 = time.perf_counter()
    ex = experiment_section(cfg)
    methods = methods_from(cfg, ("bm25", "random", "grad_cosine", "exp_opt_norm", "trackstar"))
    configs = variant_configs(cfg)
    at_k, k_max = cutoffs(cfg)
    pairs = [(str(a), str(b)) for a, b in ex.get("paired", ())]
    trained_runs: list[ml_collections.ConfigDict] = [cfg]  # The run dir may hold the steps.
    variants: dict[str, dict] = {}
    # Earliest step first, so each checkpoint of a trajectory resumes from the one before.
    for name in sorted(configs, key=lambda n: stages.final_step(configs[n])):
        vcfg = configs[name]
        stages.stage_world(vcfg)
        seeded = seed_from_earlier(vcfg, trained_runs)
        acc = stages.stage_train(vcfg, progress=progress)
        trained_runs.append(vcfg)
        trained = stages.load_trained(vcfg)
        res, per_query, _ = retrieval_results(
            vcfg, "candidates", methods, trained, progress=progress
        )
        res["paired"] = paired_rows(per_query, pairs, ("mrr", f"tailpatch@{k_max}"))
        res["methods"].update(smaller_d_rows(vcfg, progress))
        res["n_params"] = model_lib.count_params(trained.params)
        res["step"] = int(trained.step)
        res["copied_step"] = seeded  # Copied in this call; None when the run dir had it.
        res["accuracy_report"] = acc
        res["run_dir"] = vcfg.run_dir
        variants[name] = res
    # The config's order (ConfigDict sorts names), steps ascending: step250 before step1000.
    variants = {name: variants[name] for name in sorted(configs, key=lambda n: variants[n]["step"])}
    results = {
        "experiment": ex.name,
        "variants": variants,
        "wall_s": time.perf_counter() - t0,
    }
    body = []
    sweeps = {}
    for name, res in variants.items():
        rows = dict(res["methods"], **{GROUND_TRUTH: res["ground_truth"]})
        for method, r in rows.items():
            head = [name, res["n_params"], res["step"], f"{res['accuracy']:.3f}", method]
            body.append([*head, *report.metric_cells(r, at_k, k_max)])
        sweeps.update({f"{name}: {m}": s for m, s in report.sweeps_of(rows).items()})
    md = "\n\n".join(
        [
            f"## E4: {ex.get('title', 'across model sizes')}",
            report.markdown_table(
                [
                    "model",
                    "params",
                    "step",
                    "greedy acc.",
                    "method",
                    *report.metric_headers(at_k, k_max),
                ],
                body,
            ),
            f"Tail-patch@{k_max} (pp) over lr multipliers:\n\n"
            + report.sweep_markdown(sweeps, f"tailpatch@{k_max}"),
        ]
    )
    if pairs:
        md += "\n\nPaired over queries (experiment.paired):\n\n" + report.paired_table(
            [dict(p, model=name) for name, res in variants.items() for p in res["paired"]],
            [
                ("model", lambda p: p["model"]),
                ("comparison", report.comparison),
                ("metric", lambda p: p["metric"]),
            ],
        )
    out = write_results(cfg, results, md)
    names = list(variants)
    if len({variants[n]["step"] for n in names}) > 1:
        extra = [m for m in variants[names[0]]["methods"] if m not in methods]
        _by_step_charts(variants, [*methods, *extra, GROUND_TRUTH], k_max, out)
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


def _by_step_charts(variants: dict, methods: list[str], k_max: int, out: str) -> None:
    """MRR and tail-patch@k_max against the checkpoint step, labelled with the model's greedy
    accuracy on the task queries: where attribution stops working as facts are memorized."""
    names = sorted(variants, key=lambda n: variants[n]["step"])
    rows = {
        n: dict(variants[n]["methods"], **{GROUND_TRUTH: variants[n]["ground_truth"]})
        for n in names
    }
    x = [variants[n]["step"] for n in names]
    ticks = [f"{variants[n]['step']}\n{variants[n]['accuracy']:.0%}" for n in names]
    for metric, label in (("mrr", "MRR"), (f"tailpatch@{k_max}", f"tail-patch@{k_max} (pp)")):
        present = [m for m in methods if all(metric in rows[n].get(m, {}) for n in names)]
        report.line_chart(
            x,
            report.metric_series(rows, names, present, metric),
            "checkpoint step\n(greedy accuracy on the task queries)",
            label,
            f"E4: {label} along training",
            os.path.join(out, f"{metric.replace('@', '_at_')}_by_step.png"),
            xticklabels=ticks,
        )
