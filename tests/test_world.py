"""The synthetic fact world, its files, and the LAMA / T-REx loaders."""

import collections
import json
import os
import re

import pytest

from trackstar import world as W
from trackstar.config import load_config_file
from trackstar.world import templates as WT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")


# --- test oracle: which facts a sentence states, read back from the templates -----------------


def _template_regex(template: str) -> re.Pattern:
    parts = re.split(r"(\[X\]|\[Y\])", template)
    out = []
    for part in parts:
        if part == "[X]":
            out.append("(?P<X>.+?)")
        elif part == "[Y]":
            out.append("(?P<Y>.+?)")
        else:
            out.append(re.escape(part))
    return re.compile("^" + "".join(out) + "$")


def _stated(w):
    """``(sentence, fact)`` for every corpus sentence that states a fact."""
    for d in w.documents:
        for sent, fid in zip(d.sentences, d.sentence_fact_ids, strict=True):
            if fid >= 0:
                yield sent, w.facts[fid]


class FactParser:
    """Finds the facts a sentence states by matching it against every relation's templates.

    Only matches whose ``[X]`` is a known subject and ``[Y]`` a known object count, so a
    match of a bare template inside a prefixed sentence is not mistaken for a fact.
    """

    def __init__(self, world: W.World):
        self._subjects = set(world.subjects)
        self._objects = set(world.objects)
        self._patterns: list[tuple[str, re.Pattern]] = []
        for r in world.relations:
            templates = list(r.corpus_templates) + list(r.query_templates)
            for t in dict.fromkeys(templates):
                self._patterns.append((r.name, _template_regex(t)))
            # The query form as the corpus writes it ("<prompt> <target> .").
            for t in r.query_templates:
                qt = t[: t.index("[Y]")].rstrip() + " [Y] ."
                self._patterns.append((r.name, _template_regex(qt)))
        self._fact_index = {(f.subject, f.relation): f for f in world.facts}

    def parse(self, sentence: str) -> set[tuple[str, str, str]]:
        """Returns the (subject, relation, object) triples the sentence states."""
        found = set()
        for rel, pat in self._patterns:
            m = pat.match(sentence)
            if m and m.group("X") in self._subjects and m.group("Y") in self._objects:
                found.add((m.group("X"), rel, m.group("Y")))
        return found

    def fact_ids(self, sentence: str) -> set[int]:
        """Ids of the world's facts the sentence states (a triple with a wrong object is not
        a world fact and is returned as -1)."""
        ids = set()
        for s, r, o in self.parse(sentence):
            f = self._fact_index.get((s, r))
            ids.add(f.fact_id if f is not None and f.object == o else -1)
        return ids


def _cfg(name="tiny"):
    return load_config_file(os.path.join(ROOT, "configs", f"{name}.py")).world


@pytest.fixture(scope="module")
def cfg():
    return _cfg()


@pytest.fixture(scope="module")
def world(cfg):
    return W.make_world(cfg)


@pytest.fixture(scope="module")
def lama_world():
    cfg = _cfg()
    cfg.n_queries = 8
    cfg.n_heldout_queries = 8
    return W.load_lama_world(
        os.path.join(FIXTURES, "lama_facts.jsonl"),
        os.path.join(FIXTURES, "lama_templates.jsonl"),
        cfg,
    )


def test_deterministic_under_seed(cfg, world):
    assert W.make_world(cfg) == world
    other = cfg.copy_and_resolve_references()
    other.seed = cfg.seed + 1
    w2 = W.make_world(other)
    assert [f.object for f in w2.facts] != [f.object for f in world.facts]
    assert w2.subjects != world.subjects


def test_names_unique_and_not_template_words(world):
    words = []
    for s in world.subjects:
        assert len(s.split()) == 2
    for o in world.objects:
        assert len(o.split()) == 1
        words.append(o)
    assert len(set(world.subjects)) == len(world.subjects)
    assert len(set(world.objects)) == len(world.objects)
    template_words = WT._template_words(
        [t for r in world.relations for t in r.corpus_templates + r.query_templates]
        + list(WT._DISTRACTOR_TEMPLATES)
        + list(WT._FILLERS)
    )
    names = {w.lower() for s in world.subjects for w in s.split()} | {o.lower() for o in words}
    assert not names & template_words


