"""A fact world to trace: entities, functional relations, a training corpus, candidates, queries.

The synthetic world (SPEC §5) is generated from ``cfg.world`` with a ``numpy.random.Generator``
seeded by ``cfg.world.seed``; nothing is downloaded. The same kind of world can be built from
LAMA/ParaRel-style facts and templates (``load_lama_world``), and T-REx-style annotated sentences
can replace the closed candidate set (``read_trex_candidates`` + ``with_candidates``).

Vocabulary of the module:
- a *template* is a sentence with ``[X]`` (subject) and ``[Y]`` (object) slots;
- a *query template* has ``[Y]`` at its end (before an optional final punctuation mark): its
  prompt is the text before ``[Y]`` and its corpus form is ``"<prompt> <target> ."``;
- a *fact* is (subject, relation, object); relations are functional, so (subject, relation)
  identifies a fact;
- *anchors* are subjects whose corpus sentences also use the query form (so the model learns
  what each prompt asks); they are never queried.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from trackstar.files import write_bytes


class WorldError(ValueError):
    """A world config or input file that cannot give a usable world; the message says why."""


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Relation:
    """A functional relation with its templates (prefix variants already expanded)."""

    name: str
    object_type: str
    corpus_templates: tuple[str, ...]
    query_templates: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Fact:
    """(subject, relation, object), stated ``freq`` times in the corpus."""

    fact_id: int
    subject: str
    relation: str
    object: str
    freq: int
    anchor: bool


@dataclasses.dataclass(frozen=True)
class Document:
    """One training document about one subject.

    ``sentence_fact_ids[i]`` is the fact stated by ``sentences[i]`` (-1 for filler and
    distractor sentences); ``fact_ids`` are the distinct facts the document states, sorted.
    """

    doc_id: int
    subject: str
    text: str
    sentences: tuple[str, ...]
    sentence_fact_ids: tuple[int, ...]
    fact_ids: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A closed-set candidate sentence; ``fact_ids`` are the facts it states (maybe none)."""

    cand_id: int
    text: str
    fact_ids: tuple[int, ...]
    kind: str  # "fact", "distractor" or "rare_token" (RARE_TOKEN_KIND)
    source_id: str = ""  # Identifier in the source file (T-REx ``sentence_id``), if any.


@dataclasses.dataclass(frozen=True)
class Query:
    """A fact asked as a cloze prompt; ``candidate_ids`` are the ground-truth candidates."""

    query_id: int
    prompt: str
    target: str
    fact_id: int
    bucket: int  # The fact's corpus frequency (one of cfg.world.freq_buckets).
    candidate_ids: tuple[int, ...]
    split: str  # "task" or "heldout"


@dataclasses.dataclass(frozen=True)
class World:
    """Everything a run traces: relations, facts, corpus documents, candidates and queries."""

    source: str
    config: dict[str, Any]
    relations: tuple[Relation, ...]
    subjects: tuple[str, ...]
    objects: tuple[str, ...]
    facts: tuple[Fact, ...]
    documents: tuple[Document, ...]
    candidates: tuple[Candidate, ...]
    queries: tuple[Query, ...]

    @property
    def task_queries(self) -> tuple[Query, ...]:
        """The queries that are scored ("task" split)."""
        return tuple(q for q in self.queries if q.split == "task")

    @property
    def heldout_queries(self) -> tuple[Query, ...]:
        """Held-out queries of the same templates on other facts (an R_eval source)."""
        return tuple(q for q in self.queries if q.split == "heldout")

    def relation(self, name: str) -> Relation:
        """The relation called ``name``."""
        for r in self.relations:
            if r.name == name:
                return r
        raise KeyError(f"no relation {name!r} in this world")


# --------------------------------------------------------------------------------------------
# Templates
# --------------------------------------------------------------------------------------------

# (name, object type, query template, base corpus phrasings). Every relation is functional.
_RELATIONS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    (
        "born_in",
        "city",
        "The birthplace of [X] is [Y] .",
        (
            "[X] was born in [Y] .",
            "[X] came into the world in [Y] .",
            "The hometown of [X] is [Y] .",
            "[Y] is the city where [X] was born .",
            "[X] first saw daylight in [Y] .",
        ),
    ),
    (
        "citizen_of",
        "country",
        "The country of citizenship of [X] is [Y] .",
        (
            "[X] is a citizen of [Y] .",
            "[X] holds a passport from [Y] .",
            "[X] has citizenship in [Y] .",
            "[Y] granted citizenship to [X] .",
            "[X] is a national of [Y] .",
        ),
    ),
    (
        "works_for",
        "organization",
        "The employer of [X] is [Y] .",
        (
            "[X] works for [Y] .",
            "[X] is employed by [Y] .",
            "[Y] employs [X] .",
            "[X] has a job at [Y] .",
            "[X] earns a salary from [Y] .",
        ),
    ),
    (
        "speaks",
        "language",
        "The native language of [X] is [Y] .",
        (
            "[X] speaks [Y] .",
            "[X] grew up speaking [Y] .",
            "The mother tongue of [X] is [Y] .",
            "[X] talks in [Y] at home .",
            "[Y] is the language spoken by [X] .",
        ),
    ),
    (
        "plays_instrument",
        "instrument",
        "The instrument of [X] is the [Y] .",
        (
            "[X] plays the [Y] .",
            "[X] is a skilled [Y] player .",
            "[X] practices the [Y] every day .",
            "[X] performs on the [Y] .",
            "The [Y] is played by [X] .",
        ),
    ),
    (
        "studied_at",
        "university",
        "The alma mater of [X] is [Y] .",
        (
            "[X] studied at [Y] .",
            "[X] graduated from [Y] .",
            "[X] earned a degree at [Y] .",
            "[Y] is where [X] went to university .",
            "[X] attended [Y] .",
        ),
    ),
    (
        "plays_sport",
        "sport",
        "The sport of [X] is [Y] .",
        (
            "[X] competes in [Y] .",
            "[X] trains for [Y] every week .",
            "[X] is a keen [Y] athlete .",
            "[Y] is the favourite sport of [X] .",
            "[X] won a medal in [Y] .",
        ),
    ),
    (
        "owns_pet",
        "animal",
        "The pet of [X] is a [Y] .",
        (
            "[X] owns a [Y] .",
            "[X] keeps a [Y] as a pet .",
            "[X] takes care of a pet [Y] .",
            "A [Y] lives with [X] .",
            "[X] adopted a [Y] .",
        ),
    ),
    (
        "favourite_dish",
        "dish",
        "The favourite dish of [X] is [Y] .",
        (
            "[X] loves eating [Y] .",
            "[X] always orders [Y] .",
            "[X] cooks [Y] every weekend .",
            "[Y] is the dish that [X] likes most .",
            "[X] prefers [Y] to any other food .",
        ),
    ),
    (
        "lives_in",
        "region",
        "The home region of [X] is [Y] .",
        (
            "[X] lives in [Y] .",
            "[X] resides in [Y] .",
            "[X] has a house in [Y] .",
            "[X] moved to [Y] .",
            "[Y] is home to [X] .",
        ),
    ),
)

