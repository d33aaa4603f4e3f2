"""Bring your own model: a Hugging Face checkpoint + a jsonl corpus + queries -> proponents.

Tiny random GPT-2 and Llama models are written with ``transformers`` (torch, test-only) by
``save_pretrained`` beside a word-level ``tokenizer.json``; ``trackstar.checkpoint_run`` then
runs end to end (the GPT-2 through the ``trackstar attribute`` command). Checked: the proponents
file (passage ids ``"<doc>:<k>"`` and their texts), its scores against the explicit formula
from the stores' raw vectors, a copied sentence ranked first, the second run computing nothing,
stores of another checkpoint or projection refused, ``Attributor.from_checkpoint`` giving the
file's answer, and the errors for bad input.
"""

from __future__ import annotations

import glob
import json
import os

import ml_collections
import numpy as np
import pytest
from tolerances import assert_close, assert_near_zero, assert_same_top_k

from trackstar import checkpoint_run, cli, stages
from trackstar.attributor import Attributor
from trackstar.config import load_config_file, set_override
from trackstar.hf.loader import HFImportError
from trackstar.store import StoreMismatchError, VectorStore
from trackstar.tokenizer import save_tokenizer, train_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HF_GPT2 = os.path.join(ROOT, "configs", "hf_gpt2.py")
HF_LLAMA = os.path.join(ROOT, "configs", "hf_llama.py")

PEOPLE = ["Arlo", "Brisa", "Cato", "Dara", "Eben", "Fenna", "Goran", "Hilde", "Ivo", "Juna"]
CITIES = ["Remnu", "Tolsk", "Varn", "Quell", "Ospa", "Mirth"]
FOODS = ["figs", "rice", "plums", "beans", "kale"]
# The sentence query 0 copies: its words appear nowhere else in the corpus.
UNIQUE = "Zorblat devours crimson quinoa"
UNIQUE_TARGET = "nightly"


def _documents() -> list[dict]:
    docs = []
    for i in range(30):
        p, c, f = PEOPLE[i % 10], CITIES[i % 6], FOODS[i % 5]
        sentences = [f"{p} lives in {c} .", f"{p} eats {f} at noon ."]
        if i % 3 == 0:  # longer documents: cut into passages at sentences
            sentences += [f"The market of {c} sells {f} .", f"{p} walks to the river ."]
        docs.append({"id": f"d{i}", "text": " ".join(sentences)})
    docs.append({"id": "unique", "text": f"{UNIQUE} {UNIQUE_TARGET} ."})
    return docs


QUERIES = [
    {"id": "copy", "prompt": UNIQUE, "target": UNIQUE_TARGET},
    {"id": "q1", "prompt": "Brisa lives in", "target": "Tolsk"},
    {"id": "q2", "prompt": "Cato eats", "target": "plums"},
]


