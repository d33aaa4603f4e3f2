"""Attribution of new predictions: the proponents of ``(prompt, target)`` in a training set.

``Attributor`` holds a model, a finished candidate (train) store and its Hessian fit, and makes
the vector of any new query the way the run's query stores were made (same projection, optimizer
correction and output function, on the same feature kernel), then scores it against the store
with a scoring preset (``trackstar.score``)::

    from trackstar import Attributor

    att = Attributor.from_run("runs/demo")                  # preset "trackstar", closed set
    best = att.proponents("The alma mater of Dakram Trumskasor is", "Remnu", k=5)
    for rank, (i, s, text) in enumerate(best.rows(), 1):
        print(rank, i, f"{s:+.3f}", text)

The scores are those of ``stages.stage_score``: a run's task query gives the ids and scores of
its row in ``results/proponents_<candidates>_<preset>.jsonl``.

Other models plug in through the constructor, which takes plain pieces: ``apply_fn`` and
``params`` (``logits_BxTxV = apply_fn(params, tokens_BxT)``), a tokenizer, the finished train
store, the Hessian fit (None for a preset without one) and the query featurize settings
(``QueryFeaturizer``: projector, preconditioner, output function, context length, UNK policy).
``Attributor.from_run`` is one factory (a run directory of ``trackstar.stages``);
``Attributor.from_checkpoint`` the other, for a Hugging Face checkpoint attributed over a
corpus file by ``trackstar.checkpoint_run`` (``trackstar attribute``): the loaded model's apply
function and params, an ``encode_queries`` with the checkpoint's own tokenizer and BOS id, the
run's corpus store, its Hessian fit and a ``QueryFeaturizer`` whose projector and correction
(the estimated V, or none) are the store's. Its proponents carry the passage ids
(``"<doc id>:<k>"``) beside the store rows::

    att = Attributor.from_checkpoint("runs/hf_gpt2")        # the run of trackstar attribute
    best = att.proponents("The capital of France is", "Paris", k=10)
    best.passage_ids, best.scores, best.texts
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
import ml_dtypes
import numpy as np
from jax.sharding import Mesh

from trackstar import breakdown as breakdown_lib
from trackstar import correction, data, score, sharding, stages
from trackstar import index as index_lib
from trackstar import projection as projection_lib
from trackstar.featurize import Examples, compute_vectors, make_mesh_feature_fn
from trackstar.hessian import HessianError, HessianFit
from trackstar.projection import Projector
from trackstar.store import StoreError, StoreMeta, VectorStore
from trackstar.tree import tree_fingerprint

# ``encode_queries(prompts, targets) -> Examples``: queries as [BOS] + prompt + target tokens with
# weight 1 on the target tokens only (docs/design.md, Examples).
EncodeFn = Callable[[Sequence[str], Sequence[str]], Examples]


_ROW_DTYPES = {"bfloat16": ml_dtypes.bfloat16}  # store.DTYPES other than float32


class AttributionError(ValueError):
    """An Attributor cannot be built or asked as given; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class QueryFeaturizer:
    """How query vectors are made; must equal how the train store's query stores were made.

    ``projector`` and ``preconditioner`` (None: no optimizer correction) are those of the train
    store (``projector_from_meta``, ``correction.preconditioner_for`` of the store's
    ``correction_settings``); ``correction``, ``correction_settings`` and
    ``optimizer_fingerprint`` are what the train store records of them, so the Attributor can
    check the pair with ``score.check_query_meta`` before any query is scored. For a preset
    whose query side is uncorrected while its train side is corrected (``step_influence``) they
    are the uncorrected ones (``query_correction``).
    """

    output_fn: str  # Query output function: "loss", "margin" or "logit" (trackstar.losses).
    projector: Projector
    preconditioner: Any  # Correction factor pytree, or None for an uncorrected store.
    max_len: int  # The model's context: [BOS] + prompt + target must fit.
    correction: str = "none"  # The store label of the correction ("adam", ..., "none").
    correction_settings: dict = dataclasses.field(default_factory=dict)
    optimizer_fingerprint: str = ""
    batch_size: int = 8  # Rows per feature-kernel call (padded, so it compiles once).
    dtype: str = "float32"  # Query vectors are rounded to the query stores' row dtype.
    max_unk_frac: float = data.MAX_UNK_FRAC  # Mostly-UNK queries: warning, or error with
    unk_error: bool = False  # unk_error (featurize.max_unk_frac / featurize.unk_error).
    mesh: Mesh | None = None  # Feature-kernel mesh (None: one device).
    shardings: Any = None  # Param shardings on ``mesh`` (None: replicated).

    def meta(self, params: Any) -> StoreMeta:
        """The metadata a query store made with these settings would have (for the checks)."""
        return StoreMeta(
            kind="query",
            dim=self.projector.dim,
            dtype=self.dtype,
            num_examples=0,
            chunk_size=1,
            model_fingerprint=tree_fingerprint(params),
            optimizer_fingerprint=self.optimizer_fingerprint,
            projection=self.projector.config(),
            output_fn=self.output_fn,
            correction=self.correction,
            correction_settings=dict(self.correction_settings),
        )