def test_relations_templates(cfg, world):
    assert len(world.relations) == cfg.n_relations
    for r in world.relations:
        assert len(r.corpus_templates) == 5 * cfg.n_prefixes
        assert len(set(r.corpus_templates)) == len(r.corpus_templates)
        for qt in r.query_templates:
            assert WT._is_query_template(qt)
            assert qt not in r.corpus_templates


def test_n_templates_keeps_the_first_phrasings(cfg, world):
    """world.n_templates = 3: each relation keeps its first 3 base phrasings (times the
    prefixes), every corpus sentence is one of them, and 0 (the default) is the full world."""
    small_cfg = _cfg()
    small_cfg.n_templates = 3
    small = W.make_world(small_cfg)
    for full_rel, r in zip(world.relations, small.relations, strict=True):
        assert len(r.corpus_templates) == 3 * cfg.n_prefixes
        assert set(r.corpus_templates) < set(full_rel.corpus_templates)
    rel = {r.name: r for r in small.relations}
    full = {r.name: r for r in world.relations}
    n_dropped_forms = 0
    for sent, f in _stated(small):
        r = rel[f.relation]
        kept = {W.fill(t, f.subject, f.object) for t in r.corpus_templates + r.query_templates}
        dropped = {W.fill(t, f.subject, f.object) for t in full[f.relation].corpus_templates}
        assert sent in kept, sent
        n_dropped_forms += len(dropped - kept)
    assert n_dropped_forms > 0  # The full world's other phrasings exist and were not used.
    assert W.world_hash(W.make_world(_cfg())) == W.world_hash(world)


def test_every_fact_is_stated_its_frequency(cfg, world):
    assert len(world.facts) == cfg.n_subjects * cfg.n_relations
    counts = collections.Counter(
        fid for d in world.documents for fid in d.sentence_fact_ids if fid >= 0
    )
    for f in world.facts:
        assert f.freq in cfg.freq_buckets
        assert counts[f.fact_id] == f.freq
    lo, hi = cfg.doc_sentences
    for d in world.documents:
        n_fact = sum(x >= 0 for x in d.sentence_fact_ids)
        assert 1 <= n_fact <= hi + lo
        assert {world.facts[i].subject for i in d.fact_ids} == {d.subject}
        assert d.text == " ".join(d.sentences)
        assert d.fact_ids == tuple(sorted({x for x in d.sentence_fact_ids if x >= 0}))


def test_corpus_sentences_state_their_annotated_facts(world):
    parser = FactParser(world)
    for d in world.documents:
        for sent, fid in zip(d.sentences, d.sentence_fact_ids, strict=True):
            assert parser.fact_ids(sent) == ({fid} if fid >= 0 else set()), sent


def test_candidates_state_exactly_their_facts(cfg, world):
    parser = FactParser(world)
    assert [c.cand_id for c in world.candidates] == list(range(len(world.candidates)))
    texts = [c.text for c in world.candidates]
    assert len(set(texts)) == len(texts)
    for c in world.candidates:
        assert parser.fact_ids(c.text) == set(c.fact_ids), c.text
        assert (c.kind == "fact") == bool(c.fact_ids)
    corpus_fact_sents = {
        s
        for d in world.documents
        for s, f in zip(d.sentences, d.sentence_fact_ids, strict=True)
        if f >= 0
    }
    assert {c.text for c in world.candidates if c.kind == "fact"} == corpus_fact_sents
    assert sum(c.kind == "distractor" for c in world.candidates) == cfg.n_distractor_candidates


def test_queries_ground_truth_and_splits(cfg, world):
    by_fact = collections.defaultdict(set)
    for c in world.candidates:
        for fid in c.fact_ids:
            by_fact[fid].add(c.cand_id)
    task, held = world.task_queries, world.heldout_queries
    assert len(task) == cfg.n_queries and len(held) == cfg.n_heldout_queries
    assert not {q.fact_id for q in task} & {q.fact_id for q in held}
    assert len({q.fact_id for q in world.queries}) == len(world.queries)
    for q in world.queries:
        f = world.facts[q.fact_id]
        assert not f.anchor
        assert q.target == f.object and q.bucket == f.freq
        assert set(q.candidate_ids) == by_fact[q.fact_id] and q.candidate_ids
        qt = world.relation(f.relation).query_templates[0]
        assert q.prompt == W.query_prompt(qt, f.subject) and q.prompt.startswith("The ")
        assert f.subject in q.prompt
    for split in (task, held):  # Stratified evenly over buckets.
        per = collections.Counter(q.bucket for q in split)
        assert set(per) == set(cfg.freq_buckets)
        assert max(per.values()) - min(per.values()) <= 1