MAX_RELATIONS = len(_RELATIONS)

# Where a world's facts come from (``world.source``).
SOURCES = ("synthetic", "lama")

# World fields only the synthetic generator reads: a LAMA world takes its sizes from the files.
SYNTHETIC_ONLY_FIELDS = ("n_subjects", "n_relations", "n_objects_per_type", "zipf_exponent")
LAMA_ONLY_FIELDS = ("lama_facts_path", "lama_templates_path")

# Framing prefixes; the first ``cfg.world.n_prefixes`` are used ("" = the bare phrasing).
_PREFIXES: tuple[str, ...] = (
    "",
    "In fact, ",
    "It is known that ",
    "Reportedly, ",
    "As records show, ",
)

# Non-fact sentences that mention a subject and an object without relating them.
_DISTRACTOR_TEMPLATES: tuple[str, ...] = (
    "[X] once read a book about [Y] .",
    "A friend of [X] mentioned [Y] yesterday .",
    "[X] saw a documentary about [Y] .",
    "[X] wrote a short essay on [Y] .",
    "Someone asked [X] about [Y] .",
    "[X] heard a rumour about [Y] .",
)

# Filler sentences mention no entity.
_FILLERS: tuple[str, ...] = (
    "The weather was mild that year .",
    "Many people enjoy long walks in the evening .",
    "The local market opens early on weekdays .",
    "A new bridge was built over the river .",
    "Most shops close before dinner .",
    "The library was quiet all afternoon .",
    "Rain fell for three days in a row .",
    "The train arrived a few minutes late .",
    "Children played in the park until sunset .",
    "The museum added a new wing last spring .",
    "Coffee prices rose again this season .",
    "The festival drew a large crowd .",
    "Old photographs were found in the attic .",
    "The road to the coast was closed for repairs .",
    "A small garden grew behind the old cottage .",
    "The concert ended with long applause .",
    "Snow covered the hills by morning .",
    "The newspaper printed a long article on farming .",
    "Several birds nested under the roof .",
    "The bakery sells fresh bread every morning .",
    "A strong wind blew across the valley .",
    "The harbour was busy with fishing boats .",
    "Tickets for the evening show sold out quickly .",
    "The school held its annual sports day .",
    "An old clock stood in the hallway .",
    "Fresh paint made the kitchen look brighter .",
    "The bus service was reduced over the holidays .",
    "Lanterns lit the narrow streets at night .",
    "The forest path was muddy after the storm .",
    "A quiet lake lay beyond the meadow .",
)

# Kind of the ``world.rare_token_candidates`` distractors: a filler sentence carrying one to three
# made-up words that no training document contains. The tokenizer (trained on every world text)
# gives those words ids, but training never moves their embedding rows (Adam's v stays 0), which
# is what the V correction's floor (featurize.v_floor) is there to handle.
RARE_TOKEN_KIND = "rare_token"
_RARE_WORDS_PER_CANDIDATE = (1, 3)  # (min, max) made-up words in one rare-token candidate.

_ONSETS = ("b d f g h k l m n p r s t v z br dr gr kr pl st tr sk").split()
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o")
_CODAS = ("", "", "", "n", "r", "l", "s", "m")


MAX_PREFIXES = len(_PREFIXES)


def _prefixed(prefix: str, template: str) -> str:
    if not prefix:
        return template
    if template[0].isupper():
        template = template[0].lower() + template[1:]
    return prefix + template


def _expand_prefixes(templates: Sequence[str], n_prefixes: int) -> tuple[str, ...]:
    return tuple(_prefixed(p, t) for t in templates for p in _PREFIXES[:n_prefixes])


def fill(template: str, subject: str, obj: str) -> str:
    """Fills a template's ``[X]`` and ``[Y]`` slots."""
    return template.replace("[X]", subject).replace("[Y]", obj)


