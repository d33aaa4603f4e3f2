"""Multi-host pipeline stages: featurize, fit R and score on a mesh (docs/scaling.md).

The same stores and Hessian files as ``trackstar.stages``, made by every process of a
``jax.distributed`` run: featurize splits the store's chunks over processes (each process on
its own devices, or on the global mesh), R is one sharded reduction over every device, and
scoring shards the train rows over every device. Process 0 writes the shared outputs.
"""

from __future__ import annotations

import os

import jax
import ml_collections

from trackstar import score, sharding, stages


def stage_featurize_distributed(
    cfg: ml_collections.ConfigDict,
    which: str,
    corrected: bool = True,
    trained: stages.Trained | None = None,
    progress: bool = True,
    tag: str = "",
) -> str:
    """``stages.stage_featurize`` on the mesh of ``cfg.mesh``, chunks split over processes.

    The store (path and metadata) is the one the single-process stage makes, so either can
    resume the other's partial store.
    """
    trained = trained or stages.load_trained(cfg)
    job = stages.prepare_featurize(cfg, which, corrected, trained, tag)
    if job.store.is_complete:
        return job.store.path
    mesh = sharding.mesh_from_config(cfg.mesh, scope=cfg.mesh.featurize_scope)
    shardings = sharding.param_shardings(trained.params, mesh, sharding.rules_from_config(cfg.mesh))
    feature_fn = sharding.make_sharded_feature_fn(
        trained.apply_fn, job.output_fn, job.projector, job.preconditioner, mesh, shardings
    )
    sharding.featurize_distributed(
        feature_fn,
        sharding.place(trained.params, shardings),
        job.examples,
        job.store,
        cfg.featurize.batch_size,
        skip_bad_examples=cfg.featurize.skip_bad_examples,
        progress=progress,
        desc=f"featurize {which}",
    )
    return job.store.path


def stage_hessian_distributed(
    cfg: ml_collections.ConfigDict, candidates: str = "candidates", corrected: bool = True
) -> str:
    """``stages.stage_hessian`` with both Gauss-Newton sums reduced over the global mesh."""
    mesh = sharding.mesh_from_config(cfg.mesh)
    train_store = stages.open_store(stages.store_path(cfg, candidates, corrected))
    # Checked before the sharded reductions (fit_from_moments checks again after them).
    eval_store = stages.open_store(
        stages.store_path(cfg, cfg.hessian.eval_source, corrected),
        train_store.meta,
        ("train", "R_eval"),
    )
    fit = sharding.fit_hessian_sharded(
        train_store,
        eval_store,
        cfg.hessian,
        train_store.dim,
        mesh,
        provenance={"train_store": train_store.path, "eval_store": eval_store.path},
    )
    out = stages.hessian_path(cfg, candidates, corrected)
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(out), exist_ok=True)
        fit.save(out)
    sharding.barrier("trackstar-hessian-saved")
    return out


def stage_score_distributed(
    cfg: ml_collections.ConfigDict, preset: str | None = None, candidates: str = "candidates"
):
    """Top-k proponents of the task queries, train rows sharded over the global mesh.

    Returns ``(ids_QxK, scores_QxK)`` on every process (the same on each).
    """
    from trackstar import hessian

    preset = preset or cfg.score.preset
    spec = score.get_preset(preset)
    mesh = sharding.mesh_from_config(cfg.mesh)
    train_store = stages.open_store(stages.store_path(cfg, candidates, spec.corrected))
    query_store = stages.open_store(
        stages.store_path(cfg, "task", spec.corrected), train_store.meta, ("train", "query")
    )
    fit = None
    if spec.hessian != "none":
        fit = hessian.HessianFit.load(stages.hessian_path(cfg, candidates, spec.corrected))
        fit.check_compatible(train_store.meta.to_dict(), "the train store")
    return sharding.score_preset_sharded(
        train_store, query_store, preset, fit, cfg.score.top_k, mesh
    )
