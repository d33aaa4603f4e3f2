"""trackstar.Attributor on a tiny run: new queries score exactly as the score stage does, the
UNK policy applies to them, and a run without its stores names the stage to run."""

import copy
import json
import os
import warnings

import numpy as np
import pytest
from tolerances import assert_close

import trackstar
from trackstar import data, stages, store
from trackstar.attributor import AttributionError, Attributor, Proponents
from trackstar.config import load_config_file
from trackstar.stages import config_for_run_dir

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs")


@pytest.fixture(scope="module")
def run(tiny_run):
    cfg, _, results = tiny_run
    return cfg, results["trackstar"]


@pytest.fixture(scope="module")
def attributor(run):
    return Attributor.from_run(run[0])


def _rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_task_queries_score_as_the_score_stage_wrote(run, attributor):
    cfg, result = run
    rows = _rows(result["path"])
    k = cfg.score.top_k
    got = attributor.proponents_batch([r["prompt"] for r in rows], [r["target"] for r in rows], k)
    with np.load(result["path"].replace(".jsonl", ".npz")) as z:
        want_ids, want_scores = z["ids"], z["scores"]
    np.testing.assert_array_equal(np.stack([p.ids for p in got]), want_ids)
    assert_close(np.stack([p.scores for p in got]), want_scores)
    assert [p.texts for p in got] == [r["texts"] for r in rows]
    # One query alone gives its row of the batch (the kernel pads it to a full batch).
    one = attributor.proponents(rows[3]["prompt"], rows[3]["target"], k=k)
    np.testing.assert_array_equal(one.ids, want_ids[3])
    assert_close(one.scores, want_scores[3])
    assert one.rows()[0] == (int(want_ids[3, 0]), float(one.scores[0]), rows[3]["texts"][0])
    assert rows[3]["prompt"] in one.table() and len(one.table().splitlines()) == k + 2


def test_query_vectors_equal_the_task_store(run, attributor):
    cfg, _ = run
    w = stages.load_trained(cfg).world
    qs = w.task_queries[:5]
    v = attributor.query_vectors([q.prompt for q in qs], [q.target for q in qs])
    task = store.VectorStore.open(stages.store_path(cfg, "task", True))
    assert_close(v, task.read_all()[1][:5])


def test_run_directory_and_lazy_export(run, attributor):
    cfg, result = run
    assert trackstar.Attributor is Attributor
    rows = _rows(result["path"])
    # From the run directory alone (its config.json), with another preset and k.
    att = Attributor.from_run(cfg.run_dir, preset="exp_opt_norm")
    assert config_for_run_dir(cfg.run_dir).run_dir == cfg.run_dir
    top = att.proponents(rows[0]["prompt"], rows[0]["target"], k=3)
    assert len(top) == 3 and np.all(np.diff(top.scores) <= 0)


def test_config_for_run_dir_keeps_defaults_the_run_predates(tmp_path):
    """An older run's config.json lacks newer fields: they keep the defaults, and JSON lists
    are tuples again."""
    base = load_config_file(os.path.join(CONFIGS, "tiny.py"))
    saved = base.to_dict()
    del saved["featurize"]["max_unk_frac"]
    saved["train"]["steps"] = 7
    saved["unused_fields"] = ["world.lama_facts_path"]
    with open(tmp_path / "config.json", "w") as f:
        json.dump(saved, f, default=list)
    cfg = config_for_run_dir(tmp_path, base=base)
    assert cfg.run_dir == str(tmp_path) and cfg.train.steps == 7
    assert cfg.featurize.max_unk_frac == base.featurize.max_unk_frac
    assert cfg.experiment.k_values == base.experiment.k_values
    assert isinstance(cfg.experiment.k_values, tuple) and "unused_fields" not in cfg


def test_unknown_words_follow_the_unk_policy(run, attributor):
    cfg, _ = run
    target = stages.load_trained(cfg).world.task_queries[0].target
    # One unknown word among known ones: scored, no warning.
    prompt = stages.load_trained(cfg).world.task_queries[0].prompt
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(attributor.proponents(f"{prompt} zzyzxq", target, k=2)) == 2
    # A mostly-unknown prompt: a warning naming it (featurize.max_unk_frac), still scored ...
    with pytest.warns(data.MostlyUnknownWarning, match="more than 50% UNK"):
        assert len(attributor.proponents("qwxz vrrk plumf", target, k=2)) == 2
    # ... or an error with featurize.unk_error.
    strict = copy.deepcopy(cfg)
    strict.featurize.unk_error = True
    with pytest.raises(data.DataError, match="featurize.max_unk_frac"):
        Attributor.from_run(strict).proponents("qwxz vrrk plumf", target)
    with pytest.raises(data.DataError, match="empty target"):
        attributor.proponents(prompt, "")
    with pytest.raises(data.DataError, match="longer than max_len"):
        attributor.proponents(" ".join([prompt] * 20), target)


def test_missing_stages_are_named(run, tmp_path):
    cfg, _ = run
    # No uncorrected store (grad_dot) and no open-set store: featurize is the stage to run.
    with pytest.raises(stages.StageError, match=r"trackstar featurize .*--correction off"):
        Attributor.from_run(cfg, preset="grad_dot")
    with pytest.raises(stages.StageError, match=r"run the featurize stage.*--sets corpus"):
        Attributor.from_run(cfg, candidates="corpus")
    with pytest.raises(stages.StageError, match="no config.json"):
        Attributor.from_run(str(tmp_path))
    with pytest.raises(AttributionError, match="equal, non-empty"):
        Attributor.from_run(cfg).query_vectors(["a"], [])


def test_proponents_name_passages_when_given_their_ids():
    found = Proponents(
        "Brisa lives in", "Tolsk", np.array([4, 0]), np.array([0.5, 0.25], np.float32),
        ["Brisa lives in Tolsk .", "Arlo lives in Remnu ."], ["d1:0", "d0:0"],
    )  # fmt: skip
    assert found.to_dict()["passage_ids"] == ["d1:0", "d0:0"]
    assert found.to_dict()["proponent_ids"] == [4, 0]
    table = found.table().splitlines()
    assert table[2].split()[:3] == ["1", "d1:0", "+0.5000"]
    plain = Proponents("p", "t", np.array([3]), np.array([1.0], np.float32), None)
    assert "passage_ids" not in plain.to_dict() and plain.table().splitlines()[2].split()[1] == "3"
