"""The benchmark script runs end to end in its tiny mode and writes every required figure."""

import importlib.util
import json
import os

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
REQUIRED = (
    "floor_examples_per_s",
    "featurize_over_floor_exact",
    "featurize_over_floor_factored",
    "featurize_over_floor_dense",
    "score_over_matmul",
    "featurize_rss_growth",
    "score_rss_growth",
)


def _load_script():
    spec = importlib.util.spec_from_file_location(
        "benchmark", os.path.join(ROOT, "scripts", "benchmark.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_benchmark_writes_required_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    _load_script().main(["--tiny", "--json", str(out), "--workdir", str(tmp_path / "work")])
    r = json.loads(out.read_text())
    assert r["tiny"] is True
    for key in REQUIRED:
        assert isinstance(r[key], float) and r[key] > 0, (key, r.get(key))
    assert r["score_top1_agreement"] == 1.0  # streaming and in-memory scoring agree
    assert r["bf16_top10_overlap"] > 0.5 and r["bf16_row_rel_error_max"] < 1e-2
    assert [h["dim"] for h in r["hessian"]] == [16] and "fit_s" in r["hessian"][0]
    assert [x["n"] for x in r["rss"]["featurize"]] == [32, 64]
    assert "featurize, exact Adam V" in capsys.readouterr().out  # the table was printed


def test_unknown_config_mode_is_refused():
    from trackstar.config import load_config_file

    with pytest.raises(ValueError, match="unknown benchmark config mode 'huge'"):
        load_config_file(os.path.join(ROOT, "configs", "benchmark.py") + ":huge")
