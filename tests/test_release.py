"""The release's results schema (write / read), opponents, and its query and corpus files."""

import dataclasses
import gzip
import json
import os

import numpy as np
import pytest
from release_fixtures import QUERIES, SHARDS, write_jsonl, write_release
from store_fixtures import ArrayStore
from tolerances import assert_same_top_k

from trackstar.hessian import fit_hessian
from trackstar.release import (
    ReleaseError,
    ResultRecord,
    read_corpus_shards,
    read_release_queries,
    read_results,
    release_task,
    results_from_run,
    score_with_opponents,
    write_results,
)
from trackstar.score import get_preset
from trackstar.world.records import Fact, Query

D, N, Q, K = 8, 40, 4, 5


def _dense_top(scores_QxN, k, lowest):
    """Reference: every score sorted (most negative first when ``lowest``), ties to lower id."""
    ids = np.arange(scores_QxN.shape[1])
    key = scores_QxN if lowest else -scores_QxN
    order = np.stack([np.lexsort((ids, row))[:k] for row in key])
    return order, np.take_along_axis(scores_QxN, order, 1)


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("n_queries", [Q, 1])
def test_opponents_equal_dense_bottom_k_with_ties(n_queries):
    rng = np.random.default_rng(0)
    # Small integers: exact float32 dot products, many exact ties on both ends.
    train = rng.integers(-1, 2, size=(N, D)).astype(np.float32)
    train[17] = train[4]  # duplicate rows tie on every query
    q = rng.integers(-1, 2, size=(n_queries, D)).astype(np.float32)
    q[0] = np.abs(q[0]) + 1  # a query with a strictly positive direction
    dense = q.astype(np.float64) @ train.T.astype(np.float64)
    p_ids, p_scores, o_ids, o_scores = score_with_opponents(
        ArrayStore(train, {"dim": train.shape[1], "correction": "none"}, chunk=16),
        q,
        "grad_dot",
        None,
        K,
    )
    ref_p, ref_ps = _dense_top(dense, K, lowest=False)
    ref_o, ref_os = _dense_top(dense, K, lowest=True)
    assert any(len(set(r)) < K for r in ref_os)  # the reference does contain ties
    np.testing.assert_array_equal(p_ids, ref_p)
    np.testing.assert_array_equal(p_scores, ref_ps)
    np.testing.assert_array_equal(o_ids, ref_o)
    np.testing.assert_array_equal(o_scores, ref_os)
    assert (np.diff(o_scores, axis=1) >= 0).all()  # most negative first


@pytest.mark.parametrize("preset", ["grad_cosine", "trak", "trackstar"])
def test_opponents_of_every_kind_of_preset_equal_the_dense_formula(preset):
    rng = np.random.default_rng(1)
    scale = np.geomspace(3, 0.2, D)
    train = (rng.normal(size=(N, D)) * scale).astype(np.float32)
    q = (rng.normal(size=(Q, D)) * scale[::-1]).astype(np.float32)
    held = (rng.normal(size=(12, D)) * scale).astype(np.float32)
    spec = get_preset(preset)
    store = ArrayStore(
        train, {"dim": D, "correction": "adam" if spec.corrected else "none"}, chunk=16
    )
    cfg = dict(lambda_mix="auto_trace", crossing_per_65536=1000, damping=0.1, train_sample=0)
    fit = fit_hessian(store, held if spec.hessian == "mixed" else None, cfg, D)
    # Explicit scores from the fit's own matrices: (T_q u_q) · (T_m u_m), unit when normalized.
    t_m_name, t_q_name = spec.transform_names()
    t_q = np.eye(D) if t_q_name is None else fit.transform(t_q_name).astype(np.float64)
    t_m = np.eye(D) if t_m_name is None else fit.transform(t_m_name).astype(np.float64)
    qs, ms = q.astype(np.float64) @ t_q.T, train.astype(np.float64) @ t_m.T
    if spec.normalize:
        qs, ms = _unit(qs), _unit(ms)
    dense = qs @ ms.T
    p_ids, p_scores, o_ids, o_scores = score_with_opponents(store, q, preset, fit, K)
    atol = 1e-5 * np.abs(dense).max()
    assert_same_top_k(p_ids, p_scores, *_dense_top(dense, K, lowest=False), atol=atol)
    assert_same_top_k(o_ids, o_scores, *_dense_top(dense, K, lowest=True), atol=atol)
    assert (o_scores < 0).all() and (p_scores > 0).all()


