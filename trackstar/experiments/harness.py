"""The experiment harness: config checks, the shared setup, caches and rankings.

Work is shared between experiments through the caches of ``trackstar.stages``
(``stages.cached_array`` in ``<run_dir>/results/cache``): rankings per method, candidate pool
and store variant, and tail-patch deltas per proponent list, each keyed by a hash of everything
that decides its content (config sections, proponent ids, checkpoint step), so a changed
config never reads a stale value. Stores, Hessian fits and checkpoints are the stages' own.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from trackstar import model as model_lib
from trackstar import report, score, stages
from trackstar.baselines import bm25_rank, query_text, random_rank

PRESET_METHODS = tuple(score.PRESETS)
BASELINES = ("bm25", "random")
# Table order: the baselines, then the preset ladder (docs/method.md, Scoring).
ALL_METHODS = (*BASELINES, *PRESET_METHODS)
GROUND_TRUTH = "ground_truth"


class ExperimentError(ValueError):
    """An experiment config that cannot run; the message says which field to change."""


# ----- small helpers --------------------------------------------------------------------------


def jsonable(obj: Any) -> Any:
    """NaN/inf become null and numpy scalars plain numbers, so results.json is strict JSON."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        f = float(obj)
        return f if math.isfinite(f) else None
    return obj


