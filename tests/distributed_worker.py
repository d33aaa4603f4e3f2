"""Subprocess worker for tests/test_distributed.py.

``XLA_FLAGS=--xla_force_host_platform_device_count=N`` must be set before JAX is imported, so
the multi-device run happens here, in a fresh process, and is reported as an npz; the test
asserts.

    python tests/distributed_worker.py ROOT OUT.npz --data D --model M

One tiny trained run (configs/tiny.py, fewer steps) is copied into two run dirs before any
featurize; both go through the same ``trackstar.stages`` calls (featurize, hessian, score):
``ROOT/single`` with ``mesh.data = mesh.model = 1`` (one device) and ``ROOT/mesh`` on a D x M
mesh of this process's devices. Then the mesh run's stores are renamed to a tagged pair and its
Hessian and score stages run again with those tags.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

STORES = ("candidates", "task")
TRAIN_TAG, QUERY_TAG = "t1", "q1"
STORE_KEYS = ("train_store", "eval_store")


def _proponents(out: dict, name: str, jsonl: str) -> None:
    """The proponents files a score stage wrote: name, jsonl rows and the npz arrays."""
    out[f"{name}_proponents_name"] = os.path.basename(jsonl)
    with open(jsonl) as f:
        out[f"{name}_proponents_rows"] = json.dumps([json.loads(line) for line in f])
    with np.load(jsonl[: -len(".jsonl")] + ".npz") as f:
        for k in f.files:
            out[f"{name}_proponents_npz_{k}"] = f[k]


def config(run_dir: str):
    from trackstar.config import load_config_file

    cfg = load_config_file(os.path.join(ROOT, "configs", "tiny.py"))
    cfg.run_dir = run_dir
    cfg.world.n_subjects = 12  # ~200 candidates instead of 660
    cfg.world.n_distractor_candidates = 8
    cfg.world.n_queries = 12  # two task chunks of 8, the last one partial
    cfg.world.n_heldout_queries = 8
    cfg.train.steps = 4  # a real AdamW state (v̂ not uniform), not a useful model
    cfg.train.warmup_steps = 2
    cfg.train.checkpoint_every = 4
    cfg.featurize.chunk_size = 8  # several chunks per store (the task store: two)
    cfg.hessian.eval_source = "task"
    return cfg


_T0 = time.time()


def _log(what: str) -> None:
    print(f"[distributed_worker] {time.time() - _T0:6.1f} s  {what}", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("out")
    ap.add_argument("--data", type=int, default=2)
    ap.add_argument("--model", type=int, default=2)
    args = ap.parse_args()

    import jax

    from trackstar import hessian, stages, store

    single = config(os.path.join(args.root, "single"))
    single.mesh.data, single.mesh.model = 1, 1
    stages.stage_world(single)
    _log("world")
    stages.stage_train(single, progress=False)
    _log("train")
    mesh = config(os.path.join(args.root, "mesh"))
    shutil.copytree(single.run_dir, mesh.run_dir)  # same world, checkpoint and tokenizer
    mesh.mesh.data, mesh.mesh.model = args.data, args.model
    # This world's vocabulary (225) divides by no model axis: replicate the output layer.
    mesh.mesh.rule_overrides = ("(^|/)unembed/=",)

    out: dict[str, object] = {"devices": jax.device_count()}
    trained = stages.load_trained(single)
    out["has_taps"] = callable(getattr(trained.apply_fn, "tapped", None))

    for which in STORES:
        p1 = stages.stage_featurize(single, which, trained=trained, progress=False)
        p2 = stages.stage_featurize(mesh, which, trained=trained, progress=False)
        for name, p in (("single", p1), ("mesh", p2)):
            vs = store.VectorStore.open(p)
            out[f"{name}_{which}_ids"], out[f"{name}_{which}_vecs"] = vs.read_all()
            out[f"{name}_{which}_meta"] = json.dumps(vs.meta.to_dict(), sort_keys=True)
            out[f"{name}_{which}_name"] = os.path.basename(p)
        _log(f"featurize {which}")

    fits = {
        "single": hessian.HessianFit.load(stages.stage_hessian(single)),
        "mesh": hessian.HessianFit.load(stages.stage_hessian(mesh)),
    }
    _log("hessian")
    for name, fit in fits.items():
        out[f"{name}_lambda"] = fit.lambda_mix
        out[f"{name}_eigenvalues"] = fit.eigenvalues
        out[f"{name}_transform_names"] = json.dumps(sorted(fit.transforms))
        for t, m in fit.transforms.items():
            out[f"{name}_T_{t}"] = m

    res = stages.stage_score(single, progress=False)
    out["single_ids"], out["single_scores"] = res["ids"], res["scores"]
    mres = stages.stage_score(mesh, progress=False)
    out["mesh_ids"], out["mesh_scores"] = np.asarray(mres["ids"]), np.asarray(mres["scores"])
    _log("score")
    _proponents(out, "single", res["path"])
    _proponents(out, "mesh", mres["path"])

    # Tags: the mesh run's untagged stores are renamed to a tagged pair (so only the tagged
    # ones exist), then the Hessian and score stages run on the mesh with those tags.
    for which, tag in (("candidates", TRAIN_TAG), ("task", QUERY_TAG)):
        os.rename(stages.store_path(mesh, which, True), stages.store_path(mesh, which, True, tag))
    tags = {"train_tag": TRAIN_TAG, "query_tag": QUERY_TAG}
    hpath = stages.stage_hessian(mesh, **tags)
    out["tagged_hessian_name"] = os.path.basename(hpath)
    out["tagged_hessian_stores"] = json.dumps(
        [os.path.basename(hessian.HessianFit.load(hpath).provenance[k]) for k in STORE_KEYS]
    )
    tres = stages.stage_score(mesh, progress=False, **tags)
    _proponents(out, "tagged", tres["path"])
    _log("tagged hessian + score")
    for name, cfg in (("single", single), ("mesh", mesh)):
        results = os.path.join(cfg.run_dir, "results")
        files = sorted(f for f in os.listdir(results) if f.startswith("proponents"))
        out[f"{name}_proponents_files"] = json.dumps(files)
    np.savez(args.out, **out)


if __name__ == "__main__":
    main()