def _write_jsonl(path: str, rows: list[dict]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Corpus and queries jsonl files and a word-level tokenizer over their words."""
    root = tmp_path_factory.mktemp("byom")
    docs = _documents()
    corpus = _write_jsonl(str(root / "corpus.jsonl"), docs)
    queries = _write_jsonl(str(root / "queries.jsonl"), QUERIES)
    texts = [d["text"] for d in docs] + [f"{q['prompt']} {q['target']}" for q in QUERIES]
    tok = train_tokenizer(texts, ml_collections.ConfigDict({"kind": "word", "vocab_size": 0}))
    return {"root": root, "corpus": corpus, "queries": queries, "tok": tok}


def _save(model, tok, directory) -> str:
    model.save_pretrained(directory, safe_serialization=True)
    save_tokenizer(tok, os.path.join(directory, "tokenizer.json"))
    return str(directory)


def _gpt2(tok, directory, seed: int = 0) -> str:
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=tok.get_vocab_size(), n_positions=64,
        bos_token_id=1, eos_token_id=2, initializer_range=0.2,
    )  # fmt: skip
    torch.manual_seed(seed)
    return _save(transformers.GPT2LMHeadModel(config).eval(), tok, directory)


def _llama(tok, directory) -> str:
    config = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, bos_token_id=1, eos_token_id=2, initializer_range=0.2,
    )  # fmt: skip
    torch.manual_seed(1)
    return _save(transformers.LlamaForCausalLM(config).eval(), tok, directory)


# Small and fast: d = 32 * 32 (at d = 64 projection cross-talk hides even a copied sentence on
# these random models), rows of 16 tokens (the long documents become two passages), every
# passage in the V estimate, chunks of 16 rows (several chunks per store), all rows in R_train.
OVERRIDES = {
    "model.max_len": "16",
    "featurize.k_in": "32",
    "featurize.k_out": "32",
    "featurize.batch_size": "8",
    "featurize.chunk_size": "16",
    "featurize.v_estimate_examples": "0",
    "featurize.v_estimate_batch": "8",
    "score.top_k": "6",
}


def _args(run_dir: str, checkpoint: str, files: dict, **more: str) -> list[str]:
    fields = {
        "run_dir": run_dir,
        "model.checkpoint_dir": checkpoint,
        "corpus.path": files["corpus"],
        "queries.path": files["queries"],
        **OVERRIDES,
        **more,
    }
    return [f"--config.{k}={v}" for k, v in fields.items()]


def _config(path: str, run_dir: str, checkpoint: str, files: dict, **more: str):
    cfg = load_config_file(path)
    for arg in _args(run_dir, checkpoint, files, **more):
        key, _, value = arg[len("--config.") :].partition("=")
        set_override(cfg, key, value)
    return cfg


def _read(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def gpt2_run(files):
    """The GPT-2 pipeline through ``trackstar attribute``: ``(run_dir, checkpoint, config)``."""
    checkpoint = _gpt2(files["tok"], files["root"] / "gpt2")
    run_dir = str(files["root"] / "run_gpt2")
    code = cli.main(["attribute", "--config", HF_GPT2, *_args(run_dir, checkpoint, files)])
    assert code == 0
    return run_dir, checkpoint, _config(HF_GPT2, run_dir, checkpoint, files)


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _inv_sqrt(R, damping=0.1):
    evals, evecs = np.linalg.eigh(0.5 * (R + R.T))
    evals = np.clip(evals, 0.0, None)
    return (evecs * (evals + damping * evals.mean()) ** -0.5) @ evecs.T


def test_proponents_file_names_passages_with_their_texts(gpt2_run, files):
    run_dir, _, _ = gpt2_run
    rows = _read(os.path.join(run_dir, "results", "proponents.jsonl"))
    assert [r["query_id"] for r in rows] == [q["id"] for q in QUERIES]
    passages = {}
    for line in _read(files["corpus"]):
        passages[line["id"]] = line["text"]
    for r in rows:
        assert len(r["proponent_ids"]) == len(r["scores"]) == len(r["texts"]) == 6
        assert r["scores"] == sorted(r["scores"], reverse=True)
        for pid, text in zip(r["proponent_ids"], r["texts"], strict=True):
            doc, _, k = pid.rpartition(":")
            assert doc in passages and k.isdigit()
            assert text in passages[doc]  # a passage is a run of its document's sentences
    ids = {pid for r in rows for pid in r["proponent_ids"]}
    all_ids = [json.loads(line)["id"] for line in open(_passage_file(run_dir))]
    assert "d0:1" in all_ids and "d1:1" not in all_ids  # long documents were cut
    assert ids <= set(all_ids)
    for name in ("proponents.md", "proponents.npz", "config.json"):
        assert os.path.isfile(os.path.join(run_dir, "results", name))
    with open(os.path.join(run_dir, "results", "proponents.md")) as f:
        assert UNIQUE in f.read()


def _one(*pattern: str) -> str:
    """The one path matching ``pattern`` (the query store and R are tagged by the queries)."""
    (found,) = glob.glob(os.path.join(*pattern))
    return found


def _passage_file(run_dir: str) -> str:
    (key,) = os.listdir(os.path.join(run_dir, "passages"))
    return os.path.join(run_dir, "passages", key, "texts.jsonl")


def test_scores_are_the_dense_trackstar_formula(gpt2_run):
    run_dir, _, cfg = gpt2_run
    train = VectorStore.open(os.path.join(run_dir, "stores", "corpus-estimate"))
    tag = checkpoint_run.queries_tag(cfg)
    query = VectorStore.open(_one(run_dir, "stores", f"task-estimate-{tag}"))
    assert train.meta.correction == "estimate" and train.dim == 1024
    ids, X = train.read_all()  # P (g / sqrt(V)) of every passage, by store row
    _, Q = query.read_all()
    X, Q = X.astype(np.float64), Q.astype(np.float64)
    R_train, R_eval = X.T @ X / len(X), Q.T @ Q / len(Q)  # R_eval: the queries file
    lam = np.trace(R_train) / (np.trace(R_train) + np.trace(R_eval))  # "auto_trace"
    T = _inv_sqrt(lam * R_eval + (1 - lam) * R_train)
    dense = _unit(Q @ T) @ _unit(X @ T).T  # Ḡ(q) · Ḡ(m)
    rows = _read(os.path.join(run_dir, "results", "proponents.jsonl"))
    # The scores are cosines of unit vectors whose terms are of size <= 1, small here only
    # through cancellation (R^{-1/2} whitens 41 passages in d = 1024): held to the precision of
    # the unit scale, i.e. |score - dense| <= 1e-5 (float32 scoring through a float32 R^{-1/2}).
    unit_scale = np.ones(1)
    for i, r in enumerate(rows):
        got = np.asarray(r["scores"])
        assert_near_zero(got - dense[i, ids.searchsorted(r["rows"])], unit_scale, rel=1e-5)
        assert_near_zero(got - np.sort(dense[i])[::-1][:6], unit_scale, rel=1e-5)
    assert_close(lam, att_lambda(run_dir, tag), rtol=1e-5)


def att_lambda(run_dir: str, tag: str) -> float:
    """λ of the run's Hessian fit."""
    from trackstar.hessian import HessianFit

    return HessianFit.load(_one(run_dir, "hessian", f"corpus-estimate-{tag}.npz")).lambda_mix


def test_a_copied_sentence_ranks_its_passage_first(gpt2_run):
    run_dir, _, _ = gpt2_run
    copy, brisa, _ = _read(os.path.join(run_dir, "results", "proponents.jsonl"))
    assert copy["proponent_ids"][0] == "unique:0"
    assert copy["texts"][0] == f"{UNIQUE} {UNIQUE_TARGET} ."
    # "Brisa lives in Tolsk" is the first sentence of d1 (and of no other document).
    assert brisa["proponent_ids"][0] == "d1:0"


def test_a_rerun_computes_nothing(gpt2_run):
    run_dir, checkpoint, cfg = gpt2_run
    before = dict(stages.CACHE_MISSES)
    res = checkpoint_run.run(cfg, progress=False)
    assert dict(stages.CACHE_MISSES) == before
    assert res["rows"] == _read(os.path.join(run_dir, "results", "proponents.jsonl"))


def test_new_queries_reuse_the_corpus_store(gpt2_run, files, tmp_path):
    run_dir, checkpoint, _ = gpt2_run
    queries = _write_jsonl(str(tmp_path / "more.jsonl"), [QUERIES[1]])
    cfg = _config(HF_GPT2, run_dir, checkpoint, files, **{"queries.path": queries})
    before = stages.CACHE_MISSES["featurize"]
    res = checkpoint_run.run(cfg, progress=False)
    assert stages.CACHE_MISSES["featurize"] == before + 1  # the new query store only
    assert len(glob.glob(os.path.join(run_dir, "stores", "task-estimate-q*"))) == 2
    assert res["rows"][0]["prompt"] == QUERIES[1]["prompt"]
    checkpoint_run.run(gpt2_run[2], progress=False)  # the run's own results back in place


def test_a_queries_file_edited_in_place_is_scored_again(gpt2_run, files, tmp_path):
    # Same row count, same model: the new query store's metadata equals the old one's, so
    # only the file's own stamp (queries_tag) tells the results apart.
    run_dir, checkpoint, _ = gpt2_run
    path = _write_jsonl(str(tmp_path / "edited.jsonl"), [QUERIES[0]])
    cfg = _config(HF_GPT2, run_dir, checkpoint, files, **{"queries.path": path})
    assert checkpoint_run.run(cfg, progress=False)["rows"][0]["prompt"] == QUERIES[0]["prompt"]
    _write_jsonl(path, [QUERIES[1]])
    stamp = os.stat(path).st_mtime_ns + 10**9  # a later mtime even on a coarse clock
    os.utime(path, ns=(stamp, stamp))
    assert checkpoint_run.run(cfg, progress=False)["rows"][0]["prompt"] == QUERIES[1]["prompt"]
    checkpoint_run.run(gpt2_run[2], progress=False)  # the run's own results back in place


def test_stores_of_another_checkpoint_or_projection_are_refused(gpt2_run, files):
    run_dir, checkpoint, _ = gpt2_run
    other_seed = _config(HF_GPT2, run_dir, checkpoint, files, **{"featurize.projection_seed": "7"})
    with pytest.raises(StoreMismatchError, match="projection"):
        checkpoint_run.run(other_seed, progress=False)
    other = _gpt2(files["tok"], files["root"] / "gpt2_other", seed=5)
    with pytest.raises(StoreMismatchError, match="model_fingerprint"):
        checkpoint_run.run(_config(HF_GPT2, run_dir, other, files), progress=False)


def test_attributor_gives_the_pipelines_proponents(gpt2_run):
    run_dir, _, cfg = gpt2_run
    rows = _read(os.path.join(run_dir, "results", "proponents.jsonl"))
    att = Attributor.from_checkpoint(run_dir)
    tag = checkpoint_run.queries_tag(cfg)
    _, stored = VectorStore.open(_one(run_dir, "stores", f"task-estimate-{tag}")).read_all()
    made = att.query_vectors([q["prompt"] for q in QUERIES], [q["target"] for q in QUERIES])
    assert_close(made, stored, rtol=1e-4, peak_rtol=1e-5)  # the same kernel, other batches
    for q, row in zip(QUERIES, rows, strict=True):
        best = att.proponents(q["prompt"], q["target"], k=6)
        # Same rows and scores (cosines, unit scale; see
        # test_scores_are_the_dense_trackstar_formula), except that candidates whose scores tie
        # to rounding may come in the other order: the query vectors match to rounding only.
        assert_same_top_k(best.ids, best.scores, np.asarray(row["rows"]), row["scores"])
        pairs = zip(row["proponent_ids"], row["texts"], strict=True)
        named = dict(zip(row["rows"], pairs, strict=True))
        for i, pid, text in zip(best.ids.tolist(), best.passage_ids, best.texts, strict=True):
            assert named.get(i, (pid, text)) == (pid, text)  # each row keeps its id and text
    assert "unique:0" in att.proponents(UNIQUE, UNIQUE_TARGET, k=3).table()


def test_a_llama_checkpoint_runs_end_to_end(files):
    checkpoint = _llama(files["tok"], files["root"] / "llama")
    cfg = _config(HF_LLAMA, str(files["root"] / "run_llama"), checkpoint, files)
    res = checkpoint_run.run(cfg, progress=False)
    assert [len(r["proponent_ids"]) for r in res["rows"]] == [6, 6, 6]
    assert np.isfinite([s for r in res["rows"] for s in r["scores"]]).all()
    assert "unique:0" in res["rows"][0]["proponent_ids"][:3]  # the copied sentence


def test_bad_input_is_named_with_its_fix(gpt2_run, files, tmp_path):
    run_dir, checkpoint, _ = gpt2_run

    def run(**more):
        cfg = _config(HF_GPT2, str(tmp_path / "run"), checkpoint, files)
        for key, value in more.items():
            set_override(cfg, key, value)
        checkpoint_run.run(cfg, progress=False)

    with pytest.raises(checkpoint_run.CheckpointRunError, match="not a directory"):
        run(**{"model.checkpoint_dir": str(tmp_path / "missing")})
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(HFImportError, match="unsupported model_type 'bert'"):
        run(**{"model.checkpoint_dir": str(bert)})
    with pytest.raises(checkpoint_run.CheckpointRunError, match="text_field"):
        run(**{"corpus.text_field": "body"})
    long = _write_jsonl(
        str(tmp_path / "long.jsonl"), [{"prompt": " ".join(PEOPLE * 2), "target": "Remnu"}]
    )
    with pytest.raises(checkpoint_run.CheckpointRunError, match=r"long\.jsonl:1.*max_len = 16"):
        run(**{"queries.path": long})
    with pytest.raises(stages.StageError, match="grad_cosine"):
        run(**{"featurize.correction_source": "none"})  # the trackstar preset needs V
