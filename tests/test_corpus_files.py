"""Corpora and queries from files: jsonl / parquet / datasets directories, passages, packing."""

import json
import os

import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trackstar import corpus_files as C
from trackstar import data
from trackstar import tokenizer as T

DOCS = [
    {"id": "d1", "text": "Alpha beta gamma . Delta epsilon . Zeta eta theta iota . Kappa ."},
    {"id": "d2", "text": "Short one ."},
    {"id": "d3", "text": "One two three four five six seven eight nine ten eleven . End ."},
    {"id": "d4", "text": "Lambda mu !\n\nNu xi omicron ? Pi rho sigma tau upsilon phi chi ."},
]


@pytest.fixture(scope="module")
def tok():
    cfg = ml_collections.ConfigDict({"kind": "word", "vocab_size": 0})
    return T.train_tokenizer([d["text"] for d in DOCS] + ["Where is it ? Here"], cfg)


def _jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return str(path)


def _all(chunks):
    chunks = list(chunks)
    ids = [i for c in chunks for i in c.passage_ids]
    texts = [t for c in chunks for t in c.texts]
    tokens = np.concatenate([c.tokens_NxT for c in chunks])
    weights = np.concatenate([c.weights_NxT for c in chunks])
    return ids, texts, tokens, weights


def test_jsonl_parquet_and_datasets_dir_give_the_same_passages(tmp_path, tok):
    datasets = pytest.importorskip("datasets")
    rows = [{"doc": r["id"], "body": r["text"], "extra": 1} for r in DOCS]
    jl = _jsonl(tmp_path / "c.jsonl", rows)
    pq.write_table(pa.Table.from_pylist(rows), str(tmp_path / "c.parquet"), row_group_size=3)
    ds_dir = str(tmp_path / "ds")
    datasets.Dataset.from_list(rows).save_to_disk(ds_dir)
    results = []
    for path in (jl, str(tmp_path / "c.parquet"), ds_dir):
        src = C.CorpusSource(path, id_field="doc", text_field="body")
        results.append(_all(C.iter_packed(src, tok, 9, chunk_size=3, batch_rows=2)))
    assert C.detect_format(ds_dir) == "datasets"
    for ids, texts, tokens, weights in results[1:]:
        assert ids == results[0][0] and texts == results[0][1]
        np.testing.assert_array_equal(tokens, results[0][2])
        np.testing.assert_array_equal(weights, results[0][3])


def test_packed_rows_equal_encode_texts(tmp_path, tok):
    src = C.CorpusSource(_jsonl(tmp_path / "c.jsonl", DOCS))
    chunks = list(C.iter_packed(src, tok, 9, chunk_size=4))
    assert [c.start for c in chunks] == list(range(0, 4 * len(chunks), 4))
    assert all(len(c) == 4 for c in chunks[:-1]) and 1 <= len(chunks[-1]) <= 4
    ids, texts, tokens, weights = _all(chunks)
    want_t, want_w = data.encode_texts(tok, texts, 9)
    np.testing.assert_array_equal(tokens, want_t)
    np.testing.assert_array_equal(weights, want_w)
    assert tokens.dtype == np.int32 and weights.dtype == np.float32


def test_sentence_passages_with_overlap(tok):
    text = DOCS[0]["text"]  # Sentences of 4, 3, 5 and 2 tokens.
    no_overlap = C.document_passages("d1", text, tok, max_len=9)
    assert [p.text for p in no_overlap] == [
        "Alpha beta gamma . Delta epsilon .",
        "Zeta eta theta iota . Kappa .",
    ]
    overlap = C.document_passages("d1", text, tok, max_len=9, overlap_sentences=1)
    assert [p.text for p in overlap] == [
        "Alpha beta gamma . Delta epsilon .",
        "Delta epsilon . Zeta eta theta iota .",
        "Zeta eta theta iota . Kappa .",
    ]
    assert [p.passage_id for p in overlap] == ["d1:0", "d1:1", "d1:2"]
    for p in overlap:
        assert 1 + len(p.ids) <= 9 and list(p.ids) == T.encode(tok, p.text)
    # A document that fits is one passage; a sentence longer than the context is cut.
    assert [p.text for p in C.document_passages("d2", DOCS[1]["text"], tok, 9)] == ["Short one ."]
    long = C.document_passages("d3", DOCS[2]["text"], tok, max_len=7, overlap_sentences=1)
    assert [p.text for p in long] == [
        "One two three four five six",
        "seven eight nine ten eleven .",
        "End .",
    ]
    # Overlap never repeats a passage that ends where the previous one ended.
    big = C.document_passages("d", "A b . C d . " + "e " * 12 + ".", tok, 9, 1)
    assert [p.text for p in big] == ["A b . C d .", "e e e e e e e e", "e e e e ."]


