"""Multi-host pipeline stages: featurize, fit R and score on a mesh (docs/scaling.md).

The same stores, Hessian files and proponents files as ``trackstar.stages`` (named, opened,
checked and written by its code), made by every process of a ``jax.distributed`` run:
featurize splits the store's chunks over processes (each process on its own devices, or on
the global mesh), R is one sharded reduction over every device, and scoring shards the train
rows over every device. Process 0 writes the shared outputs.
"""

from __future__ import annotations

import os

import jax
import ml_collections

from trackstar import sharding, stages


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
    cfg: ml_collections.ConfigDict,
    candidates: str = "candidates",
    corrected: bool = True,
    train_tag: str = "",
    query_tag: str = "",
) -> str:
    """``stages.stage_hessian`` with both Gauss-Newton sums reduced over the global mesh.

    The same stores (``train_tag`` / ``query_tag`` as there, opened by
    ``stages.hessian_stores``) and the same Hessian file (``stages.hessian_path``).
    """
    mesh = sharding.mesh_from_config(cfg.mesh)
    train_store, eval_store = stages.hessian_stores(
        cfg, candidates, corrected, train_tag, query_tag
    )
    fit = sharding.fit_hessian_sharded(
        train_store,
        eval_store,
        cfg.hessian,
        train_store.dim,
        mesh,
        provenance={"train_store": train_store.path, "eval_store": eval_store.path},
    )
    out = stages.hessian_path(cfg, candidates, corrected, train_tag, query_tag)
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(out), exist_ok=True)
        fit.save(out)
    sharding.barrier("trackstar-hessian-saved")
    return out


def stage_score_distributed(
    cfg: ml_collections.ConfigDict,
    preset: str | None = None,
    candidates: str = "candidates",
    train_tag: str = "",
    query_tag: str = "",
) -> dict:
    """``stages.stage_score`` with the train rows sharded over the global mesh.

    The same inputs (``stages.score_inputs``, tags as there) and the same proponents files
    (``stages.write_score_results``, written by process 0). Returns
    ``{"ids", "scores", "path"}`` on every process (the same on each).
    """
    preset = preset or cfg.score.preset
    mesh = sharding.mesh_from_config(cfg.mesh)
    inputs = stages.score_inputs(cfg, preset, candidates, train_tag, query_tag)
    ids, scores = sharding.score_preset_sharded(
        inputs.train_store, inputs.query_store, preset, inputs.fit, cfg.score.top_k, mesh
    )
    if jax.process_index() == 0:
        result = stages.write_score_results(
            cfg, candidates, preset, ids, scores, train_tag, query_tag
        )
    else:
        out = stages.proponents_path(cfg, candidates, preset, train_tag, query_tag)
        result = {"ids": ids, "scores": scores, "path": out + ".jsonl"}
    sharding.barrier("trackstar-proponents-saved")
    return result