def test_query_form_only_for_anchors(world):
    forms = {
        W.query_sentence(q.prompt, q.target) for q in world.queries
    }  # Queried facts' own query-form sentences never appear in training.
    anchor_uses = 0
    for sent, f in _stated(world):
        qt = world.relation(f.relation).query_templates[0]
        is_query_form = sent == W.query_sentence(W.query_prompt(qt, f.subject), f.object)
        assert not (is_query_form and not f.anchor)
        assert sent not in forms
        anchor_uses += is_query_form
    assert anchor_uses > 0


def test_zipf_objects():
    cfg = _cfg()
    cfg.n_subjects = 200
    skewed = W.make_world(cfg)
    cfg.zipf_exponent = 0.0
    flat = W.make_world(cfg)

    def top_share(w):
        c = collections.Counter(f.object for f in w.facts if f.relation == "born_in")
        return c.most_common(1)[0][1] / sum(c.values())

    # Zipf(1) over 8 objects puts ~37% on the first; uniform ~12.5%.
    assert top_share(skewed) > 0.28 and top_share(flat) < 0.22


def test_save_load_round_trip(tmp_path, world):
    h = W.save_world(world, str(tmp_path))
    for name in ("facts.jsonl", "documents.jsonl", "candidates.jsonl", "queries.jsonl"):
        assert os.path.isfile(tmp_path / name)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["content_hash"] == h == W.world_hash(world)
    assert manifest["counts"]["facts"] == len(world.facts)
    assert manifest["seed"] == world.config["seed"]
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]
    assert W.load_world(str(tmp_path)) == world
    # A tampered file no longer matches the manifest.
    p = tmp_path / "queries.jsonl"
    p.write_text(p.read_text().replace('"split": "task"', '"split": "heldout"', 1))
    with pytest.raises(W.WorldError, match="content hash"):
        W.load_world(str(tmp_path))
    os.remove(tmp_path / "manifest.json")
    with pytest.raises(W.WorldError, match="manifest.json missing"):
        W.load_world(str(tmp_path))


@pytest.mark.parametrize(
    "field,value",
    [
        ("n_subjects", 0),
        ("n_relations", 0),
        ("n_relations", W.MAX_RELATIONS + 1),
        ("n_objects_per_type", 0),
        ("n_queries", 10_000),
        ("n_heldout_queries", 10_000),
        ("freq_buckets", ()),
        ("anchor_frac", 1.0),
        ("n_prefixes", 0),
        ("n_templates", W.MAX_TEMPLATES + 1),
        ("doc_sentences", (3, 2)),
        ("filler_p", 1.5),
        ("n_distractor_candidates", 10**9),
        ("rare_token_candidates", -1),
    ],
)
def test_impossible_configs_raise_naming_field(field, value):
    cfg = _cfg()
    cfg[field] = value
    with pytest.raises(W.WorldError, match=re.escape(f"world.{field}")):
        W.make_world(cfg)


# --- rare-token distractor candidates ---------------------------------------------------------

# world_hash of the tiny world as built before world.rare_token_candidates existed: the default
# (0) must leave every existing world, and so every run built from it, exactly as it was.
TINY_WORLD_HASH = "8d5bd976e78a9f71"


def _words(texts):
    """Word-level tokens as the tokenizer splits them (whitespace, then punctuation)."""
    return {w for t in texts for w in re.findall(r"\w+|[^\w\s]", t)}


def test_rare_token_config_rule():
    from trackstar.config import RULES

    rule = RULES["world.rare_token_candidates"]
    assert rule.ok(0) and rule.ok(120) and not rule.ok(-1) and not rule.ok(1.5)