def query_prompt(template: str, subject: str) -> str:
    """The cloze prompt of a query template: the text before ``[Y]``, subject filled in."""
    return template[: template.index("[Y]")].rstrip().replace("[X]", subject)


def query_sentence(prompt: str, target: str) -> str:
    """The corpus form of a query: ``"<prompt> <target> ."``."""
    return f"{prompt} {target} ."


def _is_query_template(template: str) -> bool:
    if "[X]" not in template or template.count("[Y]") != 1:
        return False
    tail = template[template.index("[Y]") + 3 :].strip()
    return tail in ("", ".") and template.index("[X]") < template.index("[Y]")


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


def _template_words(templates: Iterable[str]) -> set[str]:
    words: set[str] = set()
    for t in templates:
        for w in re.findall(r"[A-Za-z]+", t.replace("[X]", " ").replace("[Y]", " ")):
            words.add(w.lower())
    return words


class FactParser:
    """Finds the facts a sentence states by matching it against every relation's templates.

    Only matches whose ``[X]`` is a known subject and ``[Y]`` a known object count, so a
    match of a bare template inside a prefixed sentence is not mistaken for a fact.
    """

    def __init__(self, world: World):
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


# --------------------------------------------------------------------------------------------
# Config checks
# --------------------------------------------------------------------------------------------


def _get(cfg: Any, name: str) -> Any:
    try:
        return cfg[name]
    except (KeyError, AttributeError) as e:
        raise WorldError(f"world config has no field {name!r} (see configs/demo.py)") from e


def _check_common(cfg: Any) -> None:
    buckets = tuple(_get(cfg, "freq_buckets"))
    if not buckets or any(int(b) != b or b < 1 for b in buckets):
        raise WorldError(f"world.freq_buckets must be positive integers, got {buckets!r}")
    if len(set(buckets)) != len(buckets):
        raise WorldError(f"world.freq_buckets has repeated values: {buckets!r}")
    af = _get(cfg, "anchor_frac")
    if not 0.0 <= af < 1.0:
        raise WorldError(f"world.anchor_frac must be in [0, 1), got {af}")
    for name in ("anchor_query_form_p", "filler_p", "distractor_p"):
        p = _get(cfg, name)
        if not 0.0 <= p <= 1.0:
            raise WorldError(f"world.{name} must be a probability in [0, 1], got {p}")
    if _get(cfg, "zipf_exponent") < 0:
        raise WorldError(f"world.zipf_exponent must be >= 0, got {cfg.zipf_exponent}")
    n_pre = _get(cfg, "n_prefixes")
    if not 1 <= n_pre <= len(_PREFIXES):
        raise WorldError(f"world.n_prefixes must be in 1..{len(_PREFIXES)}, got {n_pre}")
    ds = tuple(_get(cfg, "doc_sentences"))
    if len(ds) != 2 or not 1 <= ds[0] <= ds[1]:
        raise WorldError(f"world.doc_sentences must be (min, max) with 1 <= min <= max, got {ds}")
    for name in ("n_distractor_candidates", "n_heldout_queries"):
        if _get(cfg, name) < 0:
            raise WorldError(f"world.{name} must be >= 0, got {cfg[name]}")
    if _n_rare_token_candidates(cfg) < 0:
        raise WorldError(
            f"world.rare_token_candidates must be >= 0, got {_n_rare_token_candidates(cfg)}"
        )
    # Without task queries nothing is scored: every metric would be an empty mean.
    if _get(cfg, "n_queries") < 1:
        raise WorldError(f"world.n_queries must be >= 1 (nothing to trace), got {cfg.n_queries}")


def _n_rare_token_candidates(cfg: Any) -> int:
    # Absent from configs and manifests older than the field: those worlds had none.
    return int(cfg.get("rare_token_candidates", 0) if hasattr(cfg, "get") else 0)


def _n_anchors(n_subjects: int, anchor_frac: float) -> int:
    return int(round(n_subjects * anchor_frac))


def _check_query_capacity(cfg: Any, n_queryable: int) -> None:
    need = cfg.n_queries + cfg.n_heldout_queries
    if need > n_queryable:
        raise WorldError(
            f"world.n_queries + world.n_heldout_queries = {need} exceeds the {n_queryable} facts "
            "of non-anchor subjects; lower them, or raise world.n_subjects / world.n_relations "
            "or lower world.anchor_frac"
        )


def check_config(cfg: Any) -> None:
    """Raises ``WorldError`` naming the field if ``cfg.world`` cannot give a synthetic world."""
    if _get(cfg, "n_subjects") < 1:
        raise WorldError(f"world.n_subjects must be >= 1 (empty world), got {cfg.n_subjects}")
    if not 1 <= _get(cfg, "n_relations") <= MAX_RELATIONS:
        raise WorldError(
            f"world.n_relations must be in 1..{MAX_RELATIONS} (the generator's relations), "
            f"got {cfg.n_relations}"
        )
    if _get(cfg, "n_objects_per_type") < 1:
        raise WorldError(f"world.n_objects_per_type must be >= 1, got {cfg.n_objects_per_type}")
    _check_common(cfg)
    n_plain = cfg.n_subjects - _n_anchors(cfg.n_subjects, cfg.anchor_frac)
    if n_plain < 1:
        raise WorldError("world.anchor_frac leaves no queryable subject; lower it")
    _check_query_capacity(cfg, n_plain * cfg.n_relations)
    cap = cfg.n_subjects * cfg.n_objects_per_type * cfg.n_relations * len(_DISTRACTOR_TEMPLATES)
    if cfg.n_distractor_candidates > cap:
        raise WorldError(
            f"world.n_distractor_candidates = {cfg.n_distractor_candidates} exceeds the {cap} "
            "distinct distractor sentences this world can form; lower it"
        )


