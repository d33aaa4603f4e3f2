"""The release's task through ``trackstar attribute``: release query files and corpus shards in,
results in the release schema with opponents and ground-truth marks out, MRR / Recall@10 over
the queries.

A tiny random GPT-2 (``test_byom``'s) attributes the facts of ``release_fixtures`` over its two
corpus shards plus a third of distractors written here (one of them a sentence longer than a
row, stating Galileo's fact through its ``fact_triples``: two passages of one sentence_id).
Checked: the queries and the corpus are read as the release says; ``proponent_correct`` is the
ground truth (``trex_sentences`` and matching ``fact_triples``) of the written sentence ids;
the metrics are the explicit MRR / Recall@10 of the written ids; the scores and opponents are
the top and bottom of the dense TrackStar formula over every passage; the model's own answer is
the checkpoint's; the viewer shows the file with its metrics; a rerun computes nothing; bad
release files and settings are named with their fix.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os

import ml_collections
import numpy as np
import pytest
import release_fixtures
from test_byom import HF_GPT2, OVERRIDES, _gpt2, _inv_sqrt, _one, _read, _unit
from tolerances import assert_close, assert_same_top_k

from trackstar import checkpoint_run, cli, release, stages, viewer
from trackstar.config import ConfigError, load_config_file, set_override, validate
from trackstar.store import VectorStore
from trackstar.tokenizer import train_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PEOPLE = ["Arlo", "Brisa", "Cato", "Dara", "Eben", "Fenna", "Goran", "Hilde"]
CITIES = ["Remnu", "Tolsk", "Varn", "Quell"]
LONG = (
    "Galileo Galilei , the astronomer who was born in Pisa and taught in Padua , lived in Italy "
    "until his death near Florence ."
)
# A third shard: distractors, and one sentence longer than a row (model.max_len = 16).
DISTRACTORS = [
    {
        "sentence_id": f"x{i}",
        "text": f"{p} lives in {CITIES[i % 4]} and eats {f} .",
        "fact_triples": [],
    }
    # 16 distinct sentences (equal texts would tie in score and come in either order).
    for i, (p, f) in enumerate(itertools.product(PEOPLE, ["figs", "rice"]))
] + [{"sentence_id": "long", "text": LONG, "fact_triples": [["Galileo Galilei", "P27", "Italy"]]}]
# Ground truth by hand from the fixture: trex_sentences, plus the sentences whose triples state
# the fact (s1 for Einstein; s3 and the long sentence for Galileo, who has no trex_sentences).
TRUTH = {"f_curie_p19": {"s0"}, "f_einstein_p19": {"s1", "s4"}, "7": {"s3", "long"}}
TOP_K = 6


def _sentences() -> list[dict]:
    return [*release_fixtures.SHARDS[0], *release_fixtures.SHARDS[1], *DISTRACTORS]


def _fields(files: dict, **more: str) -> dict[str, str]:
    return {
        "run_dir": files["run_dir"],
        "model.checkpoint_dir": files["checkpoint"],
        "queries.path": files["queries"],
        "corpus.path": files["corpus"],
        "corpus.id_field": "sentence_id",  # queries.format stays "auto": detected
        **OVERRIDES,
        "score.top_k": str(TOP_K),
        **more,
    }


def _config(files: dict, **more: str):
    cfg = load_config_file(HF_GPT2)
    for key, value in _fields(files, **more).items():
        set_override(cfg, key, value)
    return cfg


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The pipeline through ``trackstar attribute`` on the release files: a dict of paths, the
    config and what the command printed."""
    root = str(tmp_path_factory.mktemp("release_task"))
    queries, corpus = release_fixtures.write_release(root)
    release_fixtures.write_jsonl(os.path.join(corpus, "shard-00002.jsonl"), DISTRACTORS)
    texts = [str(s["text"]) for s in _sentences()]
    for q in release_fixtures.QUERIES:
        texts += [q[f"prompt{j}"] for j in range(3) if f"prompt{j}" in q] + [q["entity1"]]
    tok = train_tokenizer(texts, ml_collections.ConfigDict({"kind": "word", "vocab_size": 0}))
    files = {
        "root": root,
        "queries": queries,
        "corpus": corpus,
        "tok": tok,
        "checkpoint": _gpt2(tok, os.path.join(root, "gpt2")),
        "run_dir": os.path.join(root, "run"),
    }
    out = io.StringIO()
    args = [f"--config.{k}={v}" for k, v in _fields(files).items()]
    with contextlib.redirect_stdout(out):
        assert cli.main(["attribute", "--config", HF_GPT2, *args]) == 0
    files["stdout"] = out.getvalue()
    files["cfg"] = _config(files)
    files["results"] = os.path.join(files["run_dir"], "results", "trackstar.release.jsonl.gz")
    return files


