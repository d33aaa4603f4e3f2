"""E8: the linear datamodeling score (LDS, TRAK's counterfactual metric) of every method.

The unit of the subsets is the **training document** (``world.documents``): training packs
documents into windows (``data.TrainStream``), so a document is what can be left out. Subset k
(``experiment.lds_subsets`` of them) holds ``round(lds_fraction * D)`` of the D documents,
drawn without replacement from the stream ``[lds_seed, k]``. One model is retrained per subset
with the run's own config and seed (same init, optimizer, schedule and ``train.steps``; only
the stream's documents differ), and each task query's target log-probability
``log p(target | prompt)`` (``model.target_logprob``) is measured on it.

A method's score of a document is the sum of its scores of the document's passages on the
``corpus`` candidate pool (``stages.corpus_passages``, E2's open set: a document longer than
``model.max_len`` is several passages). The method's prediction for subset k is the sum of its
document scores over the subset; the LDS of a query is the Spearman correlation over the K
subsets between prediction and measured log-probability, and the table reports its mean over
the queries (a query whose predictions or log-probabilities are all equal has none and is left
out; ``n`` counts the rest) with the standard error of that mean.

Methods: bm25 (dense BM25 of prompt + target against the passages), random (seeded uniform
passage scores) and every preset of ``score.PRESETS`` at run time, each scored densely (all
queries x all passages: the streaming scorer with ``top_k`` = every passage, so each preset's
own transforms apply). A ``ground_truth`` row scores a document by how many of its sentences
state the query's fact: what a perfect fact tracer would say.

Caches: each subset model is an Orbax run in ``<run_dir>/lds/subset<k>-<key>/checkpoints``
(key: model and train sections, seed and the subset stream's fingerprint, so a changed
config or subset trains anew and a killed retrain resumes), its log-probabilities and each
method's dense scores are ``stages.cached_array`` entries; a rerun retrains nothing.
Outputs: ``results.json``, ``table.md``, ``lds.png`` and ``lds_arrays.npz`` (subset masks,
log-probabilities, document scores and per-query correlations: everything the LDS is
computed from).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from trackstar import checkpoint, data, families, report, score, stages, tokenizer
from trackstar import model as model_lib
from trackstar import train as train_lib
from trackstar.baselines import bm25_scores, query_text
from trackstar.experiments.evaluation import methods_from, paired_rows
from trackstar.experiments.harness import (
    BASELINES,
    GROUND_TRUTH,
    ExperimentError,
    ensure_stores,
    experiment_section,
    write_results,
)
from trackstar.files import atomic_write
from trackstar.runlog import log_metrics

POOL = "corpus"  # The passages whose scores are summed into document scores.
ARRAYS_FILE = "lds_arrays.npz"
# Paired per-query LDS differences (a − b) that isolate one ingredient each.
PAIRED = (
    ("exp_opt_norm_rtrain", "exp_opt_norm", "R_train"),
    ("trackstar", "exp_opt_norm", "mixed R"),
    ("trackstar", "exp_opt_norm_rtrain", "mixing R_eval into R_train"),
    ("exp_opt_norm", "grad_cosine", "the V correction"),
    ("exp_opt", "grad_dot", "the V correction, no unit norm"),
    ("step_influence", "exp_opt", "one preconditioner factor instead of two"),
    ("trackstar", "bm25", "TrackStar against BM25"),
)


# ----- subsets and the LDS --------------------------------------------------------------------


def subset_masks(n_docs: int, n_subsets: int, fraction: float, seed: int) -> np.ndarray:
    """``masks_KxD`` bool: subset k holds ``round(fraction * n_docs)`` documents (at least 1),
    drawn without replacement from the stream ``[seed, k]``, so subset k does not depend on K."""
    if not 0.0 < fraction < 1.0:
        raise ExperimentError(f"experiment.lds_fraction = {fraction}; it must be in (0, 1)")
    size = max(1, int(round(fraction * n_docs)))
    masks = np.zeros((n_subsets, n_docs), dtype=bool)
    for k in range(n_subsets):
        masks[k, np.random.default_rng([seed, k]).choice(n_docs, size=size, replace=False)] = True
    return masks


def average_ranks(x_N: np.ndarray) -> np.ndarray:
    """Ranks 0..N-1 of ``x_N``, tied values sharing their mean rank (Spearman's convention)."""
    x_N = np.asarray(x_N, np.float64)
    ranks = np.empty(len(x_N), np.float64)
    ranks[np.argsort(x_N, kind="stable")] = np.arange(len(x_N))
    _, inverse, counts = np.unique(x_N, return_inverse=True, return_counts=True)
    return (np.bincount(inverse, weights=ranks) / counts)[inverse]


def spearman(a_N: np.ndarray, b_N: np.ndarray) -> float:
    """Spearman's rank correlation of two samples; NaN when either one is constant."""
    ra, rb = average_ranks(a_N), average_ranks(b_N)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(np.sqrt(np.sum(ra * ra) * np.sum(rb * rb)))
    return float(np.sum(ra * rb) / denom) if denom > 0 else float("nan")


def lds_per_query(
    doc_scores_QxD: np.ndarray, masks_KxD: np.ndarray, logprobs_QxK: np.ndarray
) -> np.ndarray:
    """Per query, Spearman over the K subsets of (summed document scores, log-probability)."""
    predicted_QxK = np.asarray(doc_scores_QxD, np.float64) @ masks_KxD.T.astype(np.float64)
    return np.array(
        [spearman(p, y) for p, y in zip(predicted_QxK, logprobs_QxK, strict=True)], np.float64
    )


def summarize(rho_Q: np.ndarray) -> dict:
    """``{"lds", "lds_se", "n_queries"}`` over the queries with a correlation."""
    ok = rho_Q[np.isfinite(rho_Q)]
    n = len(ok)
    return {
        "lds": float(ok.mean()) if n else float("nan"),
        "lds_se": float(ok.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan"),
        "n_queries": n,
    }


# ----- retrained subset models ----------------------------------------------------------------


class SubsetTrainer:
    """Retrains the run's model on document subsets: one model/optimizer (so one compiled
    step) for every subset, the run's init seed, each subset its own checkpoint directory."""

    def __init__(self, cfg: ml_collections.ConfigDict, trained: stages.Trained):
        self.cfg = cfg
        self.world = trained.world
        self.doc_tokens = data.corpus_token_lists(trained.tok, trained.world)
        self.apply_fn, self.init_params = families.make_model(
            cfg.model, tokenizer.vocab_size(trained.tok), cfg.seed
        )
        self.optimizer = train_lib.make_optimizer(cfg.train)
        queries = stages.query_examples(cfg, trained.tok, trained.world.task_queries)
        self.query_tokens, self.query_weights = queries.tokens_NxT, queries.weights_NxT

    def stream(self, mask_D: np.ndarray) -> data.TrainStream:
        """The training stream of the subset's documents (same shapes and seed as the run)."""
        docs = [self.doc_tokens[i] for i in np.flatnonzero(mask_D)]
        tr = self.cfg.train
        return data.TrainStream(docs, tr.seq_len, tr.batch_size, self.cfg.seed)

    def run_dir(self, k: int, mask_D: np.ndarray) -> str:
        """``<run_dir>/lds/subset<k>-<key>``: keyed by everything that decides the model."""
        key = stages.config_key(
            stages.config_section(self.cfg, "model"),
            train_lib.train_config_fingerprint(self.cfg.train),
            int(self.cfg.seed),
            self.stream(mask_D).fingerprint,
        )
        return stages.path(self.cfg, "lds", f"subset{k:03d}-{key}")

    def params(self, k: int, mask_D: np.ndarray, progress: bool = False):
        """The subset model's final params: trained (or resumed) to ``train.steps``."""
        ckpt_dir = os.path.join(self.run_dir(k, mask_D), "checkpoints")
        latest = checkpoint.latest_step(ckpt_dir)
        if latest is None or latest < int(self.cfg.train.steps):
            stages.CACHE_MISSES["lds_train"] += 1
        stream = self.stream(mask_D)
        t0 = time.perf_counter()
        params, _, history = train_lib.train_loop(
            self.apply_fn,
            self.init_params,
            self.optimizer,
            stream.batch,
            self.cfg.train,
            ckpt_dir,
            progress=progress,
            meta={"data_fingerprint": stream.fingerprint, "lds_subset": k},
        )
        if history:
            log_metrics(
                self.cfg.run_dir,
                "lds_train",
                subset=k,
                seconds=time.perf_counter() - t0,
                loss=history[-1]["loss"],
            )
        return params

    def logprobs(self, k: int, mask_D: np.ndarray, progress: bool = False) -> np.ndarray:
        """``logprob_Q``: each task query's target log-probability under subset k's model."""
        key = stages.config_key(
            os.path.basename(self.run_dir(k, mask_D)),
            self.query_tokens.tobytes().hex(),
            self.query_weights.tobytes().hex(),
        )

        def make() -> np.ndarray:
            params = self.params(k, mask_D, progress)
            return np.asarray(
                model_lib.target_logprob(
                    self.apply_fn, params, self.query_tokens, self.query_weights
                ),
                np.float64,
            )

        return stages.cached_array(self.cfg, "lds_logprob", f"subset{k:03d}", key, make)


# ----- dense document scores ------------------------------------------------------------------


def passage_doc_index(passages: Sequence[stages.Passage], world) -> np.ndarray:
    """``doc_N``: the position in ``world.documents`` of each passage's document."""
    position = {d.doc_id: i for i, d in enumerate(world.documents)}
    return np.array([position[p.doc_id] for p in passages], np.int64)


def to_documents(scores_QxN: np.ndarray, doc_N: np.ndarray, n_docs: int) -> np.ndarray:
    """Passage scores summed per document: ``scores_QxD``."""
    out = np.zeros((scores_QxN.shape[0], n_docs), np.float64)
    np.add.at(out.T, doc_N, np.asarray(scores_QxN, np.float64).T)
    return out


def dense_preset_scores(cfg, trained: stages.Trained, method: str, tag: str) -> np.ndarray:
    """``scores_QxN`` of a preset: every task query against every corpus passage.

    The streaming scorer with ``top_k`` = all rows (so the preset's own transforms and checks
    apply, ``score.score_preset``), scattered back to passage order.
    """
    spec = score.get_preset(method)
    ensure_stores(cfg, trained, POOL, spec.corrected, tag, tag)
    # A preset whose query side differs in correction (step_influence) needs that task store.
    query_corrected = getattr(spec, "query_side_corrected", spec.corrected)
    stages.stage_featurize(cfg, "task", query_corrected, trained, tag=tag)
    if spec.hessian != "none":
        stages.stage_hessian(cfg, POOL, spec.corrected, tag, tag)
    inputs = stages.score_inputs(cfg, method, POOL, tag, tag)
    n = inputs.train_store.num_rows
    ids_QxN, s_QxN = score.score_preset(
        inputs.train_store,
        inputs.query_store,
        method,
        inputs.fit,
        n,
        rows_per_step=int(cfg.score.chunk_rows),
    )
    dense = np.zeros(ids_QxN.shape, np.float64)
    np.put_along_axis(dense, ids_QxN, s_QxN.astype(np.float64), axis=1)
    return dense


def passage_scores(
    cfg, trained: stages.Trained, method: str, texts: Sequence[str], tag: str
) -> np.ndarray:
    """``scores_QxN`` of one method over the corpus passages (cached per config)."""
    key = stages.config_key(
        method,
        POOL,
        tag,
        os.path.abspath(cfg.run_dir),
        trained.step,
        [
            stages.config_section(cfg, s)
            for s in ("world", "model", "featurize", "hessian", "score", "eval")
        ],
    )
    queries = trained.world.task_queries

    def make() -> np.ndarray:
        if method == "bm25":
            q_texts = [query_text(q.prompt, q.target) for q in queries]
            return bm25_scores(q_texts, texts, stopwords=cfg.eval.bm25_stopwords)
        if method == "random":
            rng = np.random.default_rng(int(cfg.eval.random_seed))
            return rng.random((len(queries), len(texts)))
        return dense_preset_scores(cfg, trained, method, tag)

    return stages.cached_array(cfg, "lds_scores", method, key, make)


def fact_statements(trained: stages.Trained) -> np.ndarray:
    """``counts_QxD``: sentences of each document that state each task query's fact."""
    docs = trained.world.documents
    out = np.zeros((len(trained.world.task_queries), len(docs)), np.float64)
    for q, query in enumerate(trained.world.task_queries):
        for d, doc in enumerate(docs):
            out[q, d] = sum(f == query.fact_id for f in doc.sentence_fact_ids)
    return out


# ----- the experiment -------------------------------------------------------------------------


def sizes(cfg, n_docs: int, n_passages: int, n_queries: int) -> dict:
    """The sizes the header and results.json report."""
    m, tr = cfg.model, cfg.train
    return {
        "documents": n_docs,
        "passages": n_passages,
        "queries": n_queries,
        "world_subjects": int(cfg.world.n_subjects),
        "world_relations": int(cfg.world.n_relations),
        "model": f"{m.family} d_model={m.d_model} layers={m.n_layers} heads={m.n_heads} "
        f"d_ff={m.d_ff}",
        "train_steps": int(tr.steps),
        "batch": f"{tr.batch_size} x {tr.seq_len}",
        "projection_dim": int(cfg.featurize.k_in) * int(cfg.featurize.k_out),
    }


def header(results: dict) -> str:
    s, e = results["sizes"], results
    return (
        f"## E8: linear datamodeling score (LDS)\n\n"
        f"{e['subsets']} subsets of {e['subset_size']} / {s['documents']} training documents "
        f"(fraction {e['fraction']}, seed {e['seed']}), one retrained model each; Spearman over "
        f"the subsets per query, mean ± se over {s['queries']} task queries. Document score = "
        f"sum of its passages' scores ({s['passages']} passages). World: {s['world_subjects']} "
        f"subjects x {s['world_relations']} relations; model: {s['model']}; {s['train_steps']} "
        f"steps of {s['batch']}; d = {s['projection_dim']}. Base model greedy accuracy "
        f"{e['accuracy']:.3f}; mean target log-prob {e['logprob_full']:.2f} (full data), "
        f"{e['logprob_subsets']:.2f} (subsets). Wall {e['wall_s']:.0f} s "
        f"({e['retrain_s']:.0f} s retraining).\n"
    )


def table(rows: dict) -> str:
    return report.markdown_table(
        ["method", "LDS", "n queries"],
        [[name, report.pm(r["lds"], r["lds_se"], 3), r["n_queries"]] for name, r in rows.items()],
    )


def paired(rho: dict[str, np.ndarray]) -> dict[str, dict]:
    """``PAIRED`` comparisons whose methods both ran (``evaluation.paired_rows`` over the
    queries both have a correlation for), keyed ``"a − b"``."""
    per_query = {m: {"lds": r} for m, r in rho.items()}
    what = {(a, b): w for a, b, w in PAIRED}
    rows = paired_rows(per_query, list(what), ("lds",))
    keep = ("mean", "se", "n")
    return {
        report.comparison(r): {"what": what[(r["a"], r["b"])], **{k: r[k] for k in keep}}
        for r in rows
    }


def paired_table(diffs: dict[str, dict]) -> str:
    return report.paired_table(
        [dict(d, comparison=k) for k, d in diffs.items()],
        [("comparison", lambda d: d["comparison"]), ("what it isolates", lambda d: d["what"])],
        diff_header="ΔLDS",
    )


def run(cfg: ml_collections.ConfigDict, progress: bool = True) -> dict:
    """E8: LDS of ``experiment.methods`` (default: bm25, random, every preset) + ground truth."""
    t0 = time.perf_counter()
    ex = experiment_section(cfg)
    methods = methods_from(cfg, (*BASELINES, *score.PRESETS))
    tag = str(ex.get("store_tag", "") or "")
    trained = stages.load_trained(cfg)
    w = trained.world
    passages = stages.corpus_passages(w, trained.tok, cfg.model.max_len)
    doc_N = passage_doc_index(passages, w)
    n_docs = len(w.documents)
    masks_KxD = subset_masks(n_docs, int(ex.lds_subsets), float(ex.lds_fraction), int(ex.lds_seed))

    trainer = SubsetTrainer(cfg, trained)
    t_train = time.perf_counter()
    bar = tqdm(range(len(masks_KxD)), disable=not progress, desc="lds subsets", unit="model")
    logprobs_QxK = np.stack([trainer.logprobs(k, masks_KxD[k]) for k in bar], axis=1)
    retrain_s = time.perf_counter() - t_train
    full_logprob_Q = np.asarray(
        model_lib.target_logprob(
            trained.apply_fn, trained.params, trainer.query_tokens, trainer.query_weights
        )
    )

    texts = [p.text for p in passages]
    doc_scores = {
        m: to_documents(passage_scores(cfg, trained, m, texts, tag), doc_N, n_docs) for m in methods
    }
    doc_scores[GROUND_TRUTH] = fact_statements(trained)
    rho = {m: lds_per_query(s, masks_KxD, logprobs_QxK) for m, s in doc_scores.items()}
    rows = {m: summarize(r) for m, r in rho.items()}

    correct = model_lib.greedy_correct(
        trained.apply_fn, trained.params, trainer.query_tokens, trainer.query_weights
    )
    results = {
        "experiment": ex.name,
        "methods": {m: rows[m] for m in methods},
        "ground_truth": rows[GROUND_TRUTH],
        "subsets": int(masks_KxD.shape[0]),
        "subset_size": int(masks_KxD[0].sum()),
        "fraction": float(ex.lds_fraction),
        "seed": int(ex.lds_seed),
        "unit": "training documents (score = sum over the document's corpus passages)",
        "sizes": sizes(cfg, n_docs, len(passages), len(w.task_queries)),
        "accuracy": float(np.mean(np.asarray(jax.device_get(correct)))),
        "logprob_full": float(np.mean(full_logprob_Q)),
        "logprob_subsets": float(np.mean(logprobs_QxK)),
        "store_tag": tag,
        "retrain_s": retrain_s,
        "paired": paired(rho),
    }
    results["wall_s"] = time.perf_counter() - t0
    md = "\n".join([header(results), table({**rows})])
    if results["paired"]:
        md += "\n\nPaired over queries:\n\n" + paired_table(results["paired"])
    out = write_results(cfg, results, md)
    arrays = {
        "masks_KxD": masks_KxD,
        "logprobs_QxK": logprobs_QxK,
        "full_logprob_Q": full_logprob_Q,
        "doc_N": doc_N,
        **{f"doc_scores_{m}": s for m, s in doc_scores.items()},
        **{f"rho_{m}": r for m, r in rho.items()},
    }
    atomic_write(os.path.join(out, ARRAYS_FILE), lambda f: np.savez(f, **arrays), binary=True)
    names = [*methods, GROUND_TRUTH]
    report.bar_panels(
        names,
        [("LDS (Spearman)", [rows[n]["lds"] for n in names], [rows[n]["lds_se"] for n in names])],
        f"E8: LDS over {results['subsets']} subsets",
        os.path.join(out, "lds.png"),
    )
    results["markdown"] = md
    return results
