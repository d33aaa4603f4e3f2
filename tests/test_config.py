"""Config overrides, validation before any work, and the config a run directory remembers."""

import json
import os
import subprocess
import sys

import pytest

from trackstar import config as C

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
FIXTURES = os.path.join(ROOT, "tests", "fixtures")


# A run directory that holds nothing, so no rule depends on what the cwd's runs/ hold.
NO_RUN = os.path.join(ROOT, "tests", "no-such-run-dir")


def _load(name: str = "demo"):
    cfg = C.load_config_file(os.path.join(CONFIGS, f"{name}.py"))
    cfg.run_dir = NO_RUN
    return cfg


def _override(key: str, text: str, name: str = "demo"):
    cfg = _load(name)
    C.set_override(cfg, key, text)
    return cfg


# ----- overrides ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key,text,expected",
    [
        ("train.steps", "7", 7),
        ("train.steps", "1e3", 1000),  # An integral float is an int.
        ("train.lr", "1", 1.0),  # An int is a float where a float is expected.
        ("train.lr", "3e-4", 3e-4),
        ("featurize.skip_bad_examples", "True", True),
        ("featurize.skip_bad_examples", "false", False),
        ("world.freq_buckets", "(1, 2)", (1, 2)),
        ("world.freq_buckets", "[3]", (3,)),
        ("experiment.methods", "bm25,trackstar", ("bm25", "trackstar")),
        ("experiment.methods", "('bm25', 'random')", ("bm25", "random")),
        ("tailpatch.lr_multipliers", "(1, 3)", (1.0, 3.0)),
        ("world.source", "lama", "lama"),
        ("world.source", "'lama'", "lama"),  # Quotes are unwrapped.
        ("run_dir", "runs/123", "runs/123"),  # A string field keeps the text as typed.
        ("hessian.lambda_mix", "0.25", 0.25),  # A number or a keyword.
        ("hessian.lambda_mix", "auto", "auto"),
    ],
)
def test_override_coercion(key, text, expected):
    value = C.get_field(_override(key, text), key)
    assert value == expected and type(value) is type(expected)


def test_unknown_field_suggests_close_names():
    with pytest.raises(C.ConfigError, match="unknown config field 'train.step'.*train.steps"):
        _override("train.step", "5")
    with pytest.raises(C.ConfigError, match="is a section"):
        _override("train", "5")


@pytest.mark.parametrize(
    "key,text,message",
    [
        ("train.steps", "abc", "train.steps expects an int, got 'abc'"),
        ("train.steps", "1.5", "train.steps expects an int, got '1.5'"),
        ("train.steps", "True", "train.steps expects an int, got 'True'"),
        ("train.lr", "fast", "train.lr expects a number (float), got 'fast'"),
        ("featurize.skip_bad_examples", "maybe", "expects a bool (True or False)"),
        ("world.freq_buckets", "(1, 'a')", "world.freq_buckets expects a tuple of ints"),
        ("world.source", "3", None),  # A string field takes any text; validation judges it.
    ],
)
def test_override_type_errors_name_field_and_type(key, text, message):
    if message is None:
        assert C.get_field(_override(key, text), key) == "3"
        return
    with pytest.raises(C.ConfigError) as e:
        _override(key, text)
    assert message in str(e.value) and "\n" not in str(e.value)


# ----- validation -----------------------------------------------------------------------------


SHIPPED = ["demo.py", "tiny.py", "large.py"] + [
    f"e{i}.py{m}" for i in range(1, 8) for m in ("", ":tiny")
]


@pytest.mark.parametrize("spec", SHIPPED)
def test_shipped_configs_are_valid(spec):
    C.validate(C.load_config_file(os.path.join(CONFIGS, spec)))