def _world_bits():
    facts = [
        Fact(0, "Marie Curie", "P19", "Warsaw", 3, False),
        Fact(1, "Albert Einstein", "P19", "Ulm", 1, False),
    ]
    queries = [
        Query(10, "Marie Curie was born in", "Warsaw", 0, 3, (0, 2), "task"),
        Query(11, "Albert Einstein was born in", "Ulm", 1, 1, (1,), "task"),
    ]
    texts = ["curie warsaw", "einstein ulm", "curie again", "filler", "noise"]
    return facts, queries, texts


def _run_records(**kwargs):
    facts, queries, texts = _world_bits()
    p_ids = np.array([[2, 3, 0], [1, 4, 0]])
    p_scores = np.array([[0.9, 0.5, 0.25], [0.75, 0.5, 0.125]], np.float32)
    o_ids = np.array([[4, 1, 3], [2, 3, 0]])
    o_scores = np.array([[-0.5, -0.25, -0.125], [-1.0, -0.5, -0.25]], np.float32)
    return results_from_run(
        queries,
        p_ids,
        p_scores,
        texts,
        opp_ids_QxK=o_ids,
        opp_scores_QxK=o_scores,
        facts=facts,
        ground_truth=[q.candidate_ids for q in queries],
        model_correct=np.array([True, False]),
        model_confidence=np.exp(np.array([-0.1, -2.0])),
        **kwargs,
    )


def test_results_from_run_fills_every_field_from_the_arrays_and_world():
    recs = _run_records(example_names=["s0", "s1", "s2", "s3", "s4"])
    a, b = recs
    assert a.example_id == 10 and a.inputs_plaintext == "Marie Curie was born in"
    assert a.targets_plaintext == "Warsaw"
    assert a.proponents == ["curie again", "filler", "curie warsaw"]
    assert a.proponent_ids == ["s2", "s3", "s0"]
    assert a.proponent_scores == [pytest.approx(0.9), 0.5, 0.25]
    assert a.opponents == ["noise", "einstein ulm", "filler"]
    assert a.opponent_ids == ["s4", "s1", "s3"]
    assert a.opponent_scores == [-0.5, -0.25, -0.125]
    assert (a.fact_id, a.relation, a.frequency_bucket) == (0, "P19", 3)
    assert a.proponent_correct == [True, False, True]  # ground truth {0, 2}
    assert b.proponent_correct == [True, False, False]  # ground truth {1}
    assert (a.model_correct, b.model_correct) == (True, False)
    assert b.model_confidence == pytest.approx(np.exp(-2.0))
    assert a.model_prediction is None
    # Without names, ids are the integer example ids; without opponents, none are written.
    facts, queries, texts = _world_bits()
    plain = results_from_run(queries, np.array([[3], [1]]), np.ones((2, 1)), texts)
    assert plain[0].proponent_ids == [3] and plain[0].opponents is None
    assert "opponents" not in plain[0].to_json() and plain[0].relation is None


def test_results_from_run_leaves_out_empty_slots_of_a_small_pool():
    # A pool smaller than k: score.top_k_scores pads with id -1 and score -inf; those slots
    # are not examples (id -1 would otherwise read the last text).
    facts, queries, texts = _world_bits()
    ids = np.array([[2, 0, -1], [1, -1, -1]])
    scores = np.array([[0.5, 0.25, -np.inf], [0.75, -np.inf, -np.inf]])
    a, b = results_from_run(
        queries, ids, scores, texts, opp_ids_QxK=ids, opp_scores_QxK=-scores, facts=facts
    )
    assert a.proponent_ids == [2, 0] and a.proponents == ["curie again", "curie warsaw"]
    assert b.proponent_ids == [1] and b.proponent_scores == [0.75]
    assert b.opponent_ids == [1] and b.opponent_scores == [-0.75]
    assert json.loads(json.dumps(a.to_json(), allow_nan=False))["proponent_scores"] == [0.5, 0.25]