def test_rare_token_default_leaves_world_unchanged(cfg, world):
    assert cfg.rare_token_candidates == 0
    assert W.world_hash(world) == TINY_WORLD_HASH
    assert not any(c.kind == W.RARE_TOKEN_KIND for c in world.candidates)


def test_rare_token_candidates():
    from trackstar import tokenizer as T

    cfg = _cfg()
    cfg.rare_token_candidates = 30
    w, base = W.make_world(cfg), W.make_world(_cfg())
    rare = [c for c in w.candidates if c.kind == W.RARE_TOKEN_KIND]
    assert len(rare) == 30
    assert len(w.candidates) == len(base.candidates) + 30
    # Corpus, facts and the other candidates are the default world's; only candidates are added.
    assert w.documents == base.documents and w.facts == base.facts
    others = {(c.text, c.fact_ids, c.kind) for c in w.candidates if c.kind != W.RARE_TOKEN_KIND}
    assert others == {(c.text, c.fact_ids, c.kind) for c in base.candidates}
    assert [q.fact_id for q in w.queries] == [q.fact_id for q in base.queries]
    # Never ground truth.
    rare_ids = {c.cand_id for c in rare}
    assert all(not c.fact_ids for c in rare)
    assert not rare_ids & {i for q in w.queries for i in q.candidate_ids}
    assert all(q.candidate_ids for q in w.queries)
    # Each carries 1-3 made-up words that no training document (nor query) contains.
    seen = _words([d.text for d in w.documents])
    seen |= _words([q.prompt for q in w.queries] + [q.target for q in w.queries])
    fillers = {tuple(f.split()) for f in WT._FILLERS}
    made_up = []
    for c in rare:
        new = [x for x in c.text.split() if x not in _words(WT._FILLERS)]
        assert 1 <= len(new) <= 3 and not set(new) & seen, c.text
        # Removing them gives back a filler sentence.
        assert tuple(x for x in c.text.split() if x not in new) in fillers
        made_up += new
    assert len(set(made_up)) == len(made_up)  # Each word is used once.
    # ... yet the tokenizer (trained on every world text) gives each its own id.
    tok = T.train_tokenizer(
        W.world_texts(w), load_config_file(os.path.join(ROOT, "configs", "tiny.py")).tokenizer
    )
    for c in rare:
        assert T.UNK not in T.encode(tok, c.text)
    assert all(tok.token_to_id(x) is not None for x in made_up)
    # Deterministic; a T-REx file (which replaces the candidates) leaves the field unused.
    assert W.make_world(cfg) == w
    assert "rare_token_candidates" in W.unused_fields(
        dict(_lama_cfg().to_dict(), trex_candidates_path="x.jsonl", rare_token_candidates=5)
    )


def test_demo_scale():
    w = W.make_world(_cfg("demo"))
    assert len(w.facts) == 3200
    assert 10_000 <= len(w.candidates) <= 20_000
    words = set()
    for t in W.world_texts(w):
        words.update(re.findall(r"\w+|[^\w\s]", t))
    assert 450 <= len(words) <= 800


# --- LAMA / T-REx ---------------------------------------------------------------------------


def test_lama_world_facts_and_templates(lama_world):
    rows = [json.loads(x) for x in open(os.path.join(FIXTURES, "lama_facts.jsonl"))]
    first = {}
    for r in rows:
        first.setdefault((r["sub_label"], r["predicate_id"]), r["obj_label"])
    got = {(f.subject, f.relation): f.object for f in lama_world.facts}
    assert got == first  # Functional: the repeated Einstein/P27 row keeps its first object.
    assert got[("Albert Einstein", "P27")] == "Germany"
    rel = {r.name: r for r in lama_world.relations}
    assert rel["P19"].query_templates == ("[X] was born in [Y] .",)  # Marked; "[Y]." normalized.
    assert rel["P103"].query_templates == ("The native language of [X] is [Y] .",)  # First fit.
    assert "[X] grew up speaking [Y] ." in rel["P103"].corpus_templates
    assert "The native language of [X] is [Y] ." not in rel["P103"].corpus_templates
    q = lama_world.task_queries[0]
    assert q.target == lama_world.facts[q.fact_id].object and not q.prompt.endswith(" ")


