"""Featurize (and optionally fit R and score) on every process of a multi-host run.

Run the same command on every host (docs/scaling.md); jax.distributed starts from the mesh
config or the TRACKSTAR_* environment, then the stages of trackstar.stages run on the config's
mesh (the same calls as scripts/featurize.py, fit_hessian.py and score.py on one host).
--memory-only prints the per-device memory the config's mesh and rules imply, from shapes
alone (no devices, no checkpoint needed).
"""

import json

from _cli import parse


def _args(p):
    p.add_argument("--sets", default="candidates,task,heldout", help="example sets to featurize")
    p.add_argument("--correction", default="on", choices=["on", "off"], help="V correction")
    p.add_argument("--hessian", action="store_true", help="then fit R (sharded reduction)")
    p.add_argument("--score", action="store_true", help="then score (sharded top-k)")
    p.add_argument("--memory-only", action="store_true", help="print per-device memory, exit")


if __name__ == "__main__":
    cfg, args = parse(__doc__, _args)
    from trackstar import sharding

    if args.memory_only:
        params = sharding.abstract_lm_params(cfg.model, cfg.mesh.memory_vocab_size)
        import jax

        n = jax.device_count() if cfg.mesh.data == -1 else cfg.mesh.data * cfg.mesh.model
        shape = {"data": max(n // cfg.mesh.model, 1), "model": cfg.mesh.model}
        report = sharding.memory_report(
            params,
            sharding.rules_from_config(cfg.mesh, cfg.model),
            shape,
            featurize_batch=cfg.featurize.batch_size,
        )
        print(json.dumps({"mesh": shape, **report}, indent=1))
        raise SystemExit(0)
    from trackstar import multihost

    info = multihost.initialize_distributed(cfg.mesh)
    from trackstar import stages

    trained = stages.load_trained(cfg)
    corrected = args.correction == "on"
    for which in args.sets.split(","):
        out = stages.stage_featurize(cfg, which, corrected, trained=trained)
        if info.process_index == 0:
            print(f"store: {out}")
    if args.hessian:
        out = stages.stage_hessian(cfg, corrected=corrected)
        if info.process_index == 0:
            print(f"hessian: {out}")
    if args.score:
        res = stages.stage_score(cfg)
        if info.process_index == 0:
            print(f"proponents: {res['path']}")