def _records(run) -> list[release.ResultRecord]:
    return list(release.read_results(run["results"]))


def test_queries_and_shards_are_read_as_the_release_says(run):
    cfg = run["cfg"]
    assert checkpoint_run.query_format(cfg) == "release"  # detected from the first row
    rows = _read(os.path.join(run["run_dir"], "results", "proponents.jsonl"))
    facts = release_fixtures.QUERIES
    assert [r["query_id"] for r in rows] == [str(f["fact_id"]) for f in facts]
    assert [r["prompt"] for r in rows] == [f["prompt0"] for f in facts]
    assert [r["target"] for r in rows] == [f["entity1"] for f in facts]
    # Every sentence of the three shards (the gzipped one too) is a passage "<sentence_id>:<k>"
    # holding a run of its text; the long sentence is two.
    text_of = {str(s["sentence_id"]): s["text"] for s in _sentences()}
    (key,) = os.listdir(os.path.join(run["run_dir"], "passages"))
    passages = _read(os.path.join(run["run_dir"], "passages", key, "texts.jsonl"))
    docs = [p["id"].rpartition(":")[0] for p in passages]
    assert set(docs) == set(text_of) and docs.count("long") == 2
    assert all(p["text"] in text_of[d] for p, d in zip(passages, docs, strict=True))


def test_prompt_index_picks_the_prompt(run):
    cfg = _config(run, **{"queries.prompt_index": "1"})
    # The fact without a prompt1 is named with the fix.
    with pytest.raises(
        checkpoint_run.CheckpointRunError,
        match=r"queries\.jsonl:3: no field 'prompt1'.*lower queries\.prompt_index",
    ):
        checkpoint_run.load_queries(cfg)
    two = os.path.join(run["root"], "two.jsonl")
    release_fixtures.write_jsonl(two, release_fixtures.QUERIES[:2])
    set_override(cfg, "queries.path", two)
    got = checkpoint_run.load_queries(cfg)
    assert [q.prompt for q in got] == [f["prompt1"] for f in release_fixtures.QUERIES[:2]]
    assert [q.fact.relation for q in got] == ["P19", "P19"]


def test_proponent_correct_is_the_release_ground_truth(run):
    # The project's in-memory reader of the release agrees with the truth written by hand.
    task = release.release_task(run["queries"], run["corpus"])
    assert {k: v for k, v in task.ground_truth.items()} == TRUTH
    for rec, fact in zip(_records(run), release_fixtures.QUERIES, strict=True):
        fid = str(fact["fact_id"])
        assert (rec.fact_id, rec.relation) == (fid, fact["relation"])
        assert (rec.extra["entity0"], rec.extra["entity1"]) == (fact["entity0"], fact["entity1"])
        assert len(rec.proponent_ids) == len(rec.opponent_ids) == TOP_K
        assert set(rec.proponent_ids) <= {str(s["sentence_id"]) for s in _sentences()}
        assert rec.proponent_correct == [pid in TRUTH[fid] for pid in rec.proponent_ids]
        text_of = {str(s["sentence_id"]): s["text"] for s in _sentences()}
        for pid, text in zip(rec.proponent_ids, rec.proponents, strict=True):
            assert text in text_of[pid]


