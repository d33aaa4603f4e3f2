"""The ``trackstar`` console script (trackstar.cli.main): the stages on a tiny run, proponents
of a new query, help, and config errors as one line with a nonzero exit."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from trackstar import cli, stages
from trackstar.config import load_config_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")


def _args(run_dir, *more):
    return ["--config", TINY, f"--config.run_dir={run_dir}", *more]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run built by the commands world, train, featurize, hessian and score."""
    run_dir = str(tmp_path_factory.mktemp("cli") / "tiny")
    assert cli.main(["world", *_args(run_dir)]) == 0
    assert cli.main(["train", *_args(run_dir)]) == 0
    assert cli.main(["featurize", *_args(run_dir), "--sets", "candidates,task,heldout"]) == 0
    assert cli.main(["hessian", *_args(run_dir)]) == 0
    assert cli.main(["score", *_args(run_dir), "--preset", "trackstar"]) == 0
    cfg = load_config_file(TINY)
    cfg.run_dir = run_dir
    return cfg


def test_stage_commands_write_the_run(run, capsys):
    cfg = run
    path = stages.proponents_path(cfg, "candidates", "trackstar") + ".jsonl"
    assert os.path.exists(path)
    assert os.path.exists(stages.hessian_path(cfg, "candidates", True))
    # The score stage also wrote the opponents (npz) and a results file in the release schema.
    from trackstar.release import read_results

    base = stages.proponents_path(cfg, "candidates", "trackstar")
    with np.load(base + ".npz") as z:
        ids, opp_ids, opp_scores = z["ids"], z["opponent_ids"], z["opponent_scores"]
        assert (np.diff(opp_scores, axis=1) >= 0).all() and opp_scores.max() <= z["scores"].min()
    recs = list(read_results(base + ".release.jsonl.gz"))
    assert len(recs) == ids.shape[0] == cfg.world.n_queries
    assert recs[0].proponent_ids == ids[0].tolist() and recs[0].opponent_ids == opp_ids[0].tolist()
    assert recs[0].fact_id is not None and recs[0].proponent_correct is not None
    # Each stage logged what it measured to the run's metrics file.
    from trackstar.runlog import read_metrics

    log = read_metrics(cfg.run_dir)
    stages_logged = {r["stage"] for r in log}
    assert {"train", "train_accuracy", "featurize", "hessian", "score"} <= stages_logged
    train = read_metrics(cfg.run_dir, "train")
    assert train[-1]["step"] == cfg.train.steps and train[-1]["loss"] > 0
    feats = {r["store"]: r for r in read_metrics(cfg.run_dir, "featurize")}
    assert len(feats) == 3 and all(r["store_mb"] > 0 for r in feats.values())
    (h,) = read_metrics(cfg.run_dir, "hessian")
    assert 0 < h["lambda_mix"] < 1 and 0 < h["effective_rank"] <= h["rank"]
    (sc,) = read_metrics(cfg.run_dir, "score")
    assert sc["preset"] == "trackstar" and sc["rows"] > 0 and sc["rows_per_s"] > 0
    # Rerunning a finished stage is a no-op that prints where its output is.
    capsys.readouterr()
    assert cli.main(["score", *_args(cfg.run_dir)]) == 0
    assert f"proponents -> {path}" in capsys.readouterr().out


def test_proponents_prints_a_table_and_json(run, capsys):
    cfg = run
    with open(stages.proponents_path(cfg, "candidates", "trackstar") + ".jsonl") as f:
        row = json.loads(f.readline())
    argv = ["proponents", *_args(cfg.run_dir), "--prompt", row["prompt"], "--target"]
    capsys.readouterr()
    assert cli.main([*argv, row["target"], "--k", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"query: {row['prompt']} -> {row['target']}"
    assert len(out) == 2 + 3 and out[2].split()[:2] == ["1", str(row["proponent_ids"][0])]
    # --json: the proponents file's fields, the same ids as the score stage.
    assert cli.main([*argv, row["target"], "--k", "4", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["proponent_ids"] == row["proponent_ids"][:4]
    np.testing.assert_allclose(got["scores"], row["scores"][:4], rtol=1e-4, atol=1e-5)
    # A missing store is a library error: one line naming the stage, exit code 1.
    assert cli.main([*argv, row["target"], "--candidates", "corpus"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error (StageError):") and "trackstar featurize" in err
    assert len(err.strip().splitlines()) == 1


def test_help_lists_the_commands(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("world", "train", "featurize", "hessian", "score", "run", "experiment"):
        assert f"  {name} " in out
    assert "proponents" in out
    for name in ("attribute", "export"):  # a Hugging Face checkpoint in, a run's model out
        assert f"  {name} " in out
    # A command's help needs no config file.
    with pytest.raises(SystemExit) as e:
        cli.main(["proponents", "--help", "--config", "nowhere.py"])
    assert e.value.code == 0 and "--prompt" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli.main(["frobnicate"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_attribute_help_and_export_of_the_run(run, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["attribute", "--help"])
    assert e.value.code == 0 and "checkpoint" in capsys.readouterr().out
    out = str(tmp_path / "hf")
    code = cli.main(["export", *_args(run.run_dir), "--out", out])
    captured = capsys.readouterr()
    assert run.model.family == "gpt2"  # the demo configuration: a GPT-2 run exports
    assert code == 0 and os.path.isfile(os.path.join(out, "config.json"))
    assert out in captured.out


def test_bad_override_is_a_one_line_config_error(tmp_path, capsys):
    run_dir = str(tmp_path / "never")
    with pytest.raises(SystemExit) as e:
        cli.main(["train", *_args(run_dir, "--config.train.steps=abc")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["config error: train.steps expects an int, got 'abc'"]
    with pytest.raises(SystemExit) as e:
        cli.main(["score", *_args(run_dir, "--config.score.top_kk=3")])
    assert e.value.code == 2 and "score.top_k" in capsys.readouterr().err
    assert not os.path.exists(run_dir)  # Nothing was made.


def test_console_script_and_scripts_share_the_parser(tmp_path):
    """``python -m trackstar.cli`` and a script wrapper refuse a bad override the same way."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONWARNINGS": "ignore"}
    env.pop("TRACKSTAR_TRACEBACK", None)
    bad = _args(str(tmp_path / "r"), "--config.featurize.k_in=-1")
    results = [
        subprocess.run(
            [sys.executable, *cmd, *bad],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=env,
            timeout=300,
            check=False,
        )
        for cmd in (["-m", "trackstar.cli", "featurize"], [f"{ROOT}/scripts/featurize.py"])
    ]
    for res in results:
        assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert "featurize.k_in" in res.stderr and "Traceback" not in res.stderr
    assert results[0].stderr == results[1].stderr
