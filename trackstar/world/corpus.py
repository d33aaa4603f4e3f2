"""The corpus recipe shared by synthetic and LAMA worlds: facts -> documents, candidates, queries.

``_build_world`` takes relations, subjects, objects and fact triples and draws fact frequencies,
anchors, the training documents, the closed candidate set (fact sentences, distractors, optional
rare-token fillers) and the stratified task / held-out queries. Every stage draws from its own
``numpy.random.Generator`` stream (``_rng(seed, stage)``), so changing one stage's draws never
shifts another's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from trackstar.world.checks import (
    _check_query_capacity,
    _n_anchors,
    _n_rare_token_candidates,
    _plain_config,
)
from trackstar.world.records import (
    RARE_TOKEN_KIND,
    Candidate,
    Document,
    Fact,
    Query,
    Relation,
    World,
    WorldError,
)
from trackstar.world.templates import (
    _DISTRACTOR_TEMPLATES,
    _FILLERS,
    _PREFIXES,
    _template_words,
    fill,
    query_prompt,
    query_sentence,
)

_RARE_WORDS_PER_CANDIDATE = (1, 3)  # (min, max) made-up words in one rare-token candidate.

_ONSETS = ("b d f g h k l m n p r s t v z br dr gr kr pl st tr sk").split()
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o")
_CODAS = ("", "", "", "n", "r", "l", "s", "m")


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