@dataclasses.dataclass(frozen=True)
class Proponents:
    """The top-k training examples of one query, best first (ties to the lower id)."""

    prompt: str
    target: str
    ids: np.ndarray  # int64 (k,): example ids of the train store (positions in its example set)
    scores: np.ndarray  # float32 (k,)
    texts: list[str] | None  # The examples' texts, when the Attributor has them.
    passage_ids: list[str] | None = None  # The examples' names (corpus passages: "<doc>:<k>").

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self) -> list[tuple[int, float, str | None]]:
        """``[(id, score, text or None), ...]`` best first."""
        texts = self.texts or [None] * len(self.ids)
        return [(int(i), float(s), t) for i, s, t in zip(self.ids, self.scores, texts, strict=True)]

    def to_dict(self) -> dict:
        """A JSON-ready dict with the fields of a proponents file row (with ``passage_ids``
        when the Attributor names its examples)."""
        out = {
            "prompt": self.prompt,
            "target": self.target,
            "proponent_ids": [int(i) for i in self.ids],
            "scores": [float(s) for s in self.scores],
            "texts": self.texts,
        }
        if self.passage_ids is not None:
            out["passage_ids"] = list(self.passage_ids)
        return out

    def table(self, width: int = 100) -> str:
        """A plain-text table: rank, id, score and text (cut to ``width`` characters a line)."""
        names = self.passage_ids or [str(i) for i in self.ids]
        w = max([7, *map(len, names)])
        lines = [
            f"query: {self.prompt} -> {self.target}",
            f"{'rank':>4}  {'id':>{w}}  score    text",
        ]
        for rank, (name, (_, s, text)) in enumerate(zip(names, self.rows(), strict=True), 1):
            line = f"{rank:>4}  {name:>{w}}  {s:+.4f}  {'' if text is None else text}"
            lines.append(line if len(line) <= width else line[: width - 3] + "...")
        return "\n".join(lines)


def projector_from_meta(params: Any, projection: dict) -> Projector:
    """``projection.from_meta``, its error an ``AttributionError``."""
    try:
        return projection_lib.from_meta(params, projection)
    except ValueError as e:
        raise AttributionError(str(e)) from e


