"""The benchmark script runs end to end in its tiny mode and writes every required figure."""

import importlib.util
import json
import math
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
    # d = 16 from 64 rows is the d x d form; d = 128 from 64 rows the low-rank one.
    assert [(h["dim"], h["form"]) for h in r["hessian"]] == [(16, "dense"), (128, "low_rank")]
    for key in ("index_score_over_matmul", "index_speedup_over_transform", "r_fit_seconds_d96"):
        assert isinstance(r[key], float) and r[key] > 0, (key, r.get(key))
    assert r["index_top_k_overlap"] == 1.0  # the index ranks as the per-call transform path
    assert r["low_rank"][0]["rank"] <= 40 and r["r_apply_rss_mb_d96"] > 0
    assert 0 <= r["ann_recall_at_10"] <= 1 and r["ann_speedup"] > 0
    assert len(r["load_average_start"]) == 3 and len(r["load_average_end"]) == 3
    assert [x["n"] for x in r["rss"]["featurize"]] == [32, 64]
    assert "featurize, exact Adam V" in capsys.readouterr().out  # the table was printed


def test_unknown_config_mode_is_refused():
    from trackstar.config import load_config_file

    with pytest.raises(ValueError, match="unknown benchmark config mode 'huge'"):
        load_config_file(os.path.join(ROOT, "configs", "benchmark.py") + ":huge")


def test_tiny_hf_rows_write_finite_ratios(tmp_path, capsys):
    """The hf rows (GPT-2- and Llama-shaped models next to the own model) at toy sizes."""
    out = tmp_path / "hf.json"
    config = os.path.join(ROOT, "configs", "benchmark.py") + ":hf"
    _load_script().main(
        ["--config", config, "--tiny", "--json", str(out), "--workdir", str(tmp_path / "w")]
    )
    r = json.loads(out.read_text())
    assert r["tiny"] is True and r["hf_reps"] == 1
    assert list(r["hf_rows"]) == ["own", "gpt2_small", "llama_small"]
    families = [row["family"] for row in r["hf_rows"].values()]
    assert families[1:] == ["gpt2", "llama"]
    for name, row in r["hf_rows"].items():
        assert row["fast_path"] is True, name
        assert row["n_params"] > 0 and row["v_estimate_examples"] == 2, name
        for key in (
            "featurize_over_floor_exact",
            "featurize_over_floor_estimate",
            "v_estimate_s",
            "v_estimate_per_example_over_floor",
        ):
            assert math.isfinite(row[key]) and row[key] > 0, (name, key, row[key])
    for name in ("gpt2_small", "llama_small"):
        for key in ("exact", "estimate"):
            ratio = r["hf_over_own"][name][key]
            assert math.isfinite(ratio) and ratio > 0, (name, key, ratio)
    printed = capsys.readouterr().out
    assert "gpt2_small ratio / own ratio" in printed and "llama_small" in printed
    assert "featurize, exact Adam V" not in printed  # the hf mode runs only the hf rows