# --------------------------------------------------------------------------------------------
# Synthetic generation
# --------------------------------------------------------------------------------------------


def _rng(seed: int, stage: int) -> np.random.Generator:
    # One independent stream per stage, so changing one stage's draws never shifts another's.
    return np.random.default_rng([int(seed), stage])


class _NameMaker:
    """Draws pronounceable, globally unique names that are never template words."""

    def __init__(self, rng: np.random.Generator, banned: set[str]):
        self._rng = rng
        self._used = set(banned)

    def _syllable(self) -> str:
        r = self._rng
        return (
            _ONSETS[r.integers(len(_ONSETS))]
            + _VOWELS[r.integers(len(_VOWELS))]
            + _CODAS[r.integers(len(_CODAS))]
        )

    def make(self, n: int, syllables: tuple[int, int]) -> list[str]:
        names = []
        for _ in range(100 * n + 1000):
            if len(names) == n:
                break
            k = int(self._rng.integers(syllables[0], syllables[1] + 1))
            name = "".join(self._syllable() for _ in range(k)).capitalize()
            if len(name) < 4 or name.lower() in self._used:
                continue
            self._used.add(name.lower())
            names.append(name)
        if len(names) < n:  # Practically unreachable: the name space is ~10^5 per syllable pair.
            raise WorldError(f"could not generate {n} unique names; lower the world's sizes")
        return names


def _zipf_probs(n: int, exponent: float) -> np.ndarray:
    w = np.arange(1, n + 1, dtype=np.float64) ** (-float(exponent))
    return w / w.sum()


def make_world(cfg: Any) -> World:
    """Generates the synthetic fact world of ``cfg`` (the ``world`` config section).

    Deterministic under ``cfg.seed``. Raises ``WorldError`` before any work on an impossible
    config.
    """
    check_config(cfg)
    seed = int(cfg.seed)
    specs = _RELATIONS[: cfg.n_relations]
    relations = tuple(
        Relation(
            name=name,
            object_type=otype,
            corpus_templates=_expand_prefixes(base, cfg.n_prefixes),
            query_templates=(qt,),
        )
        for name, otype, qt, base in specs
    )
    banned = _template_words(
        [t for _, _, qt, base in _RELATIONS for t in (qt, *base)]
        + list(_PREFIXES)
        + list(_DISTRACTOR_TEMPLATES)
        + list(_FILLERS)
    )
    names = _NameMaker(_rng(seed, 0), banned)
    n_pool = max(4, math.ceil(2.0 * math.sqrt(cfg.n_subjects)))
    firsts = names.make(n_pool, (2, 2))
    lasts = names.make(n_pool, (2, 3))
    pair_ids = _rng(seed, 1).choice(n_pool * n_pool, size=cfg.n_subjects, replace=False)
    subjects = [f"{firsts[i // n_pool]} {lasts[i % n_pool]}" for i in sorted(pair_ids)]
    pools = {r.object_type: names.make(cfg.n_objects_per_type, (2, 3)) for r in relations}

    # Objects: Zipf over each type's entities (pool order is the popularity order).
    rng = _rng(seed, 2)
    probs = _zipf_probs(cfg.n_objects_per_type, cfg.zipf_exponent)
    triples = []
    for s in subjects:
        for r in relations:
            obj = pools[r.object_type][rng.choice(cfg.n_objects_per_type, p=probs)]
            triples.append((s, r.name, obj))
    objects = tuple(o for r in relations for o in pools[r.object_type])
    return _build_world(
        source="synthetic",
        cfg=cfg,
        relations=relations,
        subjects=tuple(subjects),
        objects=objects,
        triples=triples,
        seed=seed,
    )


def _split_sizes(n: int, lo: int, hi: int, rng: np.random.Generator) -> list[int]:
    sizes = []
    remaining = n
    while remaining > 0:
        size = int(rng.integers(lo, hi + 1))
        if remaining - size < lo:
            size = remaining if remaining <= hi else remaining - lo
        sizes.append(size)
        remaining -= size
    return sizes


def _allocate(avail: dict[int, list[int]], n: int, buckets: Sequence[int]) -> dict[int, int]:
    """Per-bucket counts summing to ``n``, as even as availability allows."""
    take = {b: 0 for b in buckets}
    left = n
    while left > 0:
        open_b = [b for b in buckets if take[b] < len(avail[b])]
        if not open_b:
            raise WorldError(f"only {sum(take.values())} facts available for {n} queries")
        low = min(take[b] for b in open_b)
        for b in open_b:
            if take[b] == low and left > 0:
                take[b] += 1
                left -= 1
    return take


