"""LAMA / ParaRel facts and templates as a world, and T-REx sentences as its candidate set.

Every input row is checked while it is read; a bad one raises ``WorldError`` naming
``path:line`` (non-UTF-8 bytes, bad JSON, missing fields, empty text), so nothing is built from a
file that cannot give a usable world.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from trackstar.world.checks import _check_common, _check_query_capacity
from trackstar.world.corpus import _build_world
from trackstar.world.records import Candidate, Relation, World, WorldError
from trackstar.world.templates import _expand_prefixes, _is_query_template


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