def test_results_from_run_refuses_arrays_that_do_not_line_up():
    facts, queries, texts = _world_bits()
    with pytest.raises(ReleaseError, match="do not line up"):
        results_from_run(queries, np.zeros((3, 2), int), np.zeros((3, 2)), texts)
    with pytest.raises(ReleaseError, match="example id 9 has no text"):
        results_from_run(queries, np.array([[9], [0]]), np.zeros((2, 1)), texts)
    with pytest.raises(ReleaseError, match="together"):
        results_from_run(
            queries, np.zeros((2, 1), int), np.zeros((2, 1)), texts, opp_ids_QxK=np.zeros((2, 1))
        )


@pytest.mark.parametrize("name", ["results.jsonl", "results.jsonl.gz"])
def test_write_then_read_gives_the_same_records(tmp_path, name):
    recs = _run_records(example_names=["s0", "s1", "s2", "s3", "s4"])
    recs[1].model_prediction = "Munich"
    recs[1].extra = {"method": "trackstar"}
    path = tmp_path / name
    assert write_results(path, iter(recs)) == 2
    back = read_results(path)
    assert not isinstance(back, list)  # a generator: read line by line
    assert list(back) == recs
    raw = path.read_bytes()
    if name.endswith(".gz"):
        raw = gzip.decompress(raw)
    lines = [json.loads(x) for x in raw.decode().splitlines()]
    assert lines[1]["method"] == "trackstar" and lines[1]["proponent_ids"] == ["s1", "s4", "s0"]
    assert "model_prediction" not in lines[0]  # None fields are left out
    # The same records give the same bytes (gzip without a timestamp).
    again = tmp_path / ("again-" + name)
    write_results(again, recs)
    assert again.read_bytes() == path.read_bytes()


def _good_row():
    return _run_records()[0].to_json()


@pytest.mark.parametrize(
    "change, field, fix",
    [
        (lambda r: r.pop("proponent_scores"), "proponent_scores", "missing required field"),
        (lambda r: r.update(proponent_scores=["high", 1.0, 0.5]), "proponent_scores", "numbers"),
        (lambda r: r.update(inputs_plaintext=3), "inputs_plaintext", "must be a string"),
        (lambda r: r.update(example_id=True), "example_id", "a string or an integer"),
        (lambda r: r.update(proponent_correct=[1, 0, 1]), "proponent_correct", "true/false"),
        (lambda r: r.pop("opponent_ids"), "opponent_ids", "together"),
        (lambda r: r.update(proponents=["a"]), "proponents", "one text, id and score"),
        (lambda r: r.update(proponent_correct=[True]), "proponent_correct", "one per proponent"),
    ],
)
def test_a_bad_line_is_refused_naming_line_field_and_fix(tmp_path, change, field, fix):
    bad = _good_row()
    change(bad)
    path = write_jsonl(tmp_path / "r.jsonl", [_good_row(), bad, _good_row()])
    reader = read_results(path)
    assert isinstance(next(reader), ResultRecord)  # line 1 is fine and read first
    with pytest.raises(ReleaseError) as err:
        next(reader)
    msg = str(err.value)
    assert f"{path}:2:" in msg and repr(field) in msg and fix in msg, msg


def test_writer_refuses_a_bad_record_and_keeps_the_previous_file(tmp_path):
    path = tmp_path / "r.jsonl"
    good = _run_records()
    write_results(path, good)
    before = path.read_bytes()
    bad = dataclasses.replace(good[1], proponent_scores=[float("nan"), 0.5, 0.1])
    with pytest.raises(ReleaseError, match=r"record 1 .*'proponent_scores'.*finite"):
        write_results(path, [good[0], bad])
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["r.jsonl"]  # no temporary file left behind
    with pytest.raises(ReleaseError, match=r"record 0 .*clash"):
        write_results(path, [dataclasses.replace(good[0], extra={"relation": "x"})])