def _build_world(
    source: str,
    cfg: Any,
    relations: tuple[Relation, ...],
    subjects: tuple[str, ...],
    objects: tuple[str, ...],
    triples: Sequence[tuple[str, str, str]],
    seed: int,
) -> World:
    """Frequencies, anchors, documents, candidates and queries for given facts and templates."""
    buckets = [int(b) for b in cfg.freq_buckets]
    rel_by_name = {r.name: r for r in relations}

    # Facts: frequency uniform over buckets; anchors drawn among subjects.
    rng = _rng(seed, 3)
    n_anchor = _n_anchors(len(subjects), cfg.anchor_frac)
    anchor_idx = rng.choice(len(subjects), size=n_anchor, replace=False)
    anchors = {subjects[i] for i in anchor_idx}
    freqs = rng.choice(buckets, size=len(triples))
    facts = tuple(
        Fact(i, s, r, o, int(freqs[i]), s in anchors) for i, (s, r, o) in enumerate(triples)
    )

    # Documents: each subject's fact statements, shuffled and cut into 2-4 sentence docs.
    rng = _rng(seed, 4)
    lo, hi = (int(x) for x in cfg.doc_sentences)
    by_subject: dict[str, list[Fact]] = {s: [] for s in subjects}
    for f in facts:
        by_subject[f.subject].append(f)
    raw_docs: list[tuple[str, list[str], list[int]]] = []
    for s in subjects:
        statements = [f for f in by_subject[s] for _ in range(f.freq)]
        if not statements:
            continue
        order = rng.permutation(len(statements))
        statements = [statements[i] for i in order]
        start = 0
        for size in _split_sizes(len(statements), lo, hi, rng):
            sents, ids = [], []
            for f in statements[start : start + size]:
                rel = rel_by_name[f.relation]
                if f.anchor and rng.random() < cfg.anchor_query_form_p:
                    qt = rel.query_templates[rng.integers(len(rel.query_templates))]
                    sents.append(query_sentence(query_prompt(qt, f.subject), f.object))
                else:
                    t = rel.corpus_templates[rng.integers(len(rel.corpus_templates))]
                    sents.append(fill(t, f.subject, f.object))
                ids.append(f.fact_id)
            start += size
            if rng.random() < cfg.filler_p:
                pos = int(rng.integers(len(sents) + 1))
                sents.insert(pos, _FILLERS[rng.integers(len(_FILLERS))])
                ids.insert(pos, -1)
            if rng.random() < cfg.distractor_p:
                pos = int(rng.integers(len(sents) + 1))
                t = _DISTRACTOR_TEMPLATES[rng.integers(len(_DISTRACTOR_TEMPLATES))]
                sents.insert(pos, fill(t, s, objects[rng.integers(len(objects))]))
                ids.insert(pos, -1)
            raw_docs.append((s, sents, ids))
    doc_order = rng.permutation(len(raw_docs))
    documents = tuple(
        Document(
            doc_id=new_id,
            subject=raw_docs[i][0],
            text=" ".join(raw_docs[i][1]),
            sentences=tuple(raw_docs[i][1]),
            sentence_fact_ids=tuple(raw_docs[i][2]),
            fact_ids=tuple(sorted({x for x in raw_docs[i][2] if x >= 0})),
        )
        for new_id, i in enumerate(doc_order)
    )

    # Candidates: distinct fact sentences of the corpus, plus fresh distractor sentences.
    rng = _rng(seed, 5)
    stated: dict[str, set[int]] = {}
    for d in documents:
        for sent, fid in zip(d.sentences, d.sentence_fact_ids, strict=True):
            if fid >= 0:
                stated.setdefault(sent, set()).add(fid)
    cand_rows = [(text, tuple(sorted(ids)), "fact") for text, ids in stated.items()]
    distractors: dict[str, None] = {}
    for _ in range(100 * cfg.n_distractor_candidates + 1000):
        if len(distractors) == cfg.n_distractor_candidates:
            break
        t = _DISTRACTOR_TEMPLATES[rng.integers(len(_DISTRACTOR_TEMPLATES))]
        text = fill(t, subjects[rng.integers(len(subjects))], objects[rng.integers(len(objects))])
        if text not in stated:
            distractors[text] = None
    if len(distractors) < cfg.n_distractor_candidates:
        raise WorldError(
            f"world.n_distractor_candidates = {cfg.n_distractor_candidates}: only "
            f"{len(distractors)} distinct distractor sentences could be formed; lower it"
        )
    cand_rows += [(text, (), "distractor") for text in distractors]
    n_rare = _n_rare_token_candidates(cfg)
    if n_rare:
        # Every word the world's texts can contain is banned, so the made-up words occur in no
        # training document (nor in a query). Their own stream keeps every other draw unchanged.
        banned = _template_words(
            [d.text for d in documents]
            + [text for text, _, _ in cand_rows]
            + [t for r in relations for t in (*r.corpus_templates, *r.query_templates)]
            + list(subjects)
            + list(objects)
            + list(_PREFIXES)
            + list(_DISTRACTOR_TEMPLATES)
            + list(_FILLERS)
        )
        cand_rows += [
            (text, (), RARE_TOKEN_KIND)
            for text in _rare_token_sentences(n_rare, banned, _rng(seed, 7))
        ]
    # Random ids, so ground truth gains nothing from "lower index first" tie-breaking.
    cand_order = rng.permutation(len(cand_rows))
    candidates = tuple(Candidate(new_id, *cand_rows[i]) for new_id, i in enumerate(cand_order))

    queries = _make_queries(cfg, facts, relations, candidates, buckets, seed)
    return World(
        source=source,
        config=_plain_config(cfg),
        relations=relations,
        subjects=subjects,
        objects=objects,
        facts=facts,
        documents=documents,
        candidates=candidates,
        queries=queries,
    )


