"""trackstar.stages on a 2 (data) x 2 (model) mesh of 4 CPU devices agree with the same stages
on a 1-device mesh, on one tiny trained run.

The mesh run needs ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` before JAX is
imported, so both runs happen in one subprocess (tests/distributed_worker.py: the 1-device run
there sets mesh.data = mesh.model = 1) and this process only asserts. Checked:
  - featurize: the candidate and task stores have the same name, metadata (so either run can
    resume the other's partial store), ids exactly and rows to 1e-5 of their scale;
  - hessian: the same λ, spectrum of R and transforms (R^{-1/2} and friends) to rounding;
  - score: the same top-k ids per query, scores to 1e-5, and the same proponents files (name,
    rows, arrays);
  - tags: with train_tag / query_tag the hessian and score stages on the mesh read the tagged
    store pair and name the Hessian and proponents files after the tags.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from tolerances import assert_close, assert_same_top_k

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "distributed_worker.py")
DATA, MODEL = 2, 2


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    env = dict(os.environ)
    # The two LLVM flags halve the run time (it is mostly compiling); they change only the CPU
    # backend's code generation, after sharding propagation and SPMD partitioning, and both
    # runs compared are compiled with them.
    flags = f"--xla_force_host_platform_device_count={DATA * MODEL}"
    flags += " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    env.update(
        XLA_FLAGS=flags,
        JAX_PLATFORMS="cpu",
        PYTHONPATH=ROOT,
    )
    cmd = [sys.executable, WORKER, str(root / "runs"), str(root / "out.npz")]
    cmd += ["--data", str(DATA), "--model", str(MODEL)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    with np.load(root / "out.npz") as f:
        return {k: f[k] for k in f.files}


def test_featurize_on_a_mesh_writes_the_single_process_store(report):
    assert int(report["devices"]) == DATA * MODEL
    assert bool(report["has_taps"])  # the project's model: both runs take the fast path
    for which in ("candidates", "task"):
        s, m = f"single_{which}", f"mesh_{which}"
        assert str(report[f"{m}_name"]) == str(report[f"{s}_name"])
        assert json.loads(str(report[f"{m}_meta"])) == json.loads(str(report[f"{s}_meta"]))
        np.testing.assert_array_equal(report[f"{m}_ids"], report[f"{s}_ids"])
        assert len(report[f"{s}_ids"]) > 8  # more than one chunk of 8 rows
        assert_close(report[f"{m}_vecs"], report[f"{s}_vecs"], rtol=0, peak_rtol=1e-5)


def test_hessian_on_a_mesh_equals_the_single_process_fit(report):
    assert_close(report["mesh_lambda"], report["single_lambda"], rtol=1e-5)
    # R's spectrum; the sharded reduction sums in another order, so equal to rounding.
    assert_close(report["mesh_eigenvalues"], report["single_eigenvalues"], rtol=0, peak_rtol=1e-5)
    names = json.loads(str(report["single_transform_names"]))
    assert json.loads(str(report["mesh_transform_names"])) == names
    assert "mixed_inv_sqrt" in names  # the transform the trackstar preset scores with
    for t in names:
        assert_close(
            report[f"mesh_T_{t}"], report[f"single_T_{t}"], rtol=0, peak_rtol=1e-5, err_msg=t
        )


def test_score_on_a_mesh_returns_the_single_process_top_k(report):
    # Equal ids except where two candidates' scores tie to rounding (the mesh sums in another
    # order, so a near-tie may come out in the other order).
    assert_same_top_k(
        report["mesh_ids"], report["mesh_scores"], report["single_ids"], report["single_scores"]
    )


def _assert_same_proponents(report, name: str) -> None:
    """``name``'s proponents files hold the single-process ones: same queries, texts and ids,
    scores to the score tolerance."""
    single = json.loads(str(report["single_proponents_rows"]))
    rows = json.loads(str(report[f"{name}_proponents_rows"]))
    assert len(rows) == len(single) > 0
    ranked = ("proponent_ids", "scores", "texts")  # parallel lists, best first
    for row, want in zip(rows, single, strict=True):
        assert {k: v for k, v in row.items() if k not in ranked} == {
            k: v for k, v in want.items() if k not in ranked
        }
        assert_same_top_k(
            np.asarray(row["proponent_ids"]),
            row["scores"],
            np.asarray(want["proponent_ids"]),
            want["scores"],
        )
        texts = dict(zip(want["proponent_ids"], want["texts"], strict=True))
        for i, text in zip(row["proponent_ids"], row["texts"], strict=True):
            assert texts.get(i, text) == text  # every id carries its own text
    np.testing.assert_array_equal(
        report[f"{name}_proponents_npz_query_ids"], report["single_proponents_npz_query_ids"]
    )
    assert_same_top_k(
        report[f"{name}_proponents_npz_ids"],
        report[f"{name}_proponents_npz_scores"],
        report["single_proponents_npz_ids"],
        report["single_proponents_npz_scores"],
    )


def test_score_on_a_mesh_writes_the_single_process_proponents(report):
    assert str(report["single_proponents_name"]) == "proponents_candidates_trackstar.jsonl"
    assert str(report["mesh_proponents_name"]) == str(report["single_proponents_name"])
    np.testing.assert_array_equal(report["single_proponents_npz_ids"], report["single_ids"])
    _assert_same_proponents(report, "mesh")
    single_files = json.loads(str(report["single_proponents_files"]))
    assert single_files == [
        "proponents_candidates_trackstar.jsonl",
        "proponents_candidates_trackstar.npz",
        "proponents_candidates_trackstar.release.jsonl.gz",  # with the opponents
    ]
    assert set(single_files) <= set(json.loads(str(report["mesh_proponents_files"])))


def test_hessian_and_score_on_a_mesh_use_the_tagged_store_pair(report):
    """With train_tag / query_tag the stages on the mesh read the tagged stores (the untagged
    ones no longer exist in that run) and name their outputs after the tags."""
    assert str(report["tagged_hessian_name"]) == "candidates-adam-t1-q1.npz"
    assert json.loads(str(report["tagged_hessian_stores"])) == [
        "candidates-adam-t1",
        "task-adam-q1",
    ]
    assert str(report["tagged_proponents_name"]) == "proponents_candidates_trackstar-t1-q1.jsonl"
    assert "proponents_candidates_trackstar-t1-q1.npz" in json.loads(
        str(report["mesh_proponents_files"])
    )
    _assert_same_proponents(report, "tagged")
