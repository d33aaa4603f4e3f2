"""The records a world is made of: relations, facts, documents, candidates, queries, the world.

Plain frozen dataclasses; ``trackstar.world.io`` writes each as one jsonl row per record, so a
field added here changes every world's content hash.
"""

from __future__ import annotations

import dataclasses
from typing import Any


class WorldError(ValueError):
    """A world config or input file that cannot give a usable world; the message says why."""


# Where a world's facts come from (``world.source``).
SOURCES = ("synthetic", "lama")

# Kind of the ``world.rare_token_candidates`` distractors: a filler sentence carrying one to three
# made-up words that no training document contains. The tokenizer (trained on every world text)
# gives those words ids, but training never moves their embedding rows (Adam's v stays 0), which
# is what the V correction's floor (featurize.v_floor) is there to handle.
RARE_TOKEN_KIND = "rare_token"


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


def world_texts(world: World) -> list[str]:
    """Every text a tokenizer must cover: documents, candidates, query prompts and targets."""
    texts = [d.text for d in world.documents]
    texts += [c.text for c in world.candidates]
    texts += [q.prompt for q in world.queries] + [q.target for q in world.queries]
    return texts