class Attributor:
    """Proponents of new queries in one featurized training set, with one scoring preset.

    Args:
      apply_fn: ``logits_BxTxV = apply_fn(params, tokens_BxT)`` (the model the store was
        featurized with).
      params: the model's params pytree (host arrays; placed on ``query.mesh`` here).
      tokenizer: the tokenizer of the model (``trackstar.tokenizer``'s, unless
        ``encode_queries`` is given).
      train_store: the finished candidate store (``VectorStore``) the queries are scored against.
      hessian_fit: the ``HessianFit`` the preset scores with; None for a preset without R.
      query: how query vectors are made (``QueryFeaturizer``); checked against the train store.
      preset: a scoring preset (``trackstar.score.PRESETS``).
      texts: the texts of the store's examples by id (for ``Proponents.texts``), or None; any
        sequence (read by index only, so it may read a file on demand).
      labels: the names of the store's examples by id (``Proponents.passage_ids``), or None.
      encode_queries: ``(prompts, targets) -> Examples``; default: ``data.encode_queries`` with
        ``tokenizer``, ``query.max_len`` and the UNK policy of ``query``.
      mesh: the scoring mesh (train rows sharded over its devices; None: one device).
      rows_per_step: train rows per scoring step (default: the store's chunk size).
      index: a scoring index of ``train_store`` for ``preset`` (``trackstar.index``; a
        ``ScoringIndex`` or its path), or None. With one, queries are scored against the
        index's finished rows (one matmul per step, the same ranking); it is checked against
        the store, the fit and the preset here (``IndexMismatchError`` otherwise).
      train_preconditioner: the train store's correction factors, for ``breakdown`` of a preset
        whose query side is uncorrected (``step_influence``); None: ``query.preconditioner``
        (the same correction on both sides).

    Raises:
      AttributionError / StoreMismatchError / ScoreError: the pieces do not belong together
        (another model, projection, correction or preset), before any query is scored.
    """

    def __init__(
        self,
        apply_fn: Callable,
        params: Any,
        tokenizer: Any,
        train_store: VectorStore,
        hessian_fit: HessianFit | None,
        query: QueryFeaturizer,
        *,
        preset: str = "trackstar",
        texts: Sequence[str] | None = None,
        encode_queries: EncodeFn | None = None,
        mesh: Mesh | None = None,
        rows_per_step: int | None = None,
        labels: Sequence[str] | None = None,
        index: index_lib.ScoringIndex | str | os.PathLike | None = None,
        train_preconditioner: Any = None,
    ):
        spec = score.get_preset(preset)
        meta = train_store.meta
        if (meta.correction != "none") != spec.corrected:
            want = "with" if spec.corrected else "without"
            raise AttributionError(
                f"preset {preset!r} scores vectors {want} the optimizer correction, but the "
                f"store at {train_store.path} has correction = {meta.correction!r}; use a store "
                f"featurized {want} it"
            )
        # The queries' vectors must belong with the train rows: same model, projection and
        # correction (the query side's, for a preset whose sides differ).
        score.check_query_meta(preset, meta, query.meta(params))
        if spec.hessian != "none":
            if hessian_fit is None:
                raise AttributionError(
                    f"preset {preset!r} needs a Hessian fit ({spec.hessian} R); fit one "
                    "(trackstar hessian) or pick a preset without R"
                )
            try:
                hessian_fit.check_dim(meta.dim, "the train store")
                hessian_fit.check_compatible(meta.to_dict(), "the train store")
            except HessianError as e:
                raise AttributionError(str(e)) from None
        for what, values in (("texts", texts), ("labels", labels)):
            if values is not None and len(values) != meta.num_examples:
                raise AttributionError(
                    f"{len(values)} {what} for a store of {meta.num_examples} examples; pass the "
                    f"{what} of the example set the store was featurized from"
                )
        self.apply_fn = apply_fn
        self.tokenizer = tokenizer
        self.train_store = train_store
        self.hessian_fit = hessian_fit
        self.query = query
        self.preset = preset
        self.texts = texts if texts is None or isinstance(texts, Sequence) else list(texts)
        self.labels = labels
        self.mesh = mesh
        self.rows_per_step = rows_per_step
        same_sides = spec.query_side_corrected == spec.corrected
        if train_preconditioner is None and same_sides:
            train_preconditioner = query.preconditioner
        self.train_preconditioner = train_preconditioner
        if index is not None and not isinstance(index, index_lib.ScoringIndex):
            index = index_lib.ScoringIndex.open(index)
        if index is not None:
            index.check(train_store, hessian_fit, preset)
        self.index = index
        self._encode = encode_queries or self._encode_with_tokenizer
        self._feature_fn = make_mesh_feature_fn(
            apply_fn,
            query.output_fn,
            query.projector,
            query.preconditioner,
            query.mesh,
            query.shardings,
        )
        self.params = sharding.place(params, self._feature_fn.shardings)

    # ----- factories --------------------------------------------------------------------------

    @classmethod
    def from_run(
        cls,
        run: str | os.PathLike | ml_collections.ConfigDict,
        preset: str = "trackstar",
        candidates: str = "candidates",
        *,
        train_tag: str = "",
        query_tag: str = "",
        index: bool = False,
    ) -> Attributor:
        """An Attributor over a run directory of ``trackstar.stages``.

        ``run`` is the run's config (the command's, as the stages get it) or the run directory
        (its ``config.json`` is then the config). Loads the final checkpoint
        (``stages.load_trained``), the finished ``candidates`` store of the preset's
        correction (``stages.store_path``; tagged with ``train_tag``) and, for a preset with R,
        its Hessian fit (``stages.hessian_path``). Projection and correction are the store's
        own (from its metadata); the output function and row dtype are those of the run's
        query stores (task, else the R_eval source), else ``featurize.query_output_fn`` and
        ``featurize.dtype``. Context length, UNK policy, batch size and meshes come from the
        config. ``index=True`` scores against the run's float32 scoring index of the store and
        preset (``stages.stage_index``: built on first use, reused after).

        Raises:
          StageError: a stage's output is missing; the message names the stage to run.
        """
        cfg = run if isinstance(run, ml_collections.ConfigDict) else stages.config_for_run_dir(run)
        spec = score.get_preset(preset)
        if candidates not in ("candidates", "corpus"):
            raise AttributionError(
                f"candidates must be 'candidates' or 'corpus', not {candidates!r}"
            )
        trained = stages.load_trained(cfg)
        train_store = _finished_store(cfg, candidates, spec.corrected, train_tag)
        fit = None
        if spec.hessian != "none":
            fit_path = stages.hessian_path(cfg, candidates, spec.corrected, train_tag, query_tag)
            if not os.path.isfile(fit_path):
                raise stages.StageError(
                    f"preset {preset!r} needs the Hessian fit {fit_path}, which is not there "
                    f"yet; run the hessian stage first (trackstar hessian --config ... "
                    f"--config.run_dir={cfg.run_dir}, or scripts/fit_hessian.py)"
                )
            fit = stages.preset_fit(cfg, preset, candidates, train_store, train_tag, query_tag)
        meta = train_store.meta
        reference = _query_reference(cfg, spec.query_side_corrected, query_tag)
        if reference is not None:
            score.check_query_meta(preset, meta, reference.meta)
        settings = None
        if meta.correction != "none":
            settings = correction.CorrectionSettings(**meta.correction_settings)
        precond = None if settings is None else stages.make_preconditioner(cfg, trained, settings)
        feat_mesh, shardings = stages.featurize_mesh(cfg, trained.params)
        query = QueryFeaturizer(
            output_fn=(
                reference.meta.output_fn if reference else str(cfg.featurize.query_output_fn)
            ),
            projector=projector_from_meta(trained.params, meta.projection),
            max_len=int(cfg.model.max_len),
            batch_size=int(cfg.featurize.batch_size),
            **query_correction(spec, precond, meta, _optimizer_fingerprint(trained, meta)),
            dtype=reference.meta.dtype if reference else str(cfg.featurize.dtype),
            mesh=feat_mesh,
            shardings=shardings,
            **stages.unk_policy(cfg),
        )
        texts, _ = stages.candidate_pool(cfg, trained.world, trained.tok, candidates)
        return cls(
            trained.apply_fn,
            trained.params,
            trained.tok,
            train_store,
            fit,
            query,
            preset=preset,
            texts=texts,
            mesh=sharding.mesh_from_config(cfg.mesh),
            rows_per_step=int(cfg.score.chunk_rows),
            train_preconditioner=precond,
            index=(
                stages.stage_index(cfg, preset, candidates, "float32", False, train_tag, query_tag)
                if index
                else None
            ),
        )

    @classmethod
    def from_checkpoint(
        cls,
        run: str | os.PathLike | ml_collections.ConfigDict,
        preset: str | None = None,
    ) -> Attributor:
        """An Attributor over a run of ``trackstar.checkpoint_run`` (``trackstar attribute``):
        a Hugging Face checkpoint attributed over a corpus file.

        ``run`` is the pipeline's config, or its run directory (the config it saved as
        ``results/config.json``). The checkpoint is loaded once; the corpus store, the V
        estimate and the Hessian fit are the run's, so a query of the queries file gets the
        ids and scores of its row in ``results/proponents.jsonl`` (``Proponents.passage_ids``
        are that row's ``proponent_ids``). ``preset`` defaults to the run's ``score.preset``.

        Raises:
          StageError: the run has not made its stores or fit yet (run ``trackstar attribute``).
        """
        from trackstar import checkpoint_run

        cfg = (
            run
            if isinstance(run, ml_collections.ConfigDict)
            else checkpoint_run.config_for_run_dir(run)
        )
        preset = preset or str(cfg.score.preset)
        parts = checkpoint_run.attributor_parts(cfg, preset)
        ckpt, feat = parts.checkpoint, parts.featurizer
        meta = parts.train_store.meta
        spec = score.get_preset(preset)
        query = QueryFeaturizer(
            output_fn=parts.output_fn,
            projector=feat.projector,
            max_len=ckpt.max_len,
            batch_size=int(cfg.featurize.batch_size),
            **query_correction(spec, feat.preconditioner, meta, feat.optimizer_fingerprint),
            dtype=parts.query_dtype,
            mesh=feat.mesh,
            shardings=feat.shardings,
            **stages.unk_policy(cfg),
        )
        return cls(
            ckpt.apply_fn,
            ckpt.params,
            ckpt.tokenizer,
            parts.train_store,
            parts.fit,
            query,
            preset=preset,
            texts=parts.texts,
            encode_queries=parts.encode_queries,
            mesh=sharding.mesh_from_config(cfg.mesh),
            rows_per_step=int(cfg.score.chunk_rows),
            labels=parts.passage_ids,
            train_preconditioner=feat.preconditioner,
        )

    # ----- queries ----------------------------------------------------------------------------

    def _encode_with_tokenizer(self, prompts: Sequence[str], targets: Sequence[str]) -> Examples:
        tokens, weights = data.encode_queries(
            self.tokenizer,
            list(prompts),
            list(targets),
            self.query.max_len,
            max_unk_frac=self.query.max_unk_frac,
            unk_error=self.query.unk_error,
        )
        return Examples(tokens, weights)

    def query_vectors(self, prompts: Sequence[str], targets: Sequence[str]) -> np.ndarray:
        """``vectors_QxD`` of the queries, made as the run's query stores were (float32)."""
        if isinstance(prompts, str) or isinstance(targets, str):
            raise AttributionError("pass lists of prompts and targets (or use proponents())")
        if len(prompts) != len(targets) or not prompts:
            raise AttributionError(
                f"{len(prompts)} prompts and {len(targets)} targets; pass equal, non-empty lists"
            )
        examples = self._encode(prompts, targets)
        empty = np.flatnonzero(examples.weights_NxT.sum(axis=1) <= 0)
        if len(empty):
            i = int(empty[0])
            raise AttributionError(
                f"the query {prompts[i]!r} -> {targets[i]!r} has no target tokens to attribute; "
                "give a non-empty target"
            )
        v = compute_vectors(self._feature_fn, self.params, examples, self.query.batch_size)
        if self.query.dtype != "float32":  # Rounded as the stored query rows were.
            v = v.astype(_ROW_DTYPES[self.query.dtype]).astype(np.float32)
        bad = np.flatnonzero(~np.isfinite(v).all(axis=1))
        if len(bad):
            i = int(bad[0])
            raise AttributionError(
                f"the query {prompts[i]!r} -> {targets[i]!r} has a NaN/inf gradient vector; "
                "check the model's params and the correction settings"
            )
        return v

    def score_vectors(self, query_vectors_QxD: np.ndarray, k: int) -> tuple[np.ndarray, ...]:
        """``(ids_QxK, scores_QxK)`` of already featurized queries (``query_vectors``): the
        index when the Attributor has one, else the preset streamed over the train store."""
        if self.index is not None:
            return index_lib.score_index(
                self.index,
                query_vectors_QxD,
                k,
                fit=self.hessian_fit,
                # The index's own chunks are the steps: each is handed to the device as it is
                # mapped, where re-cut blocks would be copied.
                rows_per_step=None,
                mesh=self.mesh,
            )
        return score.score_preset(
            self.train_store,
            query_vectors_QxD,
            self.preset,
            self.hessian_fit,
            k,
            rows_per_step=self.rows_per_step,
            mesh=self.mesh,
        )

    def proponents_batch(
        self, prompts: Sequence[str], targets: Sequence[str], k: int = 10
    ) -> list[Proponents]:
        """The top-``k`` proponents of each ``(prompt, target)``, in one pass over the store."""
        ids, scores = self.score_vectors(self.query_vectors(prompts, targets), k)
        out = []
        for p, t, i, s in zip(prompts, targets, ids, scores, strict=True):
            texts = None if self.texts is None else [self.texts[int(j)] for j in i]
            names = None if self.labels is None else [self.labels[int(j)] for j in i]
            out.append(Proponents(p, t, np.asarray(i, np.int64), np.asarray(s), texts, names))
        return out

    def proponents(self, prompt: str, target: str, k: int = 10) -> Proponents:
        """The top-``k`` training examples for the model predicting ``target`` after ``prompt``."""
        return self.proponents_batch([prompt], [target], k)[0]

    def _breakdown_preconditioner(self) -> Any:
        """The train side's correction factors (None: uncorrected train rows)."""
        if self.train_preconditioner is None and score.get_preset(self.preset).corrected:
            raise AttributionError(
                f"preset {self.preset!r} corrects the train side but not the queries, and this "
                "Attributor was given no train_preconditioner for the breakdown; pass one (or "
                "build it with Attributor.from_run)"
            )
        return self.train_preconditioner

    def breakdown(self, prompt: str, target: str, train_id: int) -> breakdown_lib.Breakdown:
        """The score of train example ``train_id`` for ``(prompt, target)``, split by parameter
        tensor and by the example's tokens (``trackstar.breakdown``, docs/method.md, Score
        breakdowns).

        The query vector is made as ``proponents`` makes it; the example's gradient is
        recomputed from its text (``texts[train_id]`` encoded as featurize encodes training
        examples) with this Attributor's projector, correction and Hessian fit, so ``score``
        equals its score in ``proponents`` to float32 rounding.

        Raises:
          AttributionError: ``train_id`` out of range, no texts, or an Attributor with its own
            query encoder (``from_checkpoint``), whose training tokens are not re-encoded here.
        """
        n = self.train_store.meta.num_examples
        if not 0 <= int(train_id) < n:
            raise AttributionError(
                f"train id {train_id} is out of range: the store holds {n} examples "
                f"(ids 0..{n - 1})"
            )
        if self.texts is None or self._encode != self._encode_with_tokenizer:
            raise AttributionError(
                "a breakdown re-encodes the train example's text with the run's tokenizer, "
                "which this Attributor does not have (no texts, or its own query encoder); "
                "build it with Attributor.from_run, or call trackstar.breakdown.score_parts "
                "with the example's tokens"
            )
        tokens, weights = data.encode_texts(
            self.tokenizer,
            [self.texts[int(train_id)]],
            self.query.max_len,
            max_unk_frac=self.query.max_unk_frac,
            unk_error=self.query.unk_error,
        )
        spec = score.get_preset(self.preset)
        t_m, t_q = breakdown_lib.preset_transforms(self.preset, self.hessian_fit)
        parts = breakdown_lib.score_parts(
            self.apply_fn,
            self.params,
            self.query.projector,
            self._breakdown_preconditioner(),
            self.query_vectors([prompt], [target])[0],
            tokens[0],
            weights[0],
            train_transform=t_m,
            query_transform=t_q,
            normalize=spec.normalize,
            output_fn=self.train_store.meta.output_fn,
        )
        texts = breakdown_lib.token_texts(self.tokenizer, tokens[0], parts.positions)
        return breakdown_lib.to_breakdown(parts, texts)


