"""scripts/query_latency.py on a tiny run and a tiny synthetic index: every figure is there, and
the returned top-k equal the exact paths' (the Attributor without index; a NumPy pass)."""

import json
import os
import sys

import numpy as np
import pytest

from trackstar import index as index_lib
from trackstar import stages
from trackstar.config import load_config_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import query_latency  # noqa: E402


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> str:
    """A tiny trained run with its candidate store and Hessian fit (short training: latency
    and top-k agreement do not need a good model)."""
    cfg = load_config_file(os.path.join(ROOT, "configs", "tiny.py"))
    cfg.run_dir = str(tmp_path_factory.mktemp("latency") / "tiny")
    cfg.train.steps = 4
    cfg.train.warmup_steps = 1
    cfg.train.checkpoint_every = 4
    stages.stage_world(cfg)
    stages.stage_train(cfg, progress=False)
    trained = stages.load_trained(cfg)
    for which in ("candidates", "heldout"):  # heldout: the Hessian fit's R_eval source.
        stages.stage_featurize(cfg, which, trained=trained, progress=False)
    stages.stage_hessian(cfg)
    return cfg.run_dir


def test_figures_and_exact_top_k(tiny_run, tmp_path):
    workdir = tmp_path / "work"
    out_json = tmp_path / "latency.json"
    argv = ["--run", tiny_run, "--n", "3000", "--chunk-rows", "512", "--queries", "1,4"]
    argv += ["--repeats", "1", "--k", "7", "--workdir", str(workdir), "--json", str(out_json)]
    result = query_latency.main(argv)
    assert json.loads(out_json.read_text()) == json.loads(json.dumps(result))
    for key in (
        "demo_index_1q_s",
        "demo_index_4q_s",
        "demo_noindex_1q_s",
        "demo_noindex_4q_s",
        "synthetic_3k_1q_s",
        "synthetic_3k_4q_s",
        "synthetic_3k_4q_rows_per_s",
        "synthetic_3k_4q_gb_per_s",
        "loadavg_start",
        "loadavg_end",
    ):
        assert key in result, key
    for case in ("demo_index_4q", "demo_noindex_4q", "synthetic_3k_4q"):
        for part in ("featurize", "score", "texts"):
            assert result[f"{case}_{part}_s"] >= 0
        t = result["timings"][case]
        assert set(t) >= {"featurize", "score", "texts", "parts_sum"}
        assert t["score"]["best"] <= t["score"]["median"]
    assert (result["synthetic_n"], result["synthetic_dtype"]) == (3000, "bfloat16")
    assert result["synthetic_d"] == result["demo_d"] and not result["synthetic_reused"]
    # The index path returns the exact path's top-k, on the demo and on the synthetic rows.
    for n in (1, 4):
        assert result[f"demo_index_{n}q_topk_equal"]
        assert result[f"synthetic_3k_{n}q_topk_equal_tie_aware"]

    # The same parameters reuse the synthetic index; another N is written beside it.
    base = index_lib.ScoringIndex.open(result["demo_index_path"])
    params = dict(dtype="bfloat16", noise=0.3, seed=0, chunk_rows=512)
    index, report = query_latency.synthetic_index(base, str(workdir), 3000, **params)
    assert report["synthetic_reused"] and report["synthetic_write_s"] is None
    assert report["synthetic_path"] == result["synthetic_path"]
    assert index.num_rows == 3000 and index.info.dtype == "bfloat16"
    other, report = query_latency.synthetic_index(base, str(workdir), 700, **params)
    assert not report["synthetic_reused"] and other.num_rows == 700
    assert sorted(os.listdir(workdir)) == sorted(
        os.path.basename(p) for p in (index.path, other.path)
    )
    # Row i replicates base row i mod B: nearest to it among the base rows.
    rows = index.store.read_chunk(0)[1][:4]
    sims = rows @ base.store.read_all()[1].T
    np.testing.assert_array_equal(np.argmax(sims, axis=1), np.arange(4))
