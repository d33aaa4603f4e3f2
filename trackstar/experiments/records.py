"""Per-method proponents of a retrieval experiment in the release's results schema.

E1 and E2 write ``<experiment dir>/proponents/<method>.jsonl.gz`` (``trackstar.release``'s
``ResultRecord`` per task query): the method's top ``score.top_k`` proponents with their
scores and ground-truth marks, its opponents where the method has signed scores (the scoring
presets), the fact, its bucket and the model's own answer. Three fields are this project's
own, kept in each record's ``extra`` so other tools read the file as plain release records:

- ``entity0`` / ``entity1``: the fact's subject and object (the viewer highlights them);
- ``metrics``: the query's own values of the experiment's metrics (``mrr``, ``recall@k``,
  ``precision@k``, ``tailpatch@k``; ``null`` where the query was not tail-patched), the very
  values whose means ``results.json`` reports;
- ``breakdown`` (some queries of ``viewer.breakdown_preset``): the score of the top proponent
  split by parameter tensor and by proponent token (``trackstar.breakdown``).

``random`` has no scores and is not written; its row stays in ``results.json``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from trackstar import baselines, release, score, stages
from trackstar.experiments.harness import GROUND_TRUTH, Setup, rank
from trackstar.files import write_json

PROPONENTS_DIR = release.PROPONENTS_DIR
# The ground truth's own per-query metrics (tail-patch of the fact's statements), beside.
GROUND_TRUTH_FILE = "ground_truth_metrics.json"


def viewer_settings(cfg) -> dict:
    """The config's ``viewer`` section with defaults (configs older than the section)."""
    defaults = {
        "write": True,
        "top_k": 10,
        "methods": ("trackstar", "bm25", "grad_cosine"),
        "breakdown_preset": "trackstar",
        "breakdown_queries": 12,
    }
    section = cfg.get("viewer")
    return {**defaults, **(section.to_dict() if section is not None else {})}


def method_scores(
    setup: Setup, method: str, ids_QxK: np.ndarray, tag: str = ""
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray] | None] | None:
    """``(scores_QxK, opponents)`` of a ranking, or None for a method without scores.

    A preset's scores and opponents come from the proponents file ``stages.stage_score`` wrote
    for the same ranking; when that file holds another ranking (or no opponents while
    ``score.opponents`` is on) the preset is scored again, so the written scores always belong
    to the ids. BM25's scores are recomputed (cheap); ``random`` has none.
    """
    cfg = setup.cfg
    queries = setup.trained.world.task_queries
    if method == "random":
        return None
    if method == "bm25":
        texts = [baselines.query_text(q.prompt, q.target) for q in queries]
        s_QxN = baselines.bm25_scores(texts, setup.texts, stopwords=cfg.eval.bm25_stopwords)
        safe = np.where(ids_QxK >= 0, ids_QxK, 0)
        scores = np.take_along_axis(np.asarray(s_QxN, np.float64), safe, axis=1)
        return np.where(ids_QxK >= 0, scores, -np.inf), None
    want_opponents = bool(cfg.score.get("opponents", True))
    npz = stages.proponents_path(cfg, setup.candidates, method, tag, tag) + ".npz"
    if os.path.exists(npz):
        with np.load(npz) as z:
            same = z["ids"].shape == ids_QxK.shape and np.array_equal(z["ids"], ids_QxK)
            if same and (not want_opponents or "opponent_ids" in z):
                opp = None
                if "opponent_ids" in z:
                    opp = (z["opponent_ids"], z["opponent_scores"])
                return z["scores"], opp
    res = stages.stage_score(
        cfg, method, setup.candidates, progress=False, train_tag=tag, query_tag=tag
    )
    if not np.array_equal(res["ids"], ids_QxK):
        raise score.ScoreError(
            f"{method}: scoring again gave other proponents than the cached ranking; delete "
            f"{stages.path(cfg, 'results', 'cache')} and rerun the experiment"
        )
    with np.load(npz) as z:
        opp = (z["opponent_ids"], z["opponent_scores"]) if "opponent_ids" in z else None
        return z["scores"], opp


def _plain(values: np.ndarray, row: int) -> float | None:
    v = float(values[row])
    return None if np.isnan(v) else v