def experiment_section(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``cfg.experiment``, or an error saying which config to use."""
    if "experiment" not in cfg:
        raise ExperimentError(
            "the config has no `experiment` section; use one of configs/e1.py ... configs/e7.py"
        )
    return cfg.experiment


def cutoffs(cfg: ml_collections.ConfigDict) -> tuple[int, int]:
    """``(eval.at_k, max(tailpatch.ks))``: the Recall@k and tail-patch@k that tables show."""
    return int(cfg.eval.at_k), max(int(k) for k in cfg.tailpatch.ks)


def output_dir(cfg: ml_collections.ConfigDict) -> str:
    """``<run_dir>/experiments/<experiment.output_name or experiment.name>``."""
    ex = experiment_section(cfg)
    return stages.path(cfg, "experiments", ex.get("output_name", "") or ex.name)


def with_overrides(cfg: ml_collections.ConfigDict, overrides: Mapping) -> ml_collections.ConfigDict:
    """A copy of ``cfg`` with nested ``overrides`` applied; unknown fields are an error."""
    out = copy.deepcopy(cfg)

    def apply(node: ml_collections.ConfigDict, upd: Mapping, where: str) -> None:
        for key, value in upd.items():
            if key not in node:
                raise ExperimentError(f"override {where}{key} names no config field")
            if isinstance(value, Mapping):
                apply(node[key], value, f"{where}{key}.")
            else:
                with node.unlocked():
                    node[key] = value

    apply(out, overrides.to_dict() if hasattr(overrides, "to_dict") else overrides, "")
    return out


def write_results(cfg, results: dict, markdown: str, name: str | None = None) -> str:
    out = output_dir(cfg) if name is None else stages.path(cfg, "experiments", name)
    os.makedirs(out, exist_ok=True)
    tmp = os.path.join(out, "results.json.tmp")
    with open(tmp, "w") as f:
        json.dump(jsonable(results), f, indent=2)
    os.replace(tmp, os.path.join(out, "results.json"))
    report.save_text(markdown, os.path.join(out, "table.md"))
    return out


# ----- shared setup ---------------------------------------------------------------------------


@dataclasses.dataclass
class Setup:
    """Everything ranking and tail-patch need for one run dir and one candidate pool."""

    cfg: ml_collections.ConfigDict
    trained: stages.Trained
    candidates: str
    texts: list[str]
    ground_truth: list[set]
    cand_tokens_NxS: np.ndarray
    cand_weights_NxS: np.ndarray
    query_tokens_QxT: np.ndarray
    query_weights_QxT: np.ndarray
    correct_Q: np.ndarray
    buckets_Q: np.ndarray
    precond: Any
    lr: float
    counted_tokens_per_batch: float

    @property
    def n_queries(self) -> int:
        return len(self.ground_truth)

    @property
    def n_tailpatch(self) -> int:
        n = int(self.cfg.tailpatch.n_queries)
        return self.n_queries if n <= 0 else min(n, self.n_queries)

    @property
    def tailpatch_index(self) -> np.ndarray:
        """The tail-patched queries: ``n_tailpatch`` spread evenly over the task queries.

        The world lists task queries bucket by bucket, so the first n would patch only the
        rare facts; an even stride keeps every frequency bucket in the sample.
        """
        n = self.n_tailpatch
        return np.unique(np.round(np.linspace(0, self.n_queries - 1, n)).astype(np.int64))


def make_setup(
    cfg: ml_collections.ConfigDict,
    candidates: str = "candidates",
    trained: stages.Trained | None = None,
) -> Setup:
    """Loads the final checkpoint and encodes the candidate pool and the task queries."""
    trained = trained or stages.load_trained(cfg)
    texts, gt = stages.candidate_pool(cfg, trained.world, trained.tok, candidates)
    cand, _, _ = stages.examples_for(cfg, trained, candidates)
    queries = stages.query_examples(cfg, trained.tok, trained.world.task_queries)
    correct = np.asarray(
        model_lib.greedy_correct(
            trained.apply_fn, trained.params, queries.tokens_NxT, queries.weights_NxT
        )
    )
    tp = cfg.tailpatch
    lr = float(tp.lr) if tp.lr >= 0 else float(cfg.train.final_lr)
    # The training loss is a mean over counted tokens (every position after the first of each
    # window), so one example's share of a batch gradient is g_m / that count.
    counted_tokens_per_batch = float(cfg.train.batch_size * (cfg.train.seq_len - 1))
    return Setup(
        cfg=cfg,
        trained=trained,
        candidates=candidates,
        texts=texts,
        ground_truth=gt,
        cand_tokens_NxS=np.asarray(cand.tokens_NxT),
        cand_weights_NxS=np.asarray(cand.weights_NxT),
        query_tokens_QxT=np.asarray(queries.tokens_NxT),
        query_weights_QxT=np.asarray(queries.weights_NxT),
        correct_Q=correct.astype(bool),
        buckets_Q=np.array([q.bucket for q in trained.world.task_queries]),
        # The checkpoint's correction settings (stages.correction_settings), as in featurize.
        precond=stages.make_preconditioner(cfg, trained),
        lr=lr,
        counted_tokens_per_batch=counted_tokens_per_batch,
    )


# ----- rankings -------------------------------------------------------------------------------


def ensure_stores(
    cfg,
    trained,
    candidates: str,
    corrected: bool,
    train_tag: str = "",
    query_tag: str = "",
    query_corrected: bool | None = None,
) -> None:
    """Featurizes (or finds complete) the candidate, task and R_eval stores of one variant.

    ``query_corrected``: the task store's correction when it differs from the candidates'
    (``PresetSpec.query_side_corrected``; None: ``corrected``). The R_eval store keeps the
    candidates' correction: R is fitted from vectors like the train side's.
    """
    task_corrected = corrected if query_corrected is None else query_corrected
    stages.stage_featurize(cfg, candidates, corrected, trained, tag=train_tag)
    stages.stage_featurize(cfg, "task", task_corrected, trained, tag=query_tag)
    stages.stage_featurize(cfg, cfg.hessian.eval_source, corrected, trained, tag=query_tag)


def rank(
    setup: Setup,
    method: str,
    train_tag: str = "",
    query_tag: str = "",
    cfg: ml_collections.ConfigDict | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Top ``score.top_k`` candidate ids per task query (``ids_QxK``) for one method.

    Presets go through the stages (featurize -> R -> streaming score); ``bm25`` ranks by
    prompt + target text; ``random`` by a seeded permutation. ``cfg`` overrides the setup's
    config for store variants (e.g. another query output function).
    """
    cfg = cfg or setup.cfg
    k = int(cfg.score.top_k)
    key = stages.config_key(
        method,
        setup.candidates,
        train_tag,
        query_tag,
        os.path.abspath(cfg.run_dir),
        setup.trained.step,
        [
            stages.config_section(cfg, s)
            for s in ("world", "model", "featurize", "hessian", "score", "eval")
        ],
    )
    tags = "".join(f"-{t}" for t in (train_tag, query_tag) if t)

    def make() -> np.ndarray:
        queries = setup.trained.world.task_queries
        if method == "bm25":
            texts = [query_text(q.prompt, q.target) for q in queries]
            return bm25_rank(texts, setup.texts, k, stopwords=cfg.eval.bm25_stopwords)
        if method == "random":
            return random_rank(len(queries), len(setup.texts), k, int(cfg.eval.random_seed))
        if method not in score.PRESETS:
            raise ExperimentError(
                f"unknown method {method!r}; choose from {', '.join(ALL_METHODS)}"
            )
        spec = score.get_preset(method)
        ensure_stores(
            cfg,
            setup.trained,
            setup.candidates,
            spec.corrected,
            train_tag,
            query_tag,
            query_corrected=spec.query_side_corrected,
        )
        if spec.hessian != "none":
            stages.stage_hessian(cfg, setup.candidates, spec.corrected, train_tag, query_tag)
        res = stages.stage_score(
            cfg, method, setup.candidates, progress, train_tag=train_tag, query_tag=query_tag
        )
        return res["ids"]

    ids = stages.cached_array(cfg, "rank", f"{setup.candidates}_{method}{tags}", key, make)
    if ids.shape[1] < k:  # fewer candidates than k: pad so every method has K columns
        ids = np.concatenate([ids, np.full((ids.shape[0], k - ids.shape[1]), -1)], axis=1)
    return ids.astype(np.int64)


def ground_truth_ids(ground_truth: Sequence[set], k: int) -> np.ndarray:
    """The ground-truth candidates of each query as a ranking (by id), padded with -1."""
    out = np.full((len(ground_truth), k), -1, dtype=np.int64)
    for q, gt in enumerate(ground_truth):
        ids = sorted(gt)[:k]
        out[q, : len(ids)] = ids
    return out