def test_release_query_and_corpus_readers_stream_typed_records(tmp_path):
    qpath, corpus = write_release(str(tmp_path))
    queries = read_release_queries(qpath)
    first = next(queries)
    assert first.fact_id == "f_curie_p19" and first.entity1 == "Warsaw"
    assert first.prompts == (QUERIES[0]["prompt0"], QUERIES[0]["prompt1"], QUERIES[0]["prompt2"])
    assert first.entity0_aliases == ("Maria Sklodowska",) and first.trex_sentences == ("s0",)
    rest = list(queries)
    assert [q.fact_id for q in rest] == ["f_einstein_p19", "7"]
    assert rest[0].trex_sentences == ("s4",) and rest[1].prompts == (QUERIES[2]["prompt0"],)
    sentences = list(read_corpus_shards(corpus))  # one plain and one gzipped shard, in order
    assert [s.sentence_id for s in sentences] == ["s0", "s1", "2", "s3", "s4"]
    assert sentences[1].fact_triples == (
        ("Albert Einstein", "P19", "Ulm"),
        ("Albert Einstein", "P106", "physicist"),
    )
    assert sentences[1].text == SHARDS[0][1]["text"] and sentences[4].fact_triples == ()
    assert sentences[3].where.endswith("shard-00001.jsonl.gz:2")


def test_release_task_maps_to_queries_candidates_and_ground_truth(tmp_path):
    qpath, corpus = write_release(str(tmp_path))
    task = release_task(qpath, corpus)
    assert task.fact_names == ("f_curie_p19", "f_einstein_p19", "7")
    # s1's triples state Einstein's fact; s4 is named by the query file only.
    assert task.ground_truth == {"f_curie_p19": {"s0"}, "f_einstein_p19": {"s1", "s4"}, "7": {"s3"}}
    assert [c.source_id for c in task.candidates] == ["s0", "s1", "2", "s3", "s4"]
    assert [c.fact_ids for c in task.candidates] == [(0,), (1,), (), (2,), (1,)]
    assert [c.kind for c in task.candidates] == ["fact", "fact", "distractor", "fact", "fact"]
    assert [q.candidate_ids for q in task.queries] == [(0,), (1, 4), (3,)]
    assert [(q.prompt, q.target) for q in task.queries][1] == ("Albert Einstein was born in", "Ulm")
    with pytest.raises(ReleaseError, match=r"queries.jsonl:3: no field 'prompt1'"):
        release_task(qpath, corpus, prompt_index=1)


def test_release_readers_name_the_bad_line_and_field(tmp_path):
    rows = [dict(QUERIES[0]), dict(QUERIES[1])]
    del rows[1]["entity1"]
    path = write_jsonl(tmp_path / "q.jsonl", rows)
    with pytest.raises(ReleaseError, match=r"q.jsonl:2: missing required field 'entity1'"):
        list(read_release_queries(path))
    shard = write_jsonl(
        tmp_path / "c.jsonl",
        [SHARDS[0][0], {"sentence_id": "x", "text": "t", "fact_triples": [["a", "b"]]}],
    )
    with pytest.raises(ReleaseError, match=r"c.jsonl:2: malformed entry .* 'fact_triples'"):
        list(read_corpus_shards(shard))
    empty = write_jsonl(tmp_path / "e.jsonl", [{"sentence_id": "y", "text": " "}])
    with pytest.raises(ReleaseError, match=r"e.jsonl:1: field 'text' must be a non-empty"):
        list(read_corpus_shards(empty))
    dup = write_jsonl(tmp_path / "d.jsonl", [QUERIES[0], QUERIES[0]])
    with pytest.raises(ReleaseError, match=r"d.jsonl:2: fact_id 'f_curie_p19' already used"):
        release_task(dup, [empty])
