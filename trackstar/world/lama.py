"""LAMA / ParaRel facts and templates as a world, and T-REx sentences as its candidate set.

The files are read as the datasets publish them: LAMA T-REx facts (``data/TREx/P*.jsonl``),
LAMA relation templates (``data/relations.jsonl``), ParaRel patterns
(``data/pattern_data/graphs_json/P*.jsonl``, relation from the file name); a path may be one
file or a directory of them.

Every input row is checked while it is read; a bad one raises ``WorldError`` naming
``path:line`` (non-UTF-8 bytes, bad JSON, missing fields, empty text), so nothing is built from a
file that cannot give a usable world.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from trackstar.files import iter_jsonl
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
    rows = _file_rows(path)
    if not rows:
        raise WorldError(f"{what} file {path!r} is empty (no JSON rows)")
    return rows


def _file_rows(path: str) -> list[tuple[int, dict[str, Any]]]:
    return list(iter_jsonl(path, WorldError))


def _read_jsonl_files(path: str, what: str) -> list[tuple[str, int, dict[str, Any]]]:
    """``(file, line, row)`` of a jsonl file, or of every ``*.jsonl`` file of a directory.

    LAMA (``data/TREx/P19.jsonl``) and ParaRel (``data/pattern_data/graphs_json/P19.jsonl``)
    publish one file per relation; a directory reads them in sorted file-name order. No rows in
    all is an error (an empty file among others is not).
    """
    if path and os.path.isdir(path):
        files = sorted(
            os.path.join(path, n) for n in os.listdir(path) if n.endswith((".jsonl", ".json"))
        )
        rows = [(f, line, row) for f in files for line, row in _file_rows(f)]
        if not rows:
            raise WorldError(f"{what} directory {path!r} holds no jsonl rows")
        return rows
    return [(path, line, row) for line, row in _read_jsonl(path, what)]


def _relation_of_file(path: str) -> str:
    # ParaRel's graphs_json/P17.jsonl holds the patterns of relation P17.
    name = os.path.basename(path)
    for ext in (".jsonl", ".json"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def _template_row(f: str, line: int, row: dict[str, Any]) -> tuple[str, str, bool]:
    """``(relation, template, marked as query)`` of a LAMA or ParaRel template row."""
    if "template" in row:  # LAMA data/relations.jsonl (or this project's fixtures).
        if "relation" not in row:
            raise WorldError(f"{f}:{line}: row has a 'template' but no 'relation'")
        return str(row["relation"]), str(row["template"]), bool(row.get("query", False))
    if "pattern" in row:  # ParaRel: the relation is the file's name unless the row says.
        rel = row.get("relation", row.get("predicate_id")) or _relation_of_file(f)
        return str(rel), str(row["pattern"]), bool(row.get("query", False))
    raise WorldError(
        f"{f}:{line}: row lacks 'template' (LAMA: with 'relation') or 'pattern' (ParaRel, "
        "relation from the file name)"
    )


def _normalize_template(t: str) -> str:
    # LAMA writes "[Y]." and "[Y] ."; one spelling keeps corpus and query forms consistent.
    t = " ".join(t.split())
    return re.sub(r"\s*([.?!])$", r" \1", t)


def load_lama_world(facts_path: str, templates_path: str, cfg: Any) -> World:
    """Builds a world from LAMA / ParaRel files, with the synthetic world's corpus recipe.

    Each path is a jsonl file or a directory of them (read in sorted file-name order), as the
    datasets publish them.
    ``facts_path``: LAMA T-REx rows ``{"sub_label", "obj_label", "predicate_id", ...}``
    (``data/TREx/P19.jsonl``). Relations are functional: a repeated (subject, predicate) keeps
    its first object. Every predicate needs templates (the error lists those without).
    ``templates_path``: ``[X]``/``[Y]`` templates, several per relation, as LAMA rows
    ``{"relation", "template"}`` (``data/relations.jsonl``) or ParaRel rows ``{"pattern", ...}``
    whose relation is the file's name (``data/pattern_data/graphs_json/P19.jsonl``) unless the
    row has ``relation``. A relation's query templates are, by the first rule that applies:
    the rows at the indices ``cfg.lama_query_patterns`` (0-based positions among the relation's
    template rows, in file order); the rows marked ``"query": true``; its first template with
    ``[X]`` before ``[Y]`` and ``[Y]`` at the end. The other templates are its corpus forms
    (times ``cfg.n_prefixes`` prefixes; repeats dropped).
    ``cfg``'s frequency, anchor, document and query fields apply; its sizes
    (``n_subjects``, ``n_relations``, ``n_objects_per_type``) are taken from the files instead.
    """
    _check_common(cfg)
    picks = tuple(int(i) for i in (cfg.get("lama_query_patterns", ()) or ()))
    if any(i < 0 for i in picks) or len(set(picks)) != len(picks):
        raise WorldError(
            f"world.lama_query_patterns must be distinct pattern indices >= 0, got {picks}"
        )
    by_rel: dict[str, list[tuple[str, bool]]] = {}
    for f, line, row in _read_jsonl_files(templates_path, "LAMA templates"):
        rel, template, query = _template_row(f, line, row)
        t = _normalize_template(template)
        if t.count("[X]") != 1 or t.count("[Y]") != 1:
            raise WorldError(f"{f}:{line}: template {t!r} needs one [X] and one [Y]")
        by_rel.setdefault(rel, []).append((t, query))

    triples: dict[tuple[str, str], str] = {}
    untemplated: dict[str, str] = {}  # predicate -> first file:line stating it
    for f, line, row in _read_jsonl_files(facts_path, "LAMA facts"):
        try:
            s, r, o = str(row["sub_label"]), str(row["predicate_id"]), str(row["obj_label"])
        except KeyError as e:
            raise WorldError(f"{f}:{line}: row lacks field {e.args[0]!r}") from None
        if not (s.strip() and o.strip()):
            raise WorldError(f"{f}:{line}: empty sub_label or obj_label")
        if r not in by_rel:
            untemplated.setdefault(r, f"{f}:{line}")
            continue
        triples.setdefault((s, r), o)
    if untemplated:
        first = next(iter(untemplated.items()))
        raise WorldError(
            f"{first[1]}: predicate {first[0]!r} has no template in {templates_path}; add "
            f"templates or remove its facts (predicates without templates: "
            f"{', '.join(sorted(untemplated))})"
        )
    if not triples:
        raise WorldError(f"{facts_path} holds no facts (empty world)")

    relations = []
    for name in sorted({r for _, r in triples}):
        rows = by_rel[name]
        if picks:
            if max(picks) >= len(rows):
                raise WorldError(
                    f"world.lama_query_patterns = {picks}: relation {name!r} has only "
                    f"{len(rows)} template rows in {templates_path}"
                )
            marked = list(dict.fromkeys(rows[i][0] for i in picks))
        else:
            marked = [t for t, q in rows if q]
        if not marked:
            marked = [t for t, _ in rows if _is_query_template(t)][:1]
        bad = [t for t in marked if not _is_query_template(t)]
        if not marked or bad:
            raise WorldError(
                f"relation {name!r} needs a query template with [X] before [Y] and [Y] at the end "
                f"(got {bad or 'none'}); add or mark one in {templates_path}, or choose others "
                "with world.lama_query_patterns"
            )
        corpus = list(dict.fromkeys(t for t, _ in rows if t not in marked))
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