# ----- helpers ----------------------------------------------------------------------------------


def query_correction(
    spec: score.PresetSpec, preconditioner: Any, train_meta: StoreMeta, optimizer_fingerprint: str
) -> dict:
    """The ``QueryFeaturizer`` correction fields of ``spec``'s query side: the train store's
    correction (``preconditioner`` and its recorded settings) when the query side is corrected,
    none otherwise (``step_influence``'s raw query gradients)."""
    if spec.query_side_corrected:
        return {
            "preconditioner": preconditioner,
            "correction": train_meta.correction,
            "correction_settings": dict(train_meta.correction_settings),
            "optimizer_fingerprint": optimizer_fingerprint,
        }
    return {
        "preconditioner": None,
        "correction": "none",
        "correction_settings": {},
        "optimizer_fingerprint": optimizer_fingerprint,
    }


def _finished_store(cfg, which: str, corrected: bool, tag: str) -> VectorStore:
    """A finished store of the run, or a ``StageError`` naming the stage that makes it."""
    file = stages.store_path(cfg, which, corrected, tag)
    try:
        return stages.open_store(file)
    except StoreError as e:
        correction_flag = "" if corrected else " --correction off"
        raise stages.StageError(
            f"the {which} store of this run is not ready ({' '.join(str(e).split())}); run the "
            f"featurize stage first: trackstar featurize --config ... --config.run_dir="
            f"{cfg.run_dir} --sets {which}{correction_flag} (or scripts/featurize.py)"
        ) from None


def _optimizer_fingerprint(trained: stages.Trained, meta: StoreMeta) -> str:
    """The optimizer fingerprint of the preconditioner ``from_run`` builds: the checkpoint's
    optimizer state, checked against the store's. A V estimated from gradients (settings with
    an ``estimate`` record) is pinned by its key, which ``stages.make_preconditioner`` checks."""
    if meta.correction_settings.get("estimate"):
        return meta.optimizer_fingerprint
    return correction.opt_state_fingerprint(trained.opt_state)


def _query_reference(cfg, corrected: bool, tag: str) -> VectorStore | None:
    """A finished query store of the run (task, else the R_eval source), or None."""
    for which in ("task", str(cfg.hessian.get("eval_source", "heldout")), "heldout"):
        try:
            return stages.open_store(stages.store_path(cfg, which, corrected, tag))
        except StoreError:
            continue
    return None