def query_metrics(setup: Setup, per_query: Mapping[str, np.ndarray]) -> list[dict]:
    """Per task query, its value of each per-query metric (``tailpatch@k``: null for the
    queries outside ``setup.tailpatch_index``)."""
    n = setup.n_queries
    full: dict[str, np.ndarray] = {}
    for name, values in per_query.items():
        values = np.asarray(values, np.float64)
        if values.shape[0] != n:  # tail-patch: only the patched queries
            spread = np.full(n, np.nan)
            spread[setup.tailpatch_index] = values
            values = spread
        full[name] = values
    return [{name: _plain(v, q) for name, v in full.items()} for q in range(n)]


def breakdown_rows(n_queries: int, buckets: Sequence[int], n: int) -> list[int]:
    """``n`` query rows spread evenly over the task queries (every bucket when n allows)."""
    if n <= 0 or n_queries == 0:
        return []
    n = min(n, n_queries)
    order = np.argsort(np.asarray(buckets), kind="stable")  # rarest first, stable within
    picks = np.unique(np.round(np.linspace(0, n_queries - 1, n)).astype(np.int64))
    return sorted(int(order[i]) for i in picks)


def write_method_records(
    setup: Setup,
    methods: Sequence[str],
    per_query: Mapping[str, Mapping[str, np.ndarray]],
    out_dir: str,
    tag: str = "",
    progress: bool = True,
) -> dict[str, str]:
    """Writes ``out_dir/proponents/<method>.jsonl.gz`` for each method with scores.

    Returns ``{method: path}``. ``per_query[method]``: ``evaluation.evaluate``'s per-query
    arrays of that method. The ground truth's per-query values (``per_query["ground_truth"]``,
    when present) go to ``out_dir/ground_truth_metrics.json`` as ``[{"example_id", <metric>:
    value}]``, so paired comparisons against the fact's own statements need no cache.
    """
    cfg, trained = setup.cfg, setup.trained
    queries = list(trained.world.task_queries)
    facts = {f.fact_id: f for f in trained.world.facts}
    answers = stages.model_answers(cfg, trained, queries)
    settings = viewer_settings(cfg)
    preset = settings["breakdown_preset"]
    picks = breakdown_rows(len(queries), setup.buckets_Q, int(settings["breakdown_queries"]))
    folder = os.path.join(out_dir, PROPONENTS_DIR)
    os.makedirs(folder, exist_ok=True)
    written = {}
    for method in methods:
        ids = rank(setup, method, train_tag=tag, query_tag=tag, progress=progress)
        scored = method_scores(setup, method, ids, tag)
        if scored is None:
            continue
        scores, opp = scored
        records = release.results_from_run(
            queries,
            ids,
            scores,
            setup.texts,
            opp_ids_QxK=None if opp is None else opp[0],
            opp_scores_QxK=None if opp is None else opp[1],
            facts=trained.world.facts,
            ground_truth=setup.ground_truth,
            model_correct=setup.correct_Q,
            model_prediction=[a for a, _ in answers],
            model_confidence=[p for _, p in answers],
        )
        for q, rec, m in zip(
            queries, records, query_metrics(setup, per_query[method]), strict=True
        ):
            fact = facts.get(q.fact_id)
            if fact is not None:
                rec.extra["entity0"], rec.extra["entity1"] = fact.subject, fact.object
            rec.extra["metrics"] = m
        if method == preset and picks:
            _add_breakdowns(setup, method, ids, records, picks)
        path = os.path.join(folder, f"{method}.jsonl.gz")
        release.write_results(path, records)
        written[method] = path
    if GROUND_TRUTH in per_query:
        rows = [
            {"example_id": q.query_id, **m}
            for q, m in zip(queries, query_metrics(setup, per_query[GROUND_TRUTH]), strict=True)
        ]
        write_json(os.path.join(out_dir, GROUND_TRUTH_FILE), rows)
    return written


def _add_breakdowns(
    setup: Setup,
    preset: str,
    ids_QxK: np.ndarray,
    records: list[release.ResultRecord],
    rows: Sequence[int],
) -> None:
    """Adds the top proponent's breakdown to the records of ``rows``."""
    from trackstar import breakdown  # the gradient machinery, loaded only when asked for

    pairs = [(q, int(ids_QxK[q, 0])) for q in rows if ids_QxK[q, 0] >= 0]
    parts = breakdown.run_breakdowns(
        setup.cfg, setup.trained, pairs, preset=preset, candidates=setup.candidates
    )
    for (q, cand), part in zip(pairs, parts, strict=True):
        records[q].extra["breakdown"] = {"proponent_id": cand, **part.to_json()}
