"""A fact world to trace: entities, functional relations, a training corpus, candidates, queries.

The synthetic world (docs/method.md, "Embedded synthetic world") is generated from ``cfg.world``
with a ``numpy.random.Generator`` seeded by ``cfg.world.seed``; nothing is downloaded. The same
kind of world can be built from LAMA/ParaRel-style facts and templates (``load_lama_world``), and
T-REx-style annotated sentences can replace the closed candidate set (``read_trex_candidates`` +
``with_candidates``).

Vocabulary of the package:
- a *template* is a sentence with ``[X]`` (subject) and ``[Y]`` (object) slots;
- a *query template* has ``[Y]`` at its end (before an optional final punctuation mark): its
  prompt is the text before ``[Y]`` and its corpus form is ``"<prompt> <target> ."``;
- a *fact* is (subject, relation, object); relations are functional, so (subject, relation)
  identifies a fact;
- *anchors* are subjects whose corpus sentences also use the query form (so the model learns
  what each prompt asks); they are never queried.

Modules, each importing only those above it:
- ``records``: ``Relation``, ``Fact``, ``Document``, ``Candidate``, ``Query``, ``World``,
  ``WorldError``, ``world_texts``;
- ``templates``: the generator's relations, prefixes, distractor and filler sentences, and the
  template helpers (``fill``, ``query_prompt``, ``query_sentence``);
- ``checks``: config checks every source shares, ``unused_fields``;
- ``corpus``: the recipe from facts to documents, candidates and queries (``with_candidates``);
- ``synthetic``: ``make_world``, ``check_config``;
- ``lama``: ``load_lama_world``, ``read_trex_candidates`` (inputs checked line by line);
- ``build``: ``build_world`` (any source, optional T-REx candidates);
- ``io``: ``save_world``, ``load_world``, ``world_hash``.
"""

from trackstar.world.build import build_world
from trackstar.world.checks import LAMA_ONLY_FIELDS, SYNTHETIC_ONLY_FIELDS, unused_fields
from trackstar.world.corpus import with_candidates
from trackstar.world.io import load_world, save_world, world_hash
from trackstar.world.lama import load_lama_world, read_trex_candidates
from trackstar.world.records import (
    RARE_TOKEN_KIND,
    SOURCES,
    Candidate,
    Document,
    Fact,
    Query,
    Relation,
    World,
    WorldError,
    world_texts,
)
from trackstar.world.synthetic import check_config, make_world
from trackstar.world.templates import (
    MAX_PREFIXES,
    MAX_RELATIONS,
    MAX_TEMPLATES,
    fill,
    query_prompt,
    query_sentence,
)

__all__ = [
    "LAMA_ONLY_FIELDS",
    "MAX_PREFIXES",
    "MAX_RELATIONS",
    "MAX_TEMPLATES",
    "RARE_TOKEN_KIND",
    "SOURCES",
    "SYNTHETIC_ONLY_FIELDS",
    "Candidate",
    "Document",
    "Fact",
    "Query",
    "Relation",
    "World",
    "WorldError",
    "build_world",
    "check_config",
    "fill",
    "load_lama_world",
    "load_world",
    "make_world",
    "query_prompt",
    "query_sentence",
    "read_trex_candidates",
    "save_world",
    "unused_fields",
    "with_candidates",
    "world_hash",
    "world_texts",
]
