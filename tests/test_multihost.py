"""Multi-host featurize on localhost: 2 processes x 4 CPU devices, jax.distributed + gloo.

Each run is a fresh subprocess (tests/sharding_worker.py) so this test process keeps its single
device. Checked against a single-process, single-device run of the same worker:
  - the 2-process store equals the single-process store (ids exactly, vectors and R to 1e-5 of their
    scale), and the cross-process Gauss-Newton psum and sharded top-k match the single process;
  - a process killed mid-run (SIGKILL while computing its third chunk, its second chunk's write
    possibly in flight), then both restarted, completes the store with no row lost or duplicated;
  - featurize on a global mesh (2 processes x 2 devices, ``featurize_scope = "global"``): every
    kernel call is a collective, so the processes run in lockstep rounds. With 3 chunks (the last
    short) and with a resumed store (chunk 0 written beforehand), both for the data axis across
    processes (2 feed groups) and the model axis across processes (1 group), the run finishes,
    both processes make the same number of calls, and the vectors equal the single-process store
    (``tolerances.assert_close``, rtol and peak_rtol 1e-5: the per-device batch differs).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from tolerances import assert_close

from trackstar.store import VectorStore

WORKER = os.path.join(os.path.dirname(__file__), "sharding_worker.py")
REL_TOL = 1e-5  # vectors and R: max abs difference / max abs value


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_pair(
    store: str, out: str, extra: tuple[list[str], list[str]] = ([], []), devices: int = 4
):
    port = _free_port()
    procs = []
    for pid in (0, 1):
        cmd = [sys.executable, WORKER, "featurize", "--store", store, "--out", out]
        cmd += ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
        cmd += ["--process-id", str(pid), *extra[pid]]
        procs.append(
            subprocess.Popen(
                cmd, env=_env(devices), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
        )
    return procs


def _wait_ok(procs, timeout: float = 240) -> None:
    """Both processes exit 0 within ``timeout`` seconds; on any failure none is left running."""
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(deadline - time.monotonic(), 1))
            assert p.returncode == 0, out.decode()[-3000:]
    except subprocess.TimeoutExpired:
        pytest.fail(f"the processes did not finish within {timeout}s (a collective hung?)")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    cmd = [sys.executable, WORKER, "featurize", "--store", str(d / "store")]
    cmd += ["--out", str(d / "ref.npz"), "--model", "1"]
    r = subprocess.run(cmd, env=_env(1), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return VectorStore.open(str(d / "store")).read_all(), dict(np.load(d / "ref.npz"))


def _rel(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def test_two_processes_write_one_store_equal_to_single_process(tmp_path, reference):
    (ref_ids, ref_vecs), ref = reference
    store = str(tmp_path / "store")
    _wait_ok(_launch_pair(store, str(tmp_path / "two.npz")))
    got = dict(np.load(tmp_path / "two.npz"))
    assert int(got["processes"]) == 2 and int(got["devices"]) == 8
    ids, vecs = VectorStore.open(store).read_all()
    np.testing.assert_array_equal(ids, ref_ids)
    assert _rel(vecs, ref_vecs) < REL_TOL, _rel(vecs, ref_vecs)
    # Hessian: one psum over the 8 devices of both processes.
    assert int(got["used"]) == int(ref["used"]) == len(ref_ids)
    assert _rel(got["R"], ref["R"]) < REL_TOL, _rel(got["R"], ref["R"])
    # Scoring: rows sharded over both processes, one global merge = the single-device ranking.
    np.testing.assert_array_equal(got["ids"], got["single_ids"])
    np.testing.assert_allclose(got["scores"], got["single_scores"], atol=1e-5)
    print(
        f"1-vs-2-process max abs diff: vectors {np.abs(vecs - ref_vecs).max():.3g} "
        f"(scale {np.abs(ref_vecs).max():.3g}), R {np.abs(got['R'] - ref['R']).max():.3g} "
        f"(scale {np.abs(ref['R']).max():.3g})"
    )


def test_killed_process_then_restart_completes_store_exactly_once(tmp_path, reference):
    (ref_ids, ref_vecs), _ = reference
    store = str(tmp_path / "store")
    out = str(tmp_path / "unused.npz")
    # Process 1 SIGKILLs itself while computing its third chunk; process 0 is slowed so it is
    # still mid-run, then killed too (its peer is gone, so it could never finish the barrier).
    p0, p1 = _launch_pair(store, out, (["--slow", "0.5"], ["--kill-after", "2"]))
    p1.communicate(timeout=240)
    assert p1.returncode == -9
    time.sleep(0.5)
    if p0.poll() is None:
        p0.kill()
    p0.communicate(timeout=60)
    partial = VectorStore.open(store, require_complete=False)
    done = partial.committed_chunks()
    assert not partial.is_complete
    assert 1 in done and not {5, 7, 9} & set(done), done  # process 1 stopped at its third
    # Restart both: only the missing chunks are written, finalize proves exact coverage.
    _wait_ok(_launch_pair(store, out, (["--no-score"], ["--no-score"])))
    ids, vecs = VectorStore.open(store).read_all()
    np.testing.assert_array_equal(ids, ref_ids)  # no row lost or duplicated, in order
    assert _rel(vecs, ref_vecs) < REL_TOL
    assert not any(n.startswith(".tmp-") for n in os.listdir(os.path.join(store, "chunks")))


@pytest.mark.parametrize("model", [2, 4], ids=["data-across-processes", "model-across-processes"])
@pytest.mark.parametrize("resumed", [False, True], ids=["fresh", "resumed"])
def test_global_mesh_featurize_runs_in_lockstep(tmp_path, reference, model, resumed):
    (ref_ids, ref_vecs), _ = reference
    store, out = str(tmp_path / "store"), str(tmp_path / "run.npz")
    # 40 examples in chunks of 16: 16, 16 and a short 8, featurized 4 rows per group per call.
    opts = ["--scope", "global", "--model", str(model), "--chunk", "16", "--no-score"]
    if resumed:  # chunk 0 written by a single process first: the run resumes at chunks 1, 2
        cmd = [sys.executable, WORKER, "featurize", "--store", store, "--out", out]
        cmd += ["--model", "1", "--chunk", "16", "--only-chunks", "0"]
        r = subprocess.run(cmd, env=_env(1), capture_output=True, text=True, timeout=240)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        assert VectorStore.open(store, require_complete=False).committed_chunks() == [0]
    _wait_ok(_launch_pair(store, out, (opts, opts), devices=2))
    runs = [json.load(open(f"{out}-p{p}.json")) for p in (0, 1)]
    assert [r["devices"] for r in runs] == [4, 4]
    # Calls per process: every round as many as its longest chunk (16 rows: 4, 8 rows: 2).
    # Data across processes: 2 groups, rounds (0, 1) + (2, pad) or, resumed, (1, 2 + pad).
    # Model across processes: 1 group, both processes feed every chunk.
    expected = {(2, False): 6, (2, True): 4, (4, False): 10, (4, True): 6}[model, resumed]
    assert [r["calls"] for r in runs] == [expected, expected]
    ids, vecs = VectorStore.open(store).read_all()
    np.testing.assert_array_equal(ids, ref_ids)
    assert_close(vecs, ref_vecs, rtol=1e-5, peak_rtol=1e-5)
    print(
        f"global mesh model={model} resumed={resumed}: vectors bitwise equal to 1 process: "
        f"{np.array_equal(vecs, ref_vecs)}, max abs diff {np.abs(vecs - ref_vecs).max():.3g}"
    )