@pytest.mark.parametrize(
    "key,text,field",
    [
        ("hessian.lambda_mix", "1.5", "hessian.lambda_mix"),
        ("hessian.lambda_mix", "sometimes", "hessian.lambda_mix"),
        ("train.batch_size", "0", "train.batch_size"),
        ("hessian.train_sample", "-5", "hessian.train_sample"),
        ("world.n_queries", "0", "world.n_queries"),
        ("score.preset", "best", "score.preset"),
        ("train.optimizer", "sgd", "train.optimizer"),
        ("train.steps", "0", "train.steps"),
        ("train.lr", "0", "train.lr"),
        ("train.b2", "1.0", "train.b2"),
        ("featurize.query_output_fn", "prob", "featurize.query_output_fn"),
        ("featurize.projection_mode", "sparse", "featurize.projection_mode"),
        ("featurize.dtype", "float16", "featurize.dtype"),
        ("featurize.k_in", "0", "featurize.k_in"),
        ("hessian.eval_source", "train", "hessian.eval_source"),
        ("hessian.damping", "-0.1", "hessian.damping"),
        ("world.source", "wiki", "world.source"),
        ("world.anchor_frac", "1.0", "world.anchor_frac"),
        ("world.filler_p", "1.5", "world.filler_p"),
        ("world.freq_buckets", "()", "world.freq_buckets"),
        ("world.doc_sentences", "(3, 2)", "world.doc_sentences"),
        ("world.n_relations", "11", "world.n_relations"),
        ("world.trex_candidates_path", "/no/such/file.jsonl", "world.trex_candidates_path"),
        ("tokenizer.vocab_size", "3", "tokenizer.vocab_size"),
        ("model.size", "huge", "model.size"),
        ("model.dtype", "int8", "model.dtype"),
        ("eval.at_k", "0", "eval.at_k"),
        ("tailpatch.scale", "double", "tailpatch.scale"),
        ("tailpatch.ks", "()", "tailpatch.ks"),
        ("experiment.name", "e9", "experiment.name"),
        ("experiment.methods", "bm25,magic", "experiment.methods"),
        ("mesh.data", "0", "mesh.data"),
        ("mesh.rules", "ring", "mesh.rules"),
        ("mesh.coordinator", "localhost", "mesh.coordinator"),
        ("mesh.rule_overrides", "kernel", "mesh.rule_overrides"),
        # Relations between fields.
        ("train.warmup_steps", "1500", "train.warmup_steps"),
        ("train.seq_len", "65", "train.seq_len"),
        ("model.n_heads", "3", "model.n_heads"),
        ("tailpatch.lr_multipliers", "(0.5, 2.0)", "tailpatch.lr_multipliers"),
        ("experiment.k_values", "(8, 128)", "experiment.k_values"),
        ("experiment.e3_full_dims_k", "(0,)", "experiment.e3_full_dims_k"),
        ("experiment.e3_full_dims_k", "(128, 128)", "experiment.e3_full_dims_k"),
    ],
)
def test_each_rule_refuses_bad_values(key, text, field):
    cfg = _override(key, text)
    with pytest.raises(C.ConfigError, match=field.replace(".", r"\.")) as e:
        C.validate(cfg)
    assert "\n" not in str(e.value)


def test_e3_full_dims_k_must_lie_beyond_the_stored_grid():
    cfg = _override("experiment.e3_full_dims_k", "(32, 128)", "e3")
    with pytest.raises(C.ConfigError, match=r"experiment\.e3_full_dims_k \[32\]"):
        C.validate(cfg)
    cfg.experiment.name = "e1"  # only E3 reads the field
    C.validate(cfg)


def test_conditional_rules():
    # A LAMA world needs its files (while it is still to be built) ...
    cfg = _override("world.source", "lama")
    with pytest.raises(C.ConfigError, match=r"world\.lama_facts_path must be an existing file"):
        C.validate(cfg)
    cfg.world.lama_facts_path = os.path.join(FIXTURES, "lama_facts.jsonl")
    cfg.world.lama_templates_path = os.path.join(FIXTURES, "lama_templates.jsonl")
    # ... and ignores the synthetic generator's sizes, so they are not judged.
    cfg.world.n_subjects = 0
    C.validate(cfg)
    # Held-out queries are needed only when R_eval comes from them.
    cfg = _override("world.n_heldout_queries", "0")
    with pytest.raises(C.ConfigError, match="world.n_heldout_queries >= 1"):
        C.validate(cfg)
    cfg.hessian.eval_source = "task"
    C.validate(cfg)