def test_lama_world_candidates_and_round_trip(tmp_path, lama_world):
    parser = FactParser(lama_world)
    for c in lama_world.candidates:
        assert parser.fact_ids(c.text) == set(c.fact_ids), c.text
    counts = collections.Counter(
        fid for d in lama_world.documents for fid in d.sentence_fact_ids if fid >= 0
    )
    assert all(counts[f.fact_id] == f.freq for f in lama_world.facts)
    for q in lama_world.queries:
        assert not lama_world.facts[q.fact_id].anchor and q.candidate_ids
    W.save_world(lama_world, str(tmp_path))
    assert W.load_world(str(tmp_path)) == lama_world


def test_trex_candidates(lama_world):
    cands = W.read_trex_candidates(os.path.join(FIXTURES, "trex_sentences.jsonl"), lama_world)
    fid = {(f.subject, f.relation): f.fact_id for f in lama_world.facts}
    assert [c.source_id for c in cands] == ["s0", "s1", "s2", "s3", "s4", "s5"]
    assert cands[0].fact_ids == (fid[("Marie Curie", "P19")],)
    assert set(cands[1].fact_ids) == {
        fid[("Albert Einstein", "P19")],
        fid[("Albert Einstein", "P106")],
    }
    assert cands[2].fact_ids == () and cands[2].kind == "distractor"
    assert cands[3].fact_ids == ()  # Wrong object: not the world's fact.
    assert cands[4].fact_ids == ()  # Unknown subject.
    assert len(cands[5].fact_ids) == 2
    w2 = W.with_candidates(lama_world, cands)
    for q in w2.queries:
        assert q.candidate_ids == tuple(c.cand_id for c in cands if q.fact_id in c.fact_ids)


def test_lama_bad_input(tmp_path):
    cfg = _cfg()
    facts = tmp_path / "f.jsonl"
    facts.write_text(json.dumps({"sub_label": "A", "obj_label": "B", "predicate_id": "P9"}) + "\n")
    templates = os.path.join(FIXTURES, "lama_templates.jsonl")
    with pytest.raises(W.WorldError, match="P9"):
        W.load_lama_world(str(facts), templates, cfg)
    with pytest.raises(W.WorldError, match="does not exist"):
        W.load_lama_world(str(tmp_path / "nope.jsonl"), templates, cfg)
    cfg.n_queries = 1000
    with pytest.raises(W.WorldError, match="world.n_queries"):
        W.load_lama_world(os.path.join(FIXTURES, "lama_facts.jsonl"), templates, cfg)


def test_build_world_dispatch():
    cfg = _cfg()
    cfg.source = "lama"
    cfg.lama_facts_path = os.path.join(FIXTURES, "lama_facts.jsonl")
    cfg.lama_templates_path = os.path.join(FIXTURES, "lama_templates.jsonl")
    cfg.trex_candidates_path = os.path.join(FIXTURES, "trex_sentences.jsonl")
    cfg.n_queries = cfg.n_heldout_queries = 4
    w = W.build_world(cfg)
    assert w.source == "lama" and [c.source_id for c in w.candidates][0] == "s0"
    cfg.source = "wiki"
    with pytest.raises(W.WorldError, match="world.source"):
        W.build_world(cfg)


# --- bad input is refused while the world is built, naming file and line ------------------


def test_non_utf8_line_names_file_and_line(tmp_path):
    facts = tmp_path / "facts.jsonl"
    good = json.dumps({"sub_label": "A", "obj_label": "B", "predicate_id": "P19"}).encode()
    facts.write_bytes(good + b"\n" + b'{"sub_label": "Caf\xe9", "obj_label": "B"}\n')
    templates = os.path.join(FIXTURES, "lama_templates.jsonl")
    with pytest.raises(W.WorldError, match=re.escape(f"{facts}:2: not valid UTF-8")):
        W.load_lama_world(str(facts), templates, _cfg())
    trex = tmp_path / "trex.jsonl"
    trex.write_bytes(b'{"text": "ok ."}\n\n{"text": "\xff"}\n')
    w = W.load_lama_world(os.path.join(FIXTURES, "lama_facts.jsonl"), templates, _lama_cfg())
    with pytest.raises(W.WorldError, match=re.escape(f"{trex}:3: not valid UTF-8")):
        W.read_trex_candidates(str(trex), w)


