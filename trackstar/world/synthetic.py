"""The synthetic world: made-up subjects and objects, the generator's relations and templates.

Generated from ``cfg.world`` with ``numpy.random.Generator`` streams seeded by ``cfg.world.seed``;
nothing is downloaded (docs/method.md, "Embedded synthetic world").
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from trackstar.world.checks import _check_common, _check_query_capacity, _get, _n_anchors
from trackstar.world.corpus import _build_world, _NameMaker, _rng
from trackstar.world.records import Relation, World, WorldError
from trackstar.world.templates import (
    _DISTRACTOR_TEMPLATES,
    _FILLERS,
    _PREFIXES,
    _RELATIONS,
    MAX_RELATIONS,
    MAX_TEMPLATES,
    _expand_prefixes,
    _template_words,
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
    if not 0 <= _n_templates(cfg) <= MAX_TEMPLATES:
        raise WorldError(
            f"world.n_templates must be in 0..{MAX_TEMPLATES} (0 = all the generator's base "
            f"phrasings), got {_n_templates(cfg)}"
        )
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


def _n_templates(cfg: Any) -> int:
    # Worlds saved before the field existed used every base phrasing.
    return int(cfg.get("n_templates", 0) if hasattr(cfg, "get") else 0)


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
            corpus_templates=_expand_prefixes(base[: _n_templates(cfg) or None], cfg.n_prefixes),
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