def test_every_problem_in_one_line():
    cfg = _override("train.batch_size", "0")
    cfg.score.preset = "best"
    with pytest.raises(C.ConfigError) as e:
        C.validate(cfg)
    assert "train.batch_size" in str(e.value) and "score.preset" in str(e.value)


def _leaves(cfg, prefix=""):
    for k, v in cfg.items():
        if hasattr(v, "items"):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"


def test_every_demo_field_has_a_rule():
    missing = [k for k in _leaves(_load("demo")) if k not in C.RULES]
    # experiment.variants is a section of per-variant overrides, checked when applied.
    missing = [k for k in missing if not k.startswith("experiment.variants.")]
    assert not missing, f"add a rule to trackstar.config.RULES for {missing}"


def test_choices_match_the_modules():
    from trackstar import (
        experiments,
        families,
        losses,
        model,
        projection,
        score,
        sharding,
        tailpatch,
        world,
    )
    from trackstar import train as train_lib
    from trackstar.hf import gpt2

    assert C.SCORE_PRESETS == tuple(score.PRESETS)
    assert C.METHODS == experiments.ALL_METHODS
    assert C.EXPERIMENTS == tuple(experiments.RUNNERS)
    assert C.MODEL_MAX_LEN == {k: v["max_len"] for k, v in model.SIZES.items()}
    assert set(C.MODEL_DTYPES) == set(gpt2._DTYPES)
    assert C.GPT2_ACTIVATIONS == tuple(sorted(gpt2.ACTIVATIONS))
    assert C.MODEL_FAMILIES == families.project_family_names()
    assert C.OPTIMIZERS == train_lib.OPTIMIZERS
    assert C.QUERY_OUTPUT_FNS == tuple(losses.OUTPUT_FNS)
    assert C.PROJECTION_MODES == projection.MODES
    assert C.TAILPATCH_SCALES == tailpatch.SCALES
    assert C.MESH_RULES == tuple(sharding.RULE_PRESETS)
    assert C.RULES["world.n_relations"].ok(world.MAX_RELATIONS)


# ----- the scripts' one-line errors -----------------------------------------------------------


def _script(tmp_path, name, *args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONWARNINGS": "ignore"}
    env.pop("TRACKSTAR_TRACEBACK", None)
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", name), *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
        check=False,
    )


def test_script_type_error_is_one_line(tmp_path):
    res = _script(
        tmp_path, "train.py", "--config", f"{CONFIGS}/tiny.py", "--config.train.steps=abc"
    )
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "train.steps expects an int, got 'abc'" in lines[0]
    assert "Traceback" not in res.stderr
    assert not os.path.exists(tmp_path / "runs")  # Nothing was made.


def test_script_validation_error_before_any_work(tmp_path):
    res = _script(
        tmp_path, "make_world.py", "--config", f"{CONFIGS}/tiny.py", "--config.world.n_queries=0"
    )
    assert res.returncode == 2 and "world.n_queries must be an int >= 1" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "runs")


# ----- run-directory memory -------------------------------------------------------------------


def _lama_run(tmp_path):
    """A tiny LAMA-world run directory (world, tokenizer and config.json; no training)."""
    from trackstar import stages

    run = str(tmp_path / "lama_run")
    cfg = _load("tiny")
    cfg.run_dir = run
    cfg.world.source = "lama"
    cfg.world.lama_facts_path = os.path.join(FIXTURES, "lama_facts.jsonl")
    cfg.world.lama_templates_path = os.path.join(FIXTURES, "lama_templates.jsonl")
    cfg.world.n_queries = 4
    cfg.world.n_heldout_queries = 4
    cfg.train.steps = 40
    stages.stage_world(cfg)
    return run


@pytest.fixture(scope="module")
def lama_run(tmp_path_factory):
    return _lama_run(tmp_path_factory.mktemp("cfg"))


def _command(run, *overrides, config="e1.py:tiny"):
    argv = ["--config", os.path.join(CONFIGS, config), f"--config.run_dir={run}", *overrides]
    return C.load_command(argv)


def _bytes(path):
    with open(path, "rb") as f:
        return f.read()