def test_any_tokenizer_passages_are_their_own_encoding(tok, monkeypatch):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    texts = [d["text"] for d in DOCS]
    bpe = Tokenizer(models.BPE(unk_token="[UNK]"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"]))
    for text in texts:
        for overlap in (0, 1):
            for p in C.document_passages("d", text, bpe, 9, overlap):
                assert 1 <= len(p.ids) <= 8 and list(p.ids) == bpe.encode(p.text).ids
    # The word-level shortcut (slices of the document's tokens) equals encoding each passage.
    fast = [C.document_passages("d", t, tok, 9, 1) for t in texts]
    monkeypatch.setattr(C, "_context_free", lambda _: False)
    assert [C.document_passages("d", t, tok, 9, 1) for t in texts] == fast


def test_sentence_spans():
    text = 'He said "stop." Then left!\n\nNo final mark\nstill one'
    got = [text[a:b] for a, b in C.sentence_spans(text)]
    assert got == ['He said "stop."', "Then left!", "No final mark\nstill one"]
    assert C.sentence_spans("   ") == []


def test_ids_are_stable_under_other_documents(tmp_path, tok):
    a = _all(C.iter_packed(C.CorpusSource(_jsonl(tmp_path / "a.jsonl", DOCS)), tok, 9))
    b = _all(C.iter_packed(C.CorpusSource(_jsonl(tmp_path / "b.jsonl", DOCS[::-1])), tok, 9))
    assert dict(zip(a[0], a[1], strict=True)) == dict(zip(b[0], b[1], strict=True))
    # Without an id field, a document's id is its row number.
    src = C.CorpusSource(_jsonl(tmp_path / "c.jsonl", DOCS), id_field="")
    ids = _all(C.iter_packed(src, tok, 64))[0]
    assert ids == ["0:0", "1:0", "2:0", "3:0"]


def test_texts_file_rows_and_resumed_chunks(tmp_path, tok):
    src = C.CorpusSource(_jsonl(tmp_path / "c.jsonl", DOCS))
    texts = str(tmp_path / "out" / "passages.jsonl")
    ids, ptexts, tokens, weights = _all(C.iter_packed(src, tok, 9, chunk_size=3, texts_path=texts))
    pf = C.PassageFile(texts)
    assert len(pf) == len(ids)
    assert pf.rows([len(ids) - 1, 0]) == [(ids[-1], ptexts[-1]), (ids[0], ptexts[0])]
    rows = [json.loads(x) for x in open(texts, encoding="utf-8")]
    assert [(r["id"], r["text"]) for r in rows] == list(zip(ids, ptexts, strict=True))
    assert C.write_passages(src, tok, 9, str(tmp_path / "p2.jsonl")) == len(ids)
    # Packing from the file, whole or resumed at chunk 1, equals the one-pass stream.
    again = _all(pf.iter_chunks(tok, 9, chunk_size=3))
    assert again[0] == ids
    np.testing.assert_array_equal(again[2], tokens)
    resumed = list(pf.iter_chunks(tok, 9, chunk_size=3, start_chunk=1))
    assert resumed[0].start == 3
    np.testing.assert_array_equal(resumed[0].tokens_NxT, tokens[3:6])
    assert list(pf.iter_chunks(tok, 9, chunk_size=3, start_chunk=99)) == []
    with pytest.raises(IndexError):
        pf.rows([len(ids)])


def test_texts_file_not_left_half_written(tmp_path, tok):
    src = C.CorpusSource(_jsonl(tmp_path / "c.jsonl", DOCS))
    texts = str(tmp_path / "passages.jsonl")
    gen = C.iter_packed(src, tok, 9, chunk_size=1, texts_path=texts)
    next(gen)
    gen.close()
    assert sorted(os.listdir(tmp_path)) == ["c.jsonl"]
    with pytest.raises(C.CorpusFileError, match="no passage file"):
        C.PassageFile(texts)


def test_bad_document_rows_are_named(tmp_path, tok):
    def err(rows, match, **kw):
        path = _jsonl(tmp_path / "bad.jsonl", rows)
        with pytest.raises(C.CorpusFileError, match=match):
            list(C.iter_packed(C.CorpusSource(path, **kw), tok, 9))

    good = {"id": "a", "text": "Short one ."}
    err([good, {"id": "b"}], r"bad\.jsonl:2: row lacks text field 'text'")
    err([good, {"text": "Short ."}], r"bad\.jsonl:2: row lacks id field 'id'")
    err([{"id": "a", "text": 5}], r"bad\.jsonl:1: text field 'text' is int")
    err([{"id": [1], "text": "x"}], r"bad\.jsonl:1: id field 'id' is list")
    err([good, {"id": "e", "text": "   "}], r"bad\.jsonl:2: document 'e' has no tokens")
    path = _jsonl(tmp_path / "skip.jsonl", [good, {"id": "e", "text": " "}])
    chunks = list(C.iter_packed(C.CorpusSource(path), tok, 9, skip_empty=True))
    assert _all(chunks)[0] == ["a:0"]
    (tmp_path / "broken.jsonl").write_bytes(b'{"id": "a", "text": "x"}\n{"id": \n')
    with pytest.raises(C.CorpusFileError, match=r"broken\.jsonl:2: not valid JSON"):
        list(C.read_documents(C.CorpusSource(str(tmp_path / "broken.jsonl"))))
    table = pa.Table.from_pylist([{"id": "a", "text": "x ."}, {"id": "b", "text": None}])
    pq.write_table(table, str(tmp_path / "n.parquet"))
    with pytest.raises(C.CorpusFileError, match=r"n\.parquet:row 2: row lacks text field"):
        list(C.read_documents(C.CorpusSource(str(tmp_path / "n.parquet"))))
    with pytest.raises(C.CorpusFileError, match=r"has no column 'body'"):
        list(C.read_documents(C.CorpusSource(str(tmp_path / "n.parquet"), text_field="body")))
    with pytest.raises(C.CorpusFileError, match="does not exist"):
        list(C.read_documents(C.CorpusSource(str(tmp_path / "missing.jsonl"))))


def test_parquet_directory_in_sorted_file_order(tmp_path, tok):
    d = tmp_path / "shards"
    d.mkdir()
    pq.write_table(pa.Table.from_pylist(DOCS[2:]), str(d / "part-1.parquet"))
    pq.write_table(pa.Table.from_pylist(DOCS[:2]), str(d / "part-0.parquet"))
    docs = [x for b in C.read_documents(C.CorpusSource(str(d)), batch_rows=3) for x in b]
    assert [x.doc_id for x in docs] == ["d1", "d2", "d3", "d4"]
    assert docs[2].where.endswith("part-1.parquet:row 1")


def test_queries_release_and_plain_field_names(tmp_path, tok):
    path = _jsonl(
        tmp_path / "q.jsonl",
        [
            {"inputs_plaintext": "Where is it ?", "targets_plaintext": " Here", "id": "r1"},
            {"prompt": "Where is it ?", "target": "Here"},
        ],
    )
    qs = C.read_queries(path)
    assert [(q.query_id, q.prompt, q.target.strip()) for q in qs] == [
        ("r1", "Where is it ?", "Here"),
        ("1", "Where is it ?", "Here"),
    ]
    assert qs[1].where.endswith("q.jsonl:2")
    tokens, weights = C.query_arrays(qs, tok, 9)
    np.testing.assert_array_equal(tokens[0], tokens[1])
    assert weights[0].sum() == 1 and weights[0, 5] == 1  # BOS + 4 prompt tokens, then target.
    custom = _jsonl(tmp_path / "c.jsonl", [{"q": "Where is it ?", "a": "Here"}])
    assert C.read_queries(custom, prompt_field="q", target_field="a")[0].target == "Here"


@pytest.mark.parametrize(
    "row, match",
    [
        ({"prompt": "Where is it ?"}, r"q\.jsonl:2: row lacks a target field"),
        ({"target": "Here"}, r"q\.jsonl:2: row lacks a prompt field .*'inputs_plaintext'"),
        ({"prompt": " ", "target": "Here"}, r"q\.jsonl:2: empty prompt"),
        ({"prompt": "Where", "target": 3}, r"q\.jsonl:2: target field 'target' is int"),
    ],
)
def test_bad_query_rows_are_named(tmp_path, row, match):
    path = _jsonl(tmp_path / "q.jsonl", [{"prompt": "Where is it ?", "target": "Here"}, row])
    with pytest.raises(C.CorpusFileError, match=match):
        C.read_queries(path)


def test_empty_or_missing_query_file(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(C.CorpusFileError, match="is empty"):
        C.read_queries(str(tmp_path / "e.jsonl"))
    with pytest.raises(C.CorpusFileError, match="does not exist"):
        C.read_queries(str(tmp_path / "none.jsonl"))


def test_ingest_benchmark_script_runs(tmp_path):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "ingest.json"
    cmd = [sys.executable, os.path.join(root, "scripts", "ingest_benchmark.py")]
    cmd += ["--sizes", "50,200", "--vocab", "300", "--dir", str(tmp_path), "--json", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    result = json.loads(out.read_text())
    assert set(result["runs"]) == {"50", "200"} and result["ratio"] > 0
    assert result["runs"]["200"]["passages"] >= 200
