"""A world on disk: one jsonl file per record kind plus ``manifest.json`` with a content hash."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

from trackstar.files import write_bytes
from trackstar.world.records import Candidate, Document, Fact, Query, Relation, World, WorldError

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