def test_saved_config_records_only_what_was_used(lama_run):
    with open(os.path.join(lama_run, "config.json")) as f:
        saved = json.load(f)
    assert saved["world"]["source"] == "lama"
    assert "n_subjects" not in saved["world"] and "zipf_exponent" not in saved["world"]
    assert "world.n_subjects" in saved["unused_fields"]
    with open(os.path.join(lama_run, "world", "manifest.json")) as f:
        assert "n_subjects" not in json.load(f)["config"]


def test_saved_world_settings_win_over_the_config_file(lama_run):
    before = _bytes(os.path.join(lama_run, "config.json"))
    cmd = _command(lama_run)  # e1's file holds the synthetic demo world; the run is LAMA.
    cfg = cmd.config
    assert cfg.world.source == "lama"
    assert cfg.world.lama_facts_path.endswith("lama_facts.jsonl")
    assert (cfg.world.n_queries, cfg.train.steps) == (4, 40)
    assert {"world.source", "world.n_queries", "train.steps"} <= set(cmd.from_run_dir)
    assert cfg.experiment.name == "e1"  # The command's own sections stay the command's.
    assert _bytes(os.path.join(lama_run, "config.json")) == before
    # A run's built world no longer needs its input files, and bookkeeping may change.
    cmd = _command(lama_run, "--config.train.log_every=5", "--config.world.n_queries=4")
    assert cmd.config.train.log_every == 5


@pytest.mark.parametrize(
    "override,message",
    [
        ("--config.world.n_queries=5", "built with world.n_queries = 4"),
        ("--config.train.steps=100", "built with train.steps = 40"),
        ("--config.world.source=synthetic", "built with world.source = 'lama'"),
        ("--config.world.n_subjects=50", "cannot apply"),  # LAMA worlds ignore it.
    ],
)
def test_override_contradicting_the_run_is_refused(lama_run, override, message):
    before = _bytes(os.path.join(lama_run, "config.json"))
    with pytest.raises(C.ConfigError, match="run_dir") as e:
        _command(lama_run, override)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert _bytes(os.path.join(lama_run, "config.json")) == before


def test_failed_command_leaves_config_json_unchanged(lama_run, tmp_path):
    from trackstar import stages

    file = os.path.join(lama_run, "config.json")
    before = _bytes(file)
    res = _script(
        tmp_path,
        "make_world.py",
        "--config",
        f"{CONFIGS}/tiny.py",
        f"--config.run_dir={lama_run}",
        "--config.world.n_queries=5",
    )
    assert res.returncode == 2 and "built with world.n_queries = 4" in res.stderr
    # A config made in code that disagrees with the run is refused by the stages themselves.
    cfg = _load("tiny")
    cfg.run_dir = lama_run
    with pytest.raises(stages.StageError, match="world.n_queries: built with 4") as e:
        stages.stage_world(cfg)
    assert "delete" not in str(e.value)
    with pytest.raises(stages.StageError, match="built with other settings"):
        stages.load_world_and_tokenizer(cfg)
    assert _bytes(file) == before
    # The script on the same run without overrides succeeds and still rewrites nothing.
    res = _script(
        tmp_path, "make_world.py", "--config", f"{CONFIGS}/tiny.py", f"--config.run_dir={lama_run}"
    )
    assert res.returncode == 0, res.stderr
    assert "using the run's" in res.stderr
    assert _bytes(file) == before


def test_fresh_run_dir_writes_nothing_on_bad_input(tmp_path):
    from trackstar import stages

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cfg = _load("tiny")
    cfg.run_dir = str(tmp_path / "run")
    cfg.world.trex_candidates_path = str(empty)
    with pytest.raises(Exception, match="is empty"):
        stages.stage_world(cfg)
    assert not os.path.exists(cfg.run_dir)
    # The resolution of a run dir with no world is the config file's, unchanged.
    cmd = _command(cfg.run_dir, config="tiny.py")
    assert cmd.from_run_dir == []


def test_an_experiment_is_found_by_its_module_file(tmp_path):
    """A module in trackstar/experiments/ is an experiment (natural order); the harness,
    evaluation and private modules are not."""
    for name in ("e10", "e2", "lds", "harness", "evaluation", "_scratch", "__init__"):
        (tmp_path / f"{name}.py").write_text("")
    (tmp_path / "notes.md").write_text("")
    assert C.experiment_names(str(tmp_path)) == ("e2", "e10", "lds")