def _lama_cfg():
    cfg = _cfg()
    cfg.source = "lama"
    cfg.lama_facts_path = os.path.join(FIXTURES, "lama_facts.jsonl")
    cfg.lama_templates_path = os.path.join(FIXTURES, "lama_templates.jsonl")
    cfg.n_queries = cfg.n_heldout_queries = 4
    return cfg


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_empty_input_files_refused(tmp_path, content):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(content)
    cfg = _lama_cfg()
    cfg.trex_candidates_path = str(empty)
    with pytest.raises(W.WorldError, match="T-REx sentences file .* is empty"):
        W.build_world(cfg)
    cfg = _lama_cfg()
    cfg.lama_templates_path = str(empty)
    with pytest.raises(W.WorldError, match="LAMA templates file .* is empty"):
        W.build_world(cfg)


def test_bad_rows_name_their_line(tmp_path):
    trex = tmp_path / "trex.jsonl"
    trex.write_text('{"text": "A sentence ."}\n\n{"text": "  "}\n')
    w = W.build_world(_lama_cfg())
    with pytest.raises(W.WorldError, match=re.escape(f"{trex}:3: empty 'text'")):
        W.read_trex_candidates(str(trex), w)
    facts = tmp_path / "facts.jsonl"
    facts.write_text('["not", "an", "object"]\n')
    with pytest.raises(W.WorldError, match=re.escape(f"{facts}:1: expected a JSON object")):
        W.load_lama_world(str(facts), os.path.join(FIXTURES, "lama_templates.jsonl"), _cfg())


def test_zero_task_queries_refused():
    cfg = _cfg()
    cfg.n_queries = 0
    with pytest.raises(W.WorldError, match="world.n_queries must be >= 1"):
        W.make_world(cfg)
    cfg = _lama_cfg()
    cfg.n_queries = 0
    with pytest.raises(W.WorldError, match="world.n_queries must be >= 1"):
        W.build_world(cfg)


def test_unused_fields_are_not_recorded(world):
    lama = _lama_cfg()
    assert set(W.unused_fields(lama)) == set(W.SYNTHETIC_ONLY_FIELDS)
    assert set(W.unused_fields(_cfg())) == set(W.LAMA_ONLY_FIELDS)
    lama.trex_candidates_path = os.path.join(FIXTURES, "trex_sentences.jsonl")
    assert "n_distractor_candidates" in W.unused_fields(lama)
    built = W.build_world(_lama_cfg())
    assert not set(W.SYNTHETIC_ONLY_FIELDS) & set(built.config)
    assert "n_queries" in built.config and "lama_facts_path" in built.config
    assert not set(W.LAMA_ONLY_FIELDS) & set(world.config)
    assert "n_subjects" in world.config


# --- LAMA / ParaRel files as published ----------------------------------------------------------

# ParaRel's data/pattern_data/graphs_json/<relation>.jsonl rows (relation from the file name).
_PARAREL = {
    "P19": [
        "[X] was born in [Y].",
        "[X], who was born in [Y].",
        "[Y] is the birthplace of [X] .",
        "[X] is originally from [Y] .",
    ],
    "P27": [
        "[X] is a citizen of [Y].",
        "[X] holds a passport of [Y].",
        "[Y] is the country of [X] .",
    ],
    "P103": [
        "The native language of [X] is [Y].",
        "[Y] is the mother tongue of [X] .",
        "[X] grew up speaking [Y] .",
    ],
    "P106": ["[X] works as a [Y].", "[X] is employed as a [Y].", "[Y] is the job of [X] ."],
}