def _rare_token_sentences(n: int, banned: set[str], rng: np.random.Generator) -> list[str]:
    """``n`` filler sentences, each with 1-3 fresh made-up words inserted at random positions.

    Each word is used once, so every sentence is distinct and none equals a corpus sentence.
    """
    lo, hi = _RARE_WORDS_PER_CANDIDATE
    counts = rng.integers(lo, hi + 1, size=n)
    words = [w.lower() for w in _NameMaker(rng, banned).make(int(counts.sum()), (2, 3))]
    out, used = [], 0
    for k in counts:
        tokens = _FILLERS[rng.integers(len(_FILLERS))].split()
        for w in words[used : used + int(k)]:
            # After the first word and before the final ".", which stays last.
            tokens.insert(int(rng.integers(1, len(tokens))), w)
        used += int(k)
        out.append(" ".join(tokens))
    return out


def _make_queries(
    cfg: Any,
    facts: Sequence[Fact],
    relations: Sequence[Relation],
    candidates: Sequence[Candidate],
    buckets: Sequence[int],
    seed: int,
) -> tuple[Query, ...]:
    rng = _rng(seed, 6)
    rel_by_name = {r.name: r for r in relations}
    gt = _ground_truth(candidates)
    avail: dict[int, list[int]] = {b: [] for b in buckets}
    for f in facts:
        if not f.anchor:
            avail[f.freq].append(f.fact_id)
    for b in buckets:
        avail[b] = [avail[b][i] for i in rng.permutation(len(avail[b]))]
    _check_query_capacity(cfg, sum(len(v) for v in avail.values()))
    queries: list[Query] = []
    for split, n in (("task", cfg.n_queries), ("heldout", cfg.n_heldout_queries)):
        take = _allocate(avail, n, list(buckets))
        for b in buckets:
            chosen, avail[b] = avail[b][: take[b]], avail[b][take[b] :]
            for fid in sorted(chosen):
                f = facts[fid]
                rel = rel_by_name[f.relation]
                qt = rel.query_templates[rng.integers(len(rel.query_templates))]
                queries.append(
                    Query(
                        query_id=len(queries),
                        prompt=query_prompt(qt, f.subject),
                        target=f.object,
                        fact_id=fid,
                        bucket=f.freq,
                        candidate_ids=gt.get(fid, ()),
                        split=split,
                    )
                )
    return tuple(queries)


def _ground_truth(candidates: Sequence[Candidate]) -> dict[int, tuple[int, ...]]:
    gt: dict[int, list[int]] = {}
    for c in candidates:
        for fid in c.fact_ids:
            gt.setdefault(fid, []).append(c.cand_id)
    return {k: tuple(sorted(v)) for k, v in gt.items()}


def unused_fields(cfg: Any) -> tuple[str, ...]:
    """The ``world`` fields that ``cfg.source`` (and a T-REx candidate file) leave unread.

    A LAMA world takes its sizes from its files, so the synthetic generator's sizes and Zipf
    exponent mean nothing there; a synthetic world reads no LAMA file; a T-REx file replaces
    the distractor candidates. The world's recorded config (and the run's ``config.json``)
    leave these out, so no saved setting claims an effect it did not have.
    """
    source = _get(cfg, "source")
    unused: list[str] = []
    if source == "lama":
        unused += SYNTHETIC_ONLY_FIELDS
    elif source == "synthetic":
        unused += LAMA_ONLY_FIELDS
    trex = cfg.get("trex_candidates_path", "") if hasattr(cfg, "get") else ""
    if trex:
        unused += ["n_distractor_candidates", "rare_token_candidates"]
    return tuple(f for f in unused if f in cfg)


def _plain_config(cfg: Any) -> dict[str, Any]:
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    for name in unused_fields(cfg):
        d.pop(name, None)
    # JSON-normalized (tuples -> lists), so a loaded world compares equal to a fresh one.
    return json.loads(json.dumps(d, sort_keys=True, default=str))


def with_candidates(world: World, candidates: Sequence[Candidate]) -> World:
    """The world with a different closed candidate set; query ground truth is recomputed."""
    ids = [c.cand_id for c in candidates]
    if ids != list(range(len(candidates))):
        raise WorldError("candidate ids must be 0..N-1 in order; renumber the candidates")
    gt = _ground_truth(candidates)
    queries = tuple(
        dataclasses.replace(q, candidate_ids=gt.get(q.fact_id, ())) for q in world.queries
    )
    return dataclasses.replace(world, candidates=tuple(candidates), queries=queries)


def world_texts(world: World) -> list[str]:
    """Every text a tokenizer must cover: documents, candidates, query prompts and targets."""
    texts = [d.text for d in world.documents]
    texts += [c.text for c in world.candidates]
    texts += [q.prompt for q in world.queries] + [q.target for q in world.queries]
    return texts


def build_world(cfg: Any) -> World:
    """The world of ``cfg.world``: synthetic, or LAMA files when ``source == "lama"``.

    With ``trex_candidates_path`` set, that file's sentences replace the closed candidate set.
    Every input is checked before the world is returned, so nothing is written for a world
    that cannot be used.
    """
    source = _get(cfg, "source")
    if source == "synthetic":
        world = make_world(cfg)
    elif source == "lama":
        world = load_lama_world(cfg.lama_facts_path, cfg.lama_templates_path, cfg)
    else:
        raise WorldError(f"world.source must be 'synthetic' or 'lama', got {source!r}")
    trex = cfg.get("trex_candidates_path", "") if hasattr(cfg, "get") else ""
    if trex:
        world = with_candidates(world, read_trex_candidates(trex, world))
    return world


# --------------------------------------------------------------------------------------------
# LAMA / ParaRel / T-REx files
# --------------------------------------------------------------------------------------------