def test_metrics_are_mrr_and_recall_of_the_written_ids(run):
    rr, hit = [], []
    for rec in _records(run):
        truth = TRUTH[str(rec.fact_id)]
        first = next((i for i, pid in enumerate(rec.proponent_ids) if pid in truth), None)
        rr.append(0.0 if first is None else 1.0 / (first + 1))
        hit.append(float(first is not None and first < 10))
        assert rec.extra["metrics"] == {"mrr": rr[-1], "recall@10": hit[-1]}
    with open(os.path.join(run["run_dir"], "results", "trackstar.release_metrics.json")) as f:
        summary = json.load(f)
    assert summary["n_queries"] == summary["n_with_ground_truth"] == 3
    assert summary["ground_truth"] == "trex_sentences+fact_triples"
    assert_close(summary["mrr"]["mean"], np.mean(rr), rtol=1e-12)
    assert_close(summary["recall@10"]["mean"], np.mean(hit), rtol=1e-12)
    assert [q["ground_truth_sentences"] for q in summary["per_query"]] == [
        sorted(TRUTH[k]) for k in ("f_curie_p19", "f_einstein_p19", "7")
    ]
    assert "| MRR | " in run["stdout"] and f"{np.mean(rr):.4f}" in run["stdout"]
    assert "trackstar.release.jsonl.gz" in run["stdout"]


def test_scores_and_opponents_are_the_dense_formulas_extremes(run):
    run_dir, cfg = run["run_dir"], run["cfg"]
    train = VectorStore.open(os.path.join(run_dir, "stores", "corpus-estimate"))
    tag = checkpoint_run.queries_tag(cfg)
    _, Q = VectorStore.open(_one(run_dir, "stores", f"task-estimate-{tag}")).read_all()
    ids, X = train.read_all()
    X, Q = X.astype(np.float64), Q.astype(np.float64)
    R_train, R_eval = X.T @ X / len(X), Q.T @ Q / len(Q)
    lam = np.trace(R_train) / (np.trace(R_train) + np.trace(R_eval))  # "auto_trace"
    T = _inv_sqrt(lam * R_eval + (1 - lam) * R_train)
    dense = _unit(Q @ T) @ _unit(X @ T).T  # every passage, by store row
    sentence = [p.rpartition(":")[0] for p in _passage_ids(run_dir)]
    rows = _read(os.path.join(run_dir, "results", "proponents.jsonl"))
    for i, (rec, row) in enumerate(zip(_records(run), rows, strict=True)):
        order = np.argsort(dense[i], kind="stable")
        top, bottom = order[::-1][:TOP_K], order[:TOP_K]  # positions in the store
        want_top, want_bottom = ids[top], ids[bottom]
        # Scores within 1e-5 of the unit scale (cosines: test_byom's tolerance); ids equal
        # except inside near-ties, whose order is rounding's (whitening 27 passages in d = 1024
        # leaves the distractors' scores close together).
        assert_same_top_k(row["rows"], rec.proponent_scores, want_top, dense[i][top])
        assert_same_top_k(row["opponent_rows"], rec.opponent_scores, want_bottom, dense[i][bottom])
        assert rec.opponent_scores == sorted(rec.opponent_scores) and rec.opponent_scores[0] < 0
        assert np.all(np.asarray(rec.opponent_scores) < min(rec.proponent_scores))
        # The written ids are the sentences of those rows.
        assert rec.proponent_ids == [sentence[r] for r in row["rows"]]
        assert rec.opponent_ids == [sentence[r] for r in row["opponent_rows"]]


def _passage_ids(run_dir: str) -> list[str]:
    (key,) = os.listdir(os.path.join(run_dir, "passages"))
    return [p["id"] for p in _read(os.path.join(run_dir, "passages", key, "texts.jsonl"))]