def _pararel_dirs(tmp_path):
    patterns = tmp_path / "graphs_json"
    patterns.mkdir()
    for rel, pats in _PARAREL.items():
        rows = [
            {"pattern": p, "lemma": "x", "extended_lemma": "is-x", "tense": "present"} for p in pats
        ]
        (patterns / f"{rel}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    facts = tmp_path / "TREx"
    facts.mkdir()
    by_rel = collections.defaultdict(list)
    for line in open(os.path.join(FIXTURES, "lama_facts.jsonl"), encoding="utf-8"):
        row = json.loads(line)
        by_rel[row["predicate_id"]].append(dict(row, uuid="u", evidences=[]))
    for rel, rows in by_rel.items():
        (facts / f"{rel}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(facts), str(patterns)


def test_pararel_pattern_files_and_lama_fact_directories(tmp_path):
    facts, patterns = _pararel_dirs(tmp_path)
    cfg = _lama_cfg()
    w = W.load_lama_world(facts, patterns, cfg)
    rel = {r.name: r for r in w.relations}
    assert set(rel) == set(_PARAREL)
    # Default rule: each relation's first pattern with [X] before [Y] and [Y] at the end; the
    # other patterns (normalized, times the prefixes) are the corpus forms.
    assert rel["P19"].query_templates == ("[X] was born in [Y] .",)
    assert rel["P103"].query_templates == ("The native language of [X] is [Y] .",)
    assert set(rel["P19"].corpus_templates) >= {
        "[X], who was born in [Y] .",
        "[Y] is the birthplace of [X] .",
    }
    assert len(rel["P19"].corpus_templates) == 3 * cfg.n_prefixes
    fixture = W.load_lama_world(
        os.path.join(FIXTURES, "lama_facts.jsonl"),
        os.path.join(FIXTURES, "lama_templates.jsonl"),
        cfg,
    )
    assert {(f.subject, f.relation, f.object) for f in w.facts} == {
        (f.subject, f.relation, f.object) for f in fixture.facts
    }
    for q in w.queries:
        f = w.facts[q.fact_id]
        assert q.target == f.object and f.subject in q.prompt
    # One ParaRel file: the relation is the file's name.
    one = W.load_lama_world(
        os.path.join(facts, "P19.jsonl"), os.path.join(patterns, "P19.jsonl"), cfg
    )
    assert [r.name for r in one.relations] == ["P19"]


def test_lama_query_patterns_choose_the_query_templates(tmp_path):
    facts, patterns = _pararel_dirs(tmp_path)
    cfg = _lama_cfg()
    cfg.lama_query_patterns = (0, 1)
    with pytest.raises(W.WorldError, match=r"relation 'P103' needs a query template"):
        W.load_lama_world(facts, patterns, cfg)  # P103's pattern 1 has [Y] first.
    cfg.lama_query_patterns = (3,)
    with pytest.raises(W.WorldError, match=r"\(3,\): relation 'P103' has only 3 template rows"):
        W.load_lama_world(facts, patterns, cfg)
    rows = [{"pattern": _PARAREL["P103"][i]} for i in (0, 2, 1)]
    (tmp_path / "graphs_json" / "P103.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows)
    )
    cfg.lama_query_patterns = (0, 1)
    w = W.load_lama_world(facts, patterns, cfg)
    rel = {r.name: r for r in w.relations}
    assert rel["P19"].query_templates == ("[X] was born in [Y] .", "[X], who was born in [Y] .")
    assert rel["P103"].query_templates[1] == "[X] grew up speaking [Y] ."
    assert all(
        len(r.corpus_templates) == (len(_PARAREL[r.name]) - 2) * cfg.n_prefixes
        for r in rel.values()
    )
    assert w.config["lama_query_patterns"] == [0, 1]
    for q in w.queries:
        f = w.facts[q.fact_id]
        forms = {W.query_prompt(t, f.subject) for t in rel[f.relation].query_templates}
        assert q.prompt in forms


def test_pararel_bad_rows_and_untemplated_predicates(tmp_path):
    facts, patterns = _pararel_dirs(tmp_path)
    p = tmp_path / "graphs_json" / "P27.jsonl"
    p.write_text(p.read_text() + json.dumps({"lemma": "citizen"}) + "\n")
    with pytest.raises(W.WorldError, match=re.escape(f"{p}:4: row lacks 'template'")):
        W.load_lama_world(facts, patterns, _lama_cfg())
    p.unlink()
    with pytest.raises(
        W.WorldError, match=r"predicate 'P27' has no template .*without templates: P27"
    ):
        W.load_lama_world(facts, patterns, _lama_cfg())
    empty = tmp_path / "none"
    empty.mkdir()
    with pytest.raises(W.WorldError, match="holds no jsonl rows"):
        W.load_lama_world(facts, str(empty), _lama_cfg())