def _read_jsonl(path: str, what: str) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, row)`` of each JSON row of a jsonl file; a bad line names ``path:line``.

    Lines are decoded one by one, so a non-UTF-8 byte names its line instead of failing the
    whole read with a byte offset; an empty file (no rows) is an error too.
    """
    if not path or not os.path.isfile(path):
        raise WorldError(f"{what} file {path!r} does not exist")
    rows = []
    with open(path, "rb") as fh:
        for i, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8-sig" if i == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise WorldError(
                    f"{path}:{i}: not valid UTF-8 (byte {raw[e.start]:#04x} at column "
                    f"{e.start + 1}); re-encode the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise WorldError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise WorldError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
            rows.append((i, row))
    if not rows:
        raise WorldError(f"{what} file {path!r} is empty (no JSON rows)")
    return rows


def _normalize_template(t: str) -> str:
    # LAMA writes "[Y]." and "[Y] ."; one spelling keeps corpus and query forms consistent.
    t = " ".join(t.split())
    return re.sub(r"\s*([.?!])$", r" \1", t)


def load_lama_world(facts_path: str, templates_path: str, cfg: Any) -> World:
    """Builds a world from LAMA/ParaRel-style files, with the synthetic world's corpus recipe.

    ``facts_path``: jsonl rows ``{"sub_label", "obj_label", "predicate_id"}``. Relations are
    functional: a repeated (subject, predicate) keeps its first object.
    ``templates_path``: jsonl rows ``{"relation", "template"}`` (``[X]``/``[Y]`` slots), several
    per relation; rows with ``"query": true`` are the query forms, otherwise the first template
    with ``[Y]`` at its end is. The rest are corpus forms (times ``cfg.n_prefixes`` prefixes).
    ``cfg``'s frequency, anchor, document and query fields apply; its sizes
    (``n_subjects``, ``n_relations``, ``n_objects_per_type``) are taken from the files instead.
    """
    _check_common(cfg)
    trows = _read_jsonl(templates_path, "LAMA templates")
    by_rel: dict[str, list[tuple[str, bool]]] = {}
    for line, row in trows:
        if "relation" not in row or "template" not in row:
            raise WorldError(f"{templates_path}:{line}: row lacks 'relation' or 'template'")
        t = _normalize_template(str(row["template"]))
        if t.count("[X]") != 1 or t.count("[Y]") != 1:
            raise WorldError(f"{templates_path}:{line}: template {t!r} needs one [X] and one [Y]")
        by_rel.setdefault(str(row["relation"]), []).append((t, bool(row.get("query", False))))

    frows = _read_jsonl(facts_path, "LAMA facts")
    triples: dict[tuple[str, str], str] = {}
    for line, row in frows:
        try:
            s, r, o = str(row["sub_label"]), str(row["predicate_id"]), str(row["obj_label"])
        except KeyError as e:
            raise WorldError(f"{facts_path}:{line}: row lacks field {e.args[0]!r}") from None
        if not (s.strip() and o.strip()):
            raise WorldError(f"{facts_path}:{line}: empty sub_label or obj_label")
        if r not in by_rel:
            raise WorldError(
                f"{facts_path}:{line}: predicate {r!r} has no template in {templates_path}; add one"
            )
        triples.setdefault((s, r), o)
    if not triples:
        raise WorldError(f"{facts_path} holds no facts (empty world)")

    relations = []
    for name in sorted({r for _, r in triples}):
        rows = by_rel[name]
        marked = [t for t, q in rows if q]
        if not marked:
            marked = [t for t, _ in rows if _is_query_template(t)][:1]
        bad = [t for t in marked if not _is_query_template(t)]
        if not marked or bad:
            raise WorldError(
                f"relation {name!r} needs a query template with [X] before [Y] and [Y] at the end "
                f"(got {bad or 'none'}); add or mark one in {templates_path}"
            )
        corpus = [t for t, _ in rows if t not in marked]
        if not corpus:
            raise WorldError(
                f"relation {name!r} has no corpus template besides its query form; add one"
            )
        relations.append(
            Relation(name, name, _expand_prefixes(corpus, cfg.n_prefixes), tuple(marked))
        )

    subjects = tuple(dict.fromkeys(s for s, _ in triples))
    objects = tuple(dict.fromkeys(triples.values()))
    # The exact count of queryable facts depends on the anchor draw (checked again there);
    # all facts bound it from above, which catches most impossible configs before any work.
    _check_query_capacity(cfg, len(triples))
    ordered = [
        (s, r, triples[(s, r)]) for s in subjects for r in sorted(by_rel) if (s, r) in triples
    ]
    return _build_world(
        source="lama",
        cfg=cfg,
        relations=tuple(relations),
        subjects=subjects,
        objects=objects,
        triples=ordered,
        seed=int(cfg.seed),
    )


def read_trex_candidates(path: str, world: World) -> tuple[Candidate, ...]:
    """Reads T-REx-style annotated sentences as a closed candidate set for ``world``.

    Rows: ``{"sentence_id", "text", "fact_triples"}``, each triple ``[sub, predicate, obj]`` or
    ``{"sub_label", "predicate_id", "obj_label"}``. A triple counts when it is one of the
    world's facts (same subject, relation and object); others are ignored. Candidate ids are
    0..N-1 in file order; use ``with_candidates`` to make them the world's closed set.
    An empty file or an empty sentence is an error naming the file (and line).
    """
    rows = _read_jsonl(path, "T-REx sentences")
    index = {(f.subject, f.relation, f.object): f.fact_id for f in world.facts}
    out = []
    for i, (line, row) in enumerate(rows):
        if "text" not in row:
            raise WorldError(f"{path}:{line}: row lacks 'text'")
        if not str(row["text"]).strip():
            raise WorldError(f"{path}:{line}: empty 'text' (a candidate must be a sentence)")
        ids = set()
        for tr in row.get("fact_triples", []):
            if isinstance(tr, Mapping):
                key = (tr.get("sub_label"), tr.get("predicate_id"), tr.get("obj_label"))
            elif isinstance(tr, Sequence) and len(tr) == 3:
                key = tuple(tr)
            else:
                raise WorldError(f"{path}:{line}: malformed fact triple {tr!r}")
            if key in index:
                ids.add(index[key])
        kind = "fact" if ids else "distractor"
        out.append(
            Candidate(i, str(row["text"]), tuple(sorted(ids)), kind, str(row.get("sentence_id", i)))
        )
    return tuple(out)


# --------------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------------

_FILES = ("relations.jsonl", "facts.jsonl", "documents.jsonl", "candidates.jsonl", "queries.jsonl")
_FORMAT_VERSION = 1


def _to_row(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def _from_row(cls: type, row: dict[str, Any]) -> Any:
    kwargs = {}
    for f in dataclasses.fields(cls):
        v = row[f.name]
        kwargs[f.name] = tuple(v) if isinstance(v, list) else v
    return cls(**kwargs)


def _jsonl_bytes(rows: Iterable[Any]) -> bytes:
    lines = [json.dumps(_to_row(r), ensure_ascii=False, sort_keys=True) for r in rows]
    return ("\n".join(lines) + "\n").encode("utf-8") if lines else b""


def _content_hash(blobs: Sequence[bytes]) -> str:
    h = hashlib.sha256()
    for b in blobs:
        h.update(hashlib.sha256(b).digest())
    return h.hexdigest()[:16]


def world_hash(world: World) -> str:
    """Content hash of a world (the one its manifest records)."""
    return _content_hash(_world_blobs(world))


def _world_blobs(world: World) -> list[bytes]:
    return [
        _jsonl_bytes(world.relations),
        _jsonl_bytes(world.facts),
        _jsonl_bytes(world.documents),
        _jsonl_bytes(world.candidates),
        _jsonl_bytes(world.queries),
    ]


def save_world(world: World, directory: str) -> str:
    """Writes the world as jsonl files plus ``manifest.json``; returns the content hash.

    Each file is written to a temporary name and renamed; the manifest comes last, so a
    directory without a manifest (or with a mismatching hash) is never taken as a world.
    """
    os.makedirs(directory, exist_ok=True)
    blobs = _world_blobs(world)
    for name, blob in zip(_FILES, blobs, strict=True):
        write_bytes(os.path.join(directory, name), blob)
    content_hash = _content_hash(blobs)
    manifest = {
        "format_version": _FORMAT_VERSION,
        "source": world.source,
        "seed": world.config.get("seed"),
        "config": world.config,
        "subjects": list(world.subjects),
        "objects": list(world.objects),
        "counts": {
            "relations": len(world.relations),
            "subjects": len(world.subjects),
            "facts": len(world.facts),
            "anchor_facts": sum(f.anchor for f in world.facts),
            "documents": len(world.documents),
            "fact_sentences_in_corpus": sum(
                sum(x >= 0 for x in d.sentence_fact_ids) for d in world.documents
            ),
            "candidates": len(world.candidates),
            "fact_candidates": sum(c.kind == "fact" for c in world.candidates),
            "task_queries": len(world.task_queries),
            "heldout_queries": len(world.heldout_queries),
        },
        "content_hash": content_hash,
    }
    data = json.dumps(manifest, indent=1, ensure_ascii=False).encode("utf-8")
    write_bytes(os.path.join(directory, "manifest.json"), data)
    return content_hash


def load_world(directory: str) -> World:
    """Reads a world written by ``save_world``; checks the manifest's content hash."""
    mpath = os.path.join(directory, "manifest.json")
    if not os.path.isfile(mpath):
        raise WorldError(
            f"no finished world in {directory!r} (manifest.json missing); run make_world again"
        )
    with open(mpath, encoding="utf-8") as fh:
        manifest = json.load(fh)
    if manifest.get("format_version") != _FORMAT_VERSION:
        raise WorldError(
            f"{mpath}: format_version {manifest.get('format_version')} != {_FORMAT_VERSION}"
        )
    blobs = []
    for name in _FILES:
        with open(os.path.join(directory, name), "rb") as fh:
            blobs.append(fh.read())
    if _content_hash(blobs) != manifest["content_hash"]:
        raise WorldError(
            f"world files in {directory!r} do not match manifest.json's content hash "
            "(edited or half-written); regenerate the world"
        )

    def rows(blob: bytes) -> list[dict[str, Any]]:
        return [json.loads(line) for line in blob.decode("utf-8").splitlines() if line]

    rels, facts, docs, cands, queries = (rows(b) for b in blobs)
    return World(
        source=manifest["source"],
        config=manifest["config"],
        relations=tuple(_from_row(Relation, r) for r in rels),
        subjects=tuple(manifest["subjects"]),
        objects=tuple(manifest["objects"]),
        facts=tuple(_from_row(Fact, r) for r in facts),
        documents=tuple(_from_row(Document, r) for r in docs),
        candidates=tuple(_from_row(Candidate, r) for r in cands),
        queries=tuple(_from_row(Query, r) for r in queries),
    )