def test_the_models_own_answer_is_the_checkpoints(run):
    cfg = run["cfg"]
    ckpt = checkpoint_run.load(cfg)
    queries = checkpoint_run.load_queries(cfg)
    ex = checkpoint_run.query_encoder(cfg, ckpt)(
        [q.prompt for q in queries], [q.target for q in queries]
    )
    model = transformers.GPT2LMHeadModel.from_pretrained(run["checkpoint"]).eval()
    with torch.no_grad():
        logits = model(torch.tensor(np.asarray(ex.tokens_NxT), dtype=torch.long)).logits
    logp = torch.log_softmax(logits.double(), -1).numpy()
    for i, rec in enumerate(_records(run)):
        (pos,) = np.flatnonzero(np.asarray(ex.weights_NxT[i]))  # one-word targets: one token
        best = int(logp[i, pos - 1].argmax())
        assert rec.model_prediction == run["tok"].decode([best])
        assert_close(rec.model_confidence, np.exp(logp[i, pos - 1, best]), rtol=1e-4)
        assert rec.model_correct == (best == int(ex.tokens_NxT[i, pos]))


def test_the_viewer_shows_the_file_with_its_metrics(run):
    methods = viewer.load_methods(None, [("trackstar", run["results"])])
    data = viewer.view_data(methods)
    assert data["metrics"] == ["mrr", "recall@10"]
    cells = data["records"]["trackstar"]
    for cell, rec in zip(cells, _records(run), strict=True):
        assert cell["m"] == rec.extra["metrics"]
    assert [q["e0"] for q in data["queries"]] == [f["entity0"] for f in release_fixtures.QUERIES]


def test_a_rerun_computes_nothing(run):
    before = dict(stages.CACHE_MISSES)
    res = checkpoint_run.run(run["cfg"], progress=False)
    assert dict(stages.CACHE_MISSES) == before
    assert res["release_path"] == run["results"]
    assert (
        res["release"]["mrr"]
        == json.load(
            open(os.path.join(run["run_dir"], "results", "trackstar.release_metrics.json"))
        )["mrr"]
    )


def test_bad_release_files_are_named_with_their_fix(run, tmp_path):
    bad = [dict(release_fixtures.QUERIES[0]), dict(release_fixtures.QUERIES[1])]
    del bad[1]["entity1"]
    path = release_fixtures.write_jsonl(str(tmp_path / "bad.jsonl"), bad)
    cfg = _config(run, **{"queries.path": path, "run_dir": str(tmp_path / "run")})
    with pytest.raises(
        checkpoint_run.CheckpointRunError,
        match=r"bad\.jsonl:2: missing required field 'entity1'.*fix that line",
    ):
        checkpoint_run.run(cfg, progress=False)
    twice = release_fixtures.write_jsonl(
        str(tmp_path / "twice.jsonl"), [release_fixtures.QUERIES[0]] * 2
    )
    set_override(cfg, "queries.path", twice)
    with pytest.raises(
        checkpoint_run.CheckpointRunError,
        match=r"twice\.jsonl:2: fact_id 'f_curie_p19' already used at .*twice\.jsonl:1",
    ):
        checkpoint_run.load_queries(cfg)
    # A corpus shard with a malformed triple: named when the ground truth is read.
    shards = tmp_path / "shards"
    shards.mkdir()
    rows = [
        release_fixtures.SHARDS[0][0],
        {"sentence_id": "s9", "text": "Ulm .", "fact_triples": [["Ulm", "P17"]]},
    ]
    release_fixtures.write_jsonl(str(shards / "a.jsonl"), rows)
    set_override(cfg, "corpus.path", str(shards))
    facts = [q.fact for q in checkpoint_run.load_queries(_config(run))]
    with pytest.raises(
        checkpoint_run.CheckpointRunError, match=r"a\.jsonl:2: malformed entry .*fact_triples"
    ):
        checkpoint_run.release_ground_truth(cfg, facts)
    # The config's own check of the new fields.
    for key, value in (("queries.format", "xml"), ("queries.prompt_index", "3")):
        wrong = _config(run)
        set_override(wrong, key, value)
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            validate(wrong)
