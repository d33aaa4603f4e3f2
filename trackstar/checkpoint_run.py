"""Attribution for a Hugging Face checkpoint over a corpus file: proponents of file queries.

The pipeline ``run(cfg)`` joins the pieces a pretrained model needs (docs/bring_your_own_model.md)
in a run directory, each step cached and resumable like ``trackstar.stages``:

1. ``load`` the ``save_pretrained`` directory ``model.checkpoint_dir`` (``trackstar.hf.loader``:
   GPT-2, Llama / Mistral / Qwen2, GPT-NeoX) with its own ``tokenizer.json``;
2. ``stage_passages``: the corpus file (``corpus`` section, ``trackstar.corpus_files``) cut into
   passages of at most ``model.max_len`` tokens and packed with the checkpoint's tokenizer into
   ``passages/<key>/`` (texts with ids ``"<doc id>:<k>"``, token and weight arrays read back
   memory-mapped); the key hashes the corpus file, the tokenizer and the packing settings;
3. the correction: V estimated from squared batch gradients over a passage sample
   (``featurize.correction_source = "estimate"``, ``trackstar.v_estimate``; saved in
   ``v_estimate/<key>.npz``), or none (``"none"``: uncorrected presets only);
4. ``featurize``: the passages into ``stores/corpus-<correction>`` and the queries (the
   ``queries`` jsonl file, also the R_eval source) into ``stores/task-<correction>-<tag>``,
   the tag naming the queries file (``queries_tag``: new queries reuse the corpus store); a
   store made with another checkpoint, projection or correction is refused
   (``VectorStore.create``), a partial one resumes;
5. R: ``stages.stage_hessian`` on those stores (reused while its provenance key holds);
6. ``stage_score``: the ``score.preset`` scores written to ``results/proponents.jsonl`` (one row
   per query: passage ids, store rows, scores, texts), ``results/proponents.npz``, a readable
   ``results/proponents.md`` and the run's ``results/config.json``;
7. for the release's query files (``queries.format``, docs/release_format.md) ``stage_release``:
   the release's task evaluated against its ground truth (``trex_sentences`` and the corpus
   shards' ``fact_triples``): ``results/<preset>.release.jsonl.gz`` in the release's results
   schema with opponents (scored with the proponents, one store pass), ``proponent_correct``,
   each query's MRR / Recall@10 and the model's own answer, and
   ``results/<preset>.release_metrics.json`` with their means.

Each computed step counts in ``stages.CACHE_MISSES`` (``passages``, ``v_estimate``,
``featurize``, ``hessian``, ``score``, ``release``), so a rerun that recomputes nothing is
visible.
``attributor_parts`` gives ``trackstar.Attributor.from_checkpoint`` the same pieces, so its
proponents equal the pipeline's.

Token layout: rows are ``[BOS] + tokens`` as everywhere in trackstar (``trackstar.data``), with
the checkpoint's own BOS id (``model.bos_token_id``, default ``config.json``'s) in column 0;
right padding is never attended to by a causal model and has weight 0.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from trackstar import correction, data, hessian, metrics, release, score, sharding, stages
from trackstar import model as model_lib
from trackstar import projection as projection_lib
from trackstar import store as store_lib
from trackstar import v_estimate as v_estimate_lib
from trackstar.config import save_config
from trackstar.corpus_files import (
    CorpusFileError,
    CorpusSource,
    FileQuery,
    PassageFile,
    detect_format,
    detect_query_format,
    passage_doc_id,
    read_queries,
    write_passages,
)
from trackstar.featurize import Examples, featurize_into_store, make_mesh_feature_fn
from trackstar.files import atomic_write, write_json, write_text
from trackstar.hf import loader
from trackstar.losses import TRAIN_OUTPUT_FN
from trackstar.projection import Projector
from trackstar.tree import tree_fingerprint

# Where V may come from for a checkpoint without optimizer state (stages.CORRECTION_SOURCES).
CORRECTION_SOURCES = ("estimate", "none")
# Bumped when the passage files' layout changes, so older ones are not reused.
PASSAGES_VERSION = 1
# The example sets of this pipeline's stores (names of stages.EXAMPLE_SETS: the corpus
# passages are the train side, the file queries the scored "task" queries and R_eval source).
CORPUS, QUERIES = "corpus", "task"
# queries.format: "auto" detects the release's query files by their first row.
QUERY_FORMATS = ("auto", "prompt_target", "release")
# Bumped when the release results or metrics files change, so older ones are written again.
RELEASE_VERSION = 1
# The cut-off of the release task's Recall (the paper's Recall@10).
RECALL_AT = 10


class CheckpointRunError(ValueError):
    """The checkpoint, corpus, queries or config cannot be used as given; says what to change."""


# ----- the checkpoint ---------------------------------------------------------------------------


@dataclasses.dataclass
class Checkpoint:
    """An imported checkpoint with what featurizing needs: tokenizer, context and BOS id."""

    imported: loader.ImportedModel
    tokenizer: Any  # tokenizers.Tokenizer of the checkpoint's tokenizer.json
    max_len: int  # Row width: model.max_len, or the checkpoint's context when 0.
    context: int  # The checkpoint's own context length (positions).
    bos_id: int  # Written in column 0 of every row.
    fingerprint: str  # tree_fingerprint of the params (a store's model_fingerprint).

    @property
    def apply_fn(self) -> Any:
        return self.imported.apply_fn

    @property
    def params(self) -> Any:
        return self.imported.params


_LOADED: dict[str, Checkpoint] = {}


def _context(imported: loader.ImportedModel) -> int:
    hf = imported.hf_config
    for value in (
        hf.get("n_positions"),
        hf.get("max_position_embeddings"),
        imported.cfg_model.get("max_len"),
    ):
        if value:
            return int(value)
    raise CheckpointRunError(
        "the checkpoint's config.json gives no context length (n_positions or "
        "max_position_embeddings); set model.max_len to the length it was trained with"
    )


def load(cfg: ml_collections.ConfigDict) -> Checkpoint:
    """The checkpoint of ``cfg.model`` (memoized per directory, dtype, max_len and BOS id).

    Raises:
      CheckpointRunError: no directory, no tokenizer.json, a ``model.max_len`` beyond the
        checkpoint's context, or no BOS id.
      HFImportError: an unsupported ``model_type`` or a missing file or tensor (named).
    """
    m = cfg.model
    directory = str(m.checkpoint_dir)
    if not directory:
        raise CheckpointRunError(
            "model.checkpoint_dir is empty; pass --config.model.checkpoint_dir=DIR, a directory "
            "written by save_pretrained (config.json, model.safetensors, tokenizer.json)"
        )
    if not os.path.isdir(directory):
        raise CheckpointRunError(
            f"model.checkpoint_dir = {directory!r} is not a directory; download the checkpoint "
            "first (e.g. huggingface-cli download gpt2 --local-dir DIR) and pass that DIR"
        )
    key = stages.config_key(os.path.abspath(directory), m.to_dict(), _stamp(directory))
    if key in _LOADED:
        return _LOADED[key]
    imported = loader.load_checkpoint(directory, str(m.dtype))
    if imported.tokenizer is None:
        raise CheckpointRunError(
            f"{directory!r} has no tokenizer.json; save the model's fast tokenizer beside it "
            "(AutoTokenizer.from_pretrained(name).save_pretrained(DIR) writes tokenizer.json)"
        )
    context = _context(imported)
    max_len = int(m.max_len) or context
    if not 2 <= max_len <= context:
        raise CheckpointRunError(
            f"model.max_len = {m.max_len} does not fit the checkpoint: rows hold 2 to its "
            f"context of {context} tokens (0 = the whole context); lower model.max_len"
        )
    bos = int(m.bos_token_id)
    if bos < 0:
        bos = imported.hf_config.get("bos_token_id")
        if not isinstance(bos, int):
            raise CheckpointRunError(
                f"{directory!r}/config.json has no bos_token_id; set model.bos_token_id to the "
                "id the model starts a document with (e.g. its end-of-text token)"
            )
    vocab = int(imported.cfg_model.vocab_size)
    if not 0 <= bos < vocab:
        raise CheckpointRunError(
            f"model.bos_token_id = {bos} is outside the vocabulary 0..{vocab - 1}"
        )
    ckpt = Checkpoint(imported, imported.tokenizer, max_len, context, int(bos), "")
    ckpt.fingerprint = tree_fingerprint(imported.params)
    _LOADED[key] = ckpt
    return ckpt


def _stamp(path: str) -> list:
    """``[name, size, mtime_ns]`` of each file of ``path`` (a file or the files of a directory):
    a changed file gives another cache key."""
    if os.path.isfile(path):
        st = os.stat(path)
        return [os.path.basename(path), st.st_size, st.st_mtime_ns]
    if not os.path.isdir(path):
        return ["missing"]
    out = []
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if os.path.isfile(full):
            st = os.stat(full)
            out.append([name, st.st_size, st.st_mtime_ns])
    return out


def _with_bos(tokens_NxT: np.ndarray, bos_id: int) -> np.ndarray:
    """Rows ``[BOS] + ...`` of trackstar's layout with the checkpoint's BOS id in column 0."""
    tokens_NxT[:, 0] = bos_id
    return tokens_NxT


# ----- passages ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Passages:
    """The packed corpus: row ``r`` of the train store is passage ``texts.rows([r])``."""

    directory: str
    key: str
    texts: PassageFile
    examples: Examples  # tokens / weights memory-mapped from the directory's .npy files


class PassageRows(Sequence):
    """Passage ids (``field="id"``) or texts (``"text"``) of a ``PassageFile`` by store row,
    read on demand (a corpus's texts are never loaded whole)."""

    def __init__(self, texts: PassageFile, field: str = "text"):
        self._file = texts
        self._index = {"id": 0, "text": 1}[field]

    def __len__(self) -> int:
        return len(self._file)

    def __getitem__(self, i):  # noqa: ANN001 - int or slice, as Sequence
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self._file.rows([int(i)])[0][self._index]


def corpus_source(cfg: ml_collections.ConfigDict) -> CorpusSource:
    """The ``corpus`` section as a ``CorpusSource``; a missing path is an error naming it."""
    c = cfg.corpus
    if not c.path:
        raise CheckpointRunError(
            "corpus.path is empty; pass --config.corpus.path=FILE (jsonl rows with an id and a "
            "text field, a parquet file, or a datasets save_to_disk directory)"
        )
    if not os.path.exists(c.path):
        raise CheckpointRunError(f"corpus.path = {c.path!r} does not exist")
    return CorpusSource(str(c.path), str(c.format), str(c.id_field), str(c.text_field))


def passages_key(cfg: ml_collections.ConfigDict, ckpt: Checkpoint) -> str:
    """What the packed corpus depends on: the corpus files and fields, the tokenizer, the row
    width, the BOS id and the sentence overlap."""
    c = cfg.corpus
    return stages.config_key(
        "passages",
        PASSAGES_VERSION,
        os.path.abspath(c.path),
        _stamp(c.path),
        {k: c[k] for k in ("format", "id_field", "text_field", "overlap_sentences", "skip_empty")},
        ckpt.tokenizer.to_str(),
        ckpt.max_len,
        ckpt.bos_id,
    )


def stage_passages(
    cfg: ml_collections.ConfigDict, ckpt: Checkpoint, progress: bool = True
) -> Passages:
    """The corpus cut into passages and packed (``passages/<key>/``), or the packing already there.

    Texts go to ``texts.jsonl`` (``corpus_files.write_passages``: ids ``"<doc id>:<k>"``), the
    rows to ``tokens.npy`` / ``weights.npy``; ``manifest.json`` is written last, so a killed
    run packs again. A corpus row without the id or text field, a document without tokens
    (unless ``corpus.skip_empty``) or an empty corpus is a ``CheckpointRunError`` naming the
    file and row.
    """
    source = corpus_source(cfg)
    key = passages_key(cfg, ckpt)
    out = stages.path(cfg, "passages", key)
    manifest = os.path.join(out, "manifest.json")
    if not os.path.isfile(manifest):
        stages.CACHE_MISSES["passages"] += 1
        _pack(cfg, ckpt, source, out, progress)
        write_json(manifest, {"key": key, "corpus": cfg.corpus.to_dict(), "max_len": ckpt.max_len})
    texts = PassageFile(os.path.join(out, "texts.jsonl"))
    tokens = np.load(os.path.join(out, "tokens.npy"), mmap_mode="r")
    weights = np.load(os.path.join(out, "weights.npy"), mmap_mode="r")
    return Passages(out, key, texts, Examples(tokens, weights))


def _pack(cfg, ckpt: Checkpoint, source: CorpusSource, out: str, progress: bool) -> None:
    c = cfg.corpus
    texts_path = os.path.join(out, "texts.jsonl")
    try:
        n = write_passages(
            source,
            ckpt.tokenizer,
            ckpt.max_len,
            texts_path,
            int(c.overlap_sentences),
            int(c.batch_rows),
            bool(c.skip_empty),
        )
    except CorpusFileError as e:
        raise CheckpointRunError(
            f"{e} (corpus.path = {c.path!r}, corpus.id_field = {c.id_field!r}, corpus.text_field "
            f"= {c.text_field!r}: fix the row, or set the fields to the corpus's names; "
            "corpus.id_field = '' numbers the documents; the release's corpus shards need "
            "corpus.id_field = 'sentence_id')"
        ) from None
    if n == 0:
        raise CheckpointRunError(f"corpus.path = {c.path!r} holds no documents with text")
    chunk = int(cfg.featurize.chunk_size)
    arrays = {}
    for name, dtype in (("tokens", np.int32), ("weights", np.float32)):
        tmp = os.path.join(out, f"{name}.tmp.npy")
        arrays[name] = (tmp, np.lib.format.open_memmap(tmp, "w+", dtype, (n, ckpt.max_len)))
    pf = PassageFile(texts_path)
    bar = tqdm(total=n, desc="pack passages", unit="ex", disable=not progress)
    for packed in pf.iter_chunks(ckpt.tokenizer, ckpt.max_len, chunk):
        rows = slice(packed.start, packed.start + len(packed))
        arrays["tokens"][1][rows] = _with_bos(packed.tokens_NxT, ckpt.bos_id)
        arrays["weights"][1][rows] = packed.weights_NxT
        bar.update(len(packed))
    bar.close()
    for name, (tmp, arr) in arrays.items():
        arr.flush()
        del arr
        os.replace(tmp, os.path.join(out, f"{name}.npy"))


# ----- queries ----------------------------------------------------------------------------------


def _byte_level(tok: Any) -> bool:
    """Whether the tokenizer marks a word's leading space in its tokens (byte-level BPE: GPT-2,
    Llama 3, Qwen2), so a target needs its space to be encoded as in running text."""
    text = tok.to_str()
    return '"ByteLevel"' in text


def space_before_target(cfg: ml_collections.ConfigDict, ckpt: Checkpoint) -> bool:
    """``queries.space_before_target``: "auto" = yes for byte-level BPE tokenizers."""
    value = str(cfg.queries.space_before_target)
    if value not in ("auto", "yes", "no"):
        raise CheckpointRunError(
            f"queries.space_before_target = {value!r}; use 'auto', 'yes' or 'no'"
        )
    return _byte_level(ckpt.tokenizer) if value == "auto" else value == "yes"


def query_encoder(cfg: ml_collections.ConfigDict, ckpt: Checkpoint) -> Callable[..., Examples]:
    """``encode(prompts, targets, where=None) -> Examples``: ``data.encode_queries`` with the
    checkpoint's tokenizer and BOS id, the target given its leading space when
    ``space_before_target``; a query that does not fit ``max_len`` is a ``CheckpointRunError``
    naming it (``where[i]``: its ``path:line``) and the fix."""
    space = space_before_target(cfg, ckpt)
    unk = stages.unk_policy(cfg)

    def encode(
        prompts: Sequence[str], targets: Sequence[str], where: Sequence[str] | None = None
    ) -> Examples:
        targets = [
            " " + t if space and t[:1] and not t[:1].isspace() and p[-1:] != " " else t
            for p, t in zip(prompts, targets, strict=True)
        ]
        tokens, weights, kept = data.encode_queries(
            ckpt.tokenizer, list(prompts), targets, ckpt.max_len, True, **unk
        )
        bad = sorted(set(range(len(prompts))) - set(kept.tolist()))
        if bad:
            i = bad[0]
            at = f"{where[i]}: " if where else ""
            raise CheckpointRunError(
                f"{at}the query {prompts[i]!r} -> {targets[i]!r} does not fit the context: "
                f"[BOS] + prompt + target is longer than model.max_len = {ckpt.max_len} tokens, "
                f"or the target has no tokens; shorten the prompt, or raise model.max_len (at "
                f"most the checkpoint's {ckpt.context})"
            )
        return Examples(_with_bos(tokens, ckpt.bos_id), weights)

    return encode


@dataclasses.dataclass(frozen=True)
class ReleaseFileQuery(FileQuery):
    """A fact of the release's query files as a query: ``query_id`` is its ``fact_id``,
    ``prompt`` its ``prompt{queries.prompt_index}``, ``target`` its ``entity1``; ``fact`` keeps
    the rest (subject, relation, ``trex_sentences``) for the ground truth and the results."""

    fact: release.ReleaseQuery


def query_format(cfg: ml_collections.ConfigDict) -> str:
    """``queries.format`` resolved: "release" or "prompt_target" ("auto" looks at the first
    row of ``queries.path``; configs saved before the field existed read prompt/target rows)."""
    value = str(cfg.queries.get("format", "prompt_target"))
    if value not in QUERY_FORMATS:
        raise CheckpointRunError(
            f"queries.format = {value!r}; use one of {', '.join(map(repr, QUERY_FORMATS))}"
        )
    if value != "auto":
        return value
    try:
        return detect_query_format(str(cfg.queries.path))
    except CorpusFileError as e:
        raise CheckpointRunError(f"{e} (queries.path)") from None


def load_release_queries(cfg: ml_collections.ConfigDict) -> list[ReleaseFileQuery]:
    """The facts of the release query files at ``queries.path`` (a file or a directory of
    ``*.jsonl(.gz)`` files) as queries; read line by line, held as one list like the
    prompt/target queries.

    Raises:
      CheckpointRunError: a bad line (``path:line``, the field and the fix), a fact without
        ``prompt{queries.prompt_index}``, a repeated ``fact_id``, or no facts at all.
    """
    q = cfg.queries
    if not os.path.exists(str(q.path)):
        raise CheckpointRunError(f"queries.path = {q.path!r} does not exist")
    index = int(q.get("prompt_index", 0))
    out: list[ReleaseFileQuery] = []
    seen: dict[str, str] = {}
    fix = (
        "; every line of a release query file needs fact_id, entity0, relation, entity1 and "
        "prompt0 (docs/release_format.md): fix that line, or set queries.format = "
        "'prompt_target' for rows with prompt and target"
    )
    try:
        for fact in release.read_release_queries(str(q.path)):
            if fact.fact_id in seen:
                raise CheckpointRunError(
                    f"{fact.where}: fact_id {fact.fact_id!r} already used at "
                    f"{seen[fact.fact_id]}; give each fact its own id"
                )
            seen[fact.fact_id] = fact.where
            if index >= len(fact.prompts):
                raise CheckpointRunError(
                    f"{fact.where}: no field 'prompt{index}' for queries.prompt_index = {index};"
                    f" the line has {len(fact.prompts)} prompt(s): lower queries.prompt_index"
                )
            out.append(
                ReleaseFileQuery(fact.fact_id, fact.prompts[index], fact.entity1, fact.where, fact)
            )
    except release.ReleaseError as e:
        raise CheckpointRunError(f"{e}{fix}") from None
    if not out:
        raise CheckpointRunError(f"queries.path = {q.path!r} holds no facts{fix}")
    return out


def load_queries(cfg: ml_collections.ConfigDict) -> list[FileQuery]:
    """The queries of ``queries.path``: release facts (``load_release_queries``) when
    ``query_format`` says so, else ``corpus_files.read_queries`` with the section's fields."""
    q = cfg.queries
    if not q.path:
        raise CheckpointRunError(
            "queries.path is empty; pass --config.queries.path=FILE (jsonl rows with prompt and "
            "target, or inputs_plaintext and targets_plaintext, or the release's query files)"
        )
    if query_format(cfg) == "release":
        return list(load_release_queries(cfg))
    try:
        return read_queries(
            str(q.path), str(q.prompt_field) or None, str(q.target_field) or None, str(q.id_field)
        )
    except CorpusFileError as e:
        raise CheckpointRunError(
            f"{e} (queries.prompt_field / queries.target_field name other fields)"
        ) from None


# ----- correction and featurize -----------------------------------------------------------------


def correction_source(cfg: ml_collections.ConfigDict) -> str:
    """``featurize.correction_source``, which must be "estimate" or "none" here."""
    source = stages.correction_source(cfg)
    if source not in CORRECTION_SOURCES:
        raise CheckpointRunError(
            f"featurize.correction_source = {source!r}: a Hugging Face checkpoint carries no "
            "optimizer state; use 'estimate' (V from squared gradients) or 'none'"
        )
    return source


def v_estimate(
    cfg: ml_collections.ConfigDict,
    ckpt: Checkpoint,
    passages: Passages,
    sample: v_estimate_lib.EstimateSample | None = None,
    progress: bool = True,
) -> tuple[correction.VEstimate, dict]:
    """``(estimate, record)``: V over a sample of the passages (``featurize.v_estimate_*``),
    saved as ``v_estimate/<key>.npz`` and reused; the key hashes the params, the sampled rows
    and the sample settings (the record is what the stores record as its ``estimate``)."""
    sample = sample or stages.v_estimate_sample(cfg)
    pos = v_estimate_lib.sample_positions(len(passages.examples), sample)  # batch order
    tokens = np.asarray(passages.examples.tokens_NxT[pos])
    weights = np.asarray(passages.examples.weights_NxT[pos])
    fields = {"per": v_estimate_lib.PER, "loss": v_estimate_lib.LOSS, **sample.to_dict()}
    key = stages.config_key(
        "hf_v_estimate",
        v_estimate_lib.VERSION,
        fields,
        ckpt.fingerprint,
        v_estimate_lib.data_fingerprint(tokens, weights),
    )
    file = stages.path(cfg, "v_estimate", f"{key}.npz")
    if os.path.isfile(file):
        return v_estimate_lib.load(file, ckpt.params)
    stages.CACHE_MISSES["v_estimate"] += 1
    est = v_estimate_lib.estimate_v(
        ckpt.apply_fn, ckpt.params, tokens, weights, sample.batch, progress=progress
    )
    record = {**fields, "used": len(pos), "source": "corpus", "key": key}
    v_estimate_lib.save(file, est, record)
    return est, record


@dataclasses.dataclass
class Featurizer:
    """How this run's vectors are made: projection, correction and the feature kernels' mesh."""

    projector: Projector
    settings: correction.CorrectionSettings | None  # None: uncorrected
    preconditioner: Any
    optimizer_fingerprint: str
    mesh: Any
    shardings: Any

    @property
    def corrected(self) -> bool:
        return self.settings is not None

    def meta(self, cfg, ckpt: Checkpoint, which: str, n: int, extra: dict) -> store_lib.StoreMeta:
        """The metadata of the store of example set ``which`` (corpus or task) of ``n`` rows."""
        s = self.settings
        return store_lib.StoreMeta(
            kind="train" if which == CORPUS else "query",
            dim=self.projector.dim,
            dtype=str(cfg.featurize.dtype),
            num_examples=n,
            chunk_size=int(cfg.featurize.chunk_size),
            model_fingerprint=ckpt.fingerprint,
            optimizer_fingerprint=self.optimizer_fingerprint,
            projection=self.projector.config(),
            output_fn=output_fn(cfg, which),
            correction=s.kind if s else "none",
            correction_settings=s.to_dict() if s else {},
            extra={"example_set": which, **extra},
        )


def output_fn(cfg: ml_collections.ConfigDict, which: str) -> str:
    """The training loss for passages, ``featurize.query_output_fn`` for queries."""
    return TRAIN_OUTPUT_FN if which == CORPUS else str(cfg.featurize.query_output_fn)


def make_featurizer(
    cfg: ml_collections.ConfigDict,
    ckpt: Checkpoint,
    passages: Passages,
    corrected: bool,
    settings: correction.CorrectionSettings | None = None,
    progress: bool = True,
    projector: Projector | None = None,
) -> Featurizer:
    """The projection (``featurize`` section, or ``projector``) and, when ``corrected``, the
    correction of this run: V estimated over the passages (``v_estimate``).

    With ``settings`` (a store's recorded ``correction_settings``) the estimate they name is
    rebuilt from its recorded sample, and must give the recorded key.
    """
    projector = projector or stages.make_projector(cfg, ckpt.params)
    f = cfg.featurize
    if corrected and settings is None:
        if correction_source(cfg) != "estimate":
            stages.correction_kind(cfg, True)  # The StageError that names the fix.
        est, record = v_estimate(cfg, ckpt, passages, progress=progress)
        settings = correction.estimate_settings(
            est,
            record,
            featurize_eps=float(f.eps),
            v_floor=float(f.v_floor),
            drop_unmoved=bool(f.get("drop_unmoved", False)),
        )
    elif corrected:
        sample = v_estimate_lib.EstimateSample.from_dict(settings.estimate or {})
        est, record = v_estimate(cfg, ckpt, passages, sample, progress)
        if record["key"] != settings.estimate.get("key"):
            raise CheckpointRunError(
                f"the store's V estimate is {settings.estimate.get('key')}, but this checkpoint "
                f"and corpus give {record['key']}; run the pipeline again for this checkpoint"
            )
    else:
        settings = None
    precond = None
    fingerprint = "none"
    if settings is not None:
        precond = correction.preconditioner_for(settings, est, ckpt.params)
        fingerprint = stages.optimizer_fingerprint(None, settings)
    mesh = sharding.mesh_from_config(cfg.mesh, scope=cfg.mesh.featurize_scope)
    rules = sharding.rules_from_config(cfg.mesh, ckpt.imported.cfg_model)
    shardings = sharding.param_shardings(ckpt.params, mesh, rules)
    return Featurizer(projector, settings, precond, fingerprint, mesh, shardings)


# Feature kernels built in this process, by what they compute: a rerun (new queries, another
# pass of the pipeline) reuses the compiled kernel.
_FEATURE_FNS: dict[str, Any] = {}


def feature_fn(featurizer: Featurizer, ckpt: Checkpoint, output: str) -> Any:
    """The feature kernel of ``output`` on the featurizer's mesh (memoized per checkpoint,
    projection, correction, output function and mesh)."""
    s = featurizer.settings
    key = stages.config_key(
        ckpt.fingerprint,
        featurizer.projector.config(),
        s.to_dict() if s else None,
        output,
        str(featurizer.mesh),
    )
    if key not in _FEATURE_FNS:
        _FEATURE_FNS[key] = make_mesh_feature_fn(
            ckpt.apply_fn,
            output,
            featurizer.projector,
            featurizer.preconditioner,
            featurizer.mesh,
            featurizer.shardings,
        )
    return _FEATURE_FNS[key]


def queries_tag(cfg: ml_collections.ConfigDict) -> str:
    """The store tag of the queries file: a hash of its path, size, modification time and the
    ``queries`` section, so another queries file gets its own query store (and R)."""
    path = str(cfg.queries.path)
    section = {
        k: v
        for k, v in cfg.queries.to_dict().items()
        # Fields added after runs were made count only when set, so those runs' stores and
        # fits keep their tags (Attributor.from_checkpoint finds them).
        if _ADDED_QUERY_FIELDS.get(k, object()) != v
    }
    key = stages.config_key(os.path.abspath(path), _stamp(path), section)
    return f"q{key[:8]}"


# queries fields -> their defaults (configs/hf_gpt2.py), left out of queries_tag when unset.
_ADDED_QUERY_FIELDS = {"format": "auto", "prompt_index": 0}


def featurize(
    cfg: ml_collections.ConfigDict,
    ckpt: Checkpoint,
    featurizer: Featurizer,
    which: str,
    examples: Examples,
    extra: dict,
    progress: bool = True,
    tag: str = "",
) -> store_lib.VectorStore:
    """``examples`` into ``stores/<which>-<correction>[-<tag>]`` (``stages.store_path``); a
    finished store is reused, a partial one resumes, one made another way is refused."""
    meta = featurizer.meta(cfg, ckpt, which, len(examples), extra)
    path = stages.store_path(cfg, which, featurizer.corrected, tag)
    vs = store_lib.VectorStore.create(path, meta)
    if not vs.is_complete:
        stages.CACHE_MISSES["featurize"] += 1
        fn = feature_fn(featurizer, ckpt, meta.output_fn)
        featurize_into_store(
            fn,
            sharding.place(ckpt.params, fn.shardings),
            examples,
            vs,
            int(cfg.featurize.batch_size),
            skip_bad_examples=bool(cfg.featurize.skip_bad_examples),
            progress=progress,
            desc=f"featurize {which}",
            finalize=True,
        )
    return store_lib.VectorStore.open(vs.path)


# ----- scoring and results ----------------------------------------------------------------------


def check_config(cfg: ml_collections.ConfigDict) -> None:
    """Refuses settings this pipeline cannot honour, before any work."""
    correction_source(cfg)
    if cfg.hessian.eval_source != "task":
        raise CheckpointRunError(
            f"hessian.eval_source = {cfg.hessian.eval_source!r}: here the queries file is the "
            "R_eval source; set hessian.eval_source = 'task'"
        )
    if score.get_preset(str(cfg.score.preset)).corrected:
        stages.correction_kind(cfg, True)  # source "none": the StageError that names the fix.


def results_path(cfg: ml_collections.ConfigDict, name: str) -> str:
    """``results/<name>`` in the run directory."""
    return stages.path(cfg, "results", name)


def _rows(
    queries: Sequence[FileQuery],
    ids: np.ndarray,
    scores: np.ndarray,
    passages: Passages,
    opponents: tuple[np.ndarray, np.ndarray] | None = None,
) -> list[dict]:
    rows = []
    for i, (q, r, s) in enumerate(zip(queries, ids, scores, strict=True)):
        found = passages.texts.rows(r)
        row = {
            "query_id": q.query_id,
            "prompt": q.prompt,
            "target": q.target,
            "proponent_ids": [pid for pid, _ in found],
            "rows": [int(x) for x in r],
            "scores": [float(x) for x in s],
            "texts": [text for _, text in found],
        }
        if opponents is not None:
            o_rows, o_scores = opponents[0][i], opponents[1][i]
            row["opponent_ids"] = [pid for pid, _ in passages.texts.rows(o_rows)]
            row["opponent_rows"] = [int(x) for x in o_rows]
            row["opponent_scores"] = [float(x) for x in o_scores]
        rows.append(row)
    return rows


def proponents_table(rows: Sequence[dict], k: int = 10, width: int = 110) -> str:
    """A Markdown table per query: rank, passage id, score and text (cut to ``width``)."""
    parts = []
    for row in rows:
        lines = [
            f"### {row['prompt']} -> {row['target']}",
            "",
            "| rank | passage | score | text |",
            "|---|---|---|---|",
        ]
        for rank, (pid, s, text) in enumerate(
            zip(row["proponent_ids"][:k], row["scores"][:k], row["texts"][:k], strict=True), 1
        ):
            text = " ".join(text.split()).replace("|", "\\|")
            text = text if len(text) <= width else text[: width - 3] + "..."
            lines.append(f"| {rank} | {pid} | {s:+.4f} | {text} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def stage_score(
    cfg: ml_collections.ConfigDict,
    queries: Sequence[FileQuery],
    passages: Passages,
    progress: bool = True,
) -> list[dict]:
    """Scores the queries with ``score.preset`` and writes the results (module docstring);
    reuses them while the stores, the fit and the score section are the same.

    Release queries (``query_format``) get their opponents too, the k most negative scores
    (``release.score_with_opponents``: the same store pass as the proponents), in the rows
    (``opponent_ids`` / ``opponent_rows`` / ``opponent_scores``) and ``proponents.npz``.
    """
    preset = str(cfg.score.preset)
    inputs = stages.score_inputs(cfg, preset, CORPUS, query_tag=queries_tag(cfg))
    fit_key = inputs.fit.provenance.get("config_key") if inputs.fit is not None else None
    opponents = query_format(cfg) == "release"
    key = stages.config_key(
        stages.config_section(cfg, "score"),
        inputs.train_store.meta.to_dict(),
        inputs.query_store.meta.to_dict(),
        fit_key,
        passages.key,
        # The queries file itself (path and stamp): a file edited in place with as many rows
        # gives a query store with the same metadata, so the metadata alone would reuse
        # proponents of the old queries.
        queries_tag(cfg),
        *(["opponents"] if opponents else []),
    )
    out = results_path(cfg, "proponents.jsonl")
    record = results_path(cfg, "proponents.key")
    if os.path.isfile(out) and os.path.isfile(record):
        with open(record, encoding="utf-8") as f:
            if f.read().strip() == key:
                with open(out, encoding="utf-8") as g:
                    return [json.loads(line) for line in g]
    stages.CACHE_MISSES["score"] += 1
    k = min(int(cfg.score.top_k), inputs.train_store.meta.num_examples)
    kwargs = {
        "rows_per_step": int(cfg.score.chunk_rows),
        "progress": progress,
        "mesh": sharding.mesh_from_config(cfg.mesh),
    }
    arrays: dict[str, np.ndarray] = {}
    opp = None
    if opponents:
        ids, scores, *opp = release.score_with_opponents(
            inputs.train_store, inputs.query_store, preset, inputs.fit, k, **kwargs
        )
        arrays["opponent_rows"] = np.asarray(opp[0], np.int64)
        arrays["opponent_scores"] = np.asarray(opp[1], np.float32)
    else:
        ids, scores = score.score_preset(
            inputs.train_store, inputs.query_store, preset, inputs.fit, k, **kwargs
        )
    rows = _rows(queries, ids, scores, passages, None if opp is None else (opp[0], opp[1]))
    atomic_write(
        results_path(cfg, "proponents.npz"),
        lambda f: np.savez(
            f,
            query_ids=np.array([q.query_id for q in queries]),
            rows=np.asarray(ids, np.int64),
            scores=np.asarray(scores, np.float32),
            **arrays,
        ),
        binary=True,
    )
    write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    write_text(results_path(cfg, "proponents.md"), proponents_table(rows))
    save_config(cfg, results_path(cfg, "config.json"))
    write_text(record, key + "\n")
    return rows


# ----- the release's task -----------------------------------------------------------------------


def release_results_path(cfg: ml_collections.ConfigDict, suffix: str = ".release.jsonl.gz") -> str:
    """``results/<score.preset><suffix>``: the release results file, or (``suffix``
    ``".release_metrics.json"``) its metrics, beside it."""
    return results_path(cfg, f"{cfg.score.preset}{suffix}")


def _triples_readable(cfg: ml_collections.ConfigDict) -> bool:
    """Whether the corpus is the release's shards (jsonl rows keyed ``sentence_id``), whose
    ``fact_triples`` then add to the ground truth; another corpus has ``trex_sentences`` only."""
    c = cfg.corpus
    fmt = detect_format(str(c.path)) if str(c.format) == "auto" else str(c.format)
    return fmt == "jsonl" and str(c.id_field) == "sentence_id"


def release_ground_truth(
    cfg: ml_collections.ConfigDict, facts: Sequence[release.ReleaseQuery]
) -> tuple[list[set[str]], str]:
    """``(sentence ids per fact, source)``: each fact's ``trex_sentences``, plus, for the
    release's corpus shards (``_triples_readable``), the sentences whose ``fact_triples`` state
    it (as ``release.release_task`` counts them). The shards are streamed; only matches are
    kept. ``source`` names what was used."""
    truth = [set(f.trex_sentences) for f in facts]
    if not _triples_readable(cfg):
        return truth, "trex_sentences"
    index: dict[tuple[str, str, str], list[int]] = {}
    for i, f in enumerate(facts):
        index.setdefault((f.entity0, f.relation, f.entity1), []).append(i)
    try:
        for sentence in release.read_corpus_shards(str(cfg.corpus.path)):
            for triple in sentence.fact_triples:
                for i in index.get(triple, ()):
                    truth[i].add(sentence.sentence_id)
    except release.ReleaseError as e:
        raise CheckpointRunError(
            f"{e} (corpus.path = {cfg.corpus.path!r} read as the release's corpus shards for "
            "the ground truth: fix that line)"
        ) from None
    return truth, "trex_sentences+fact_triples"


def truth_rows(passages: Passages, truth: Sequence[set[str]]) -> list[set[int]]:
    """Per query the store rows of the passages of its ground-truth sentences (a sentence
    longer than a row is several passages ``"<sentence_id>:<k>"``, every one of them counted);
    the passage ids are streamed, only the asked-for rows kept."""
    wanted = set().union(*truth) if truth else set()
    rows_of: dict[str, list[int]] = {}
    for row, pid in passages.texts.iter_ids():
        doc = passage_doc_id(pid)
        if doc in wanted:
            rows_of.setdefault(doc, []).append(row)
    return [{r for s in t for r in rows_of.get(s, ())} for t in truth]


def model_answers(
    ckpt: Checkpoint, examples: Examples, batch_size: int
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``(answers, confidences, correct)`` per query: the checkpoint's own greedy answer at
    the target positions (``model.greedy_answer``, teacher-forced, so it is greedy decoding
    while the answer agrees with the target), decoded; exp of its summed log-probability; and
    whether it is the target. One forward pass per batch, on the columns queries use."""
    tokens, weights = np.asarray(examples.tokens_NxT), np.asarray(examples.weights_NxT)
    used = np.flatnonzero(weights.any(axis=0))
    width = int(used[-1]) + 1 if used.size else tokens.shape[1]  # causal: padding after is moot
    tokens, weights = tokens[:, :width], weights[:, :width]
    if "fn" not in _GREEDY:
        _GREEDY["fn"] = jax.jit(model_lib.greedy_answer, static_argnums=0)
    fn = _GREEDY["fn"]
    n, b = len(tokens), max(1, min(int(batch_size), len(tokens)))
    preds, logps = [], []
    for a in range(0, n, b):
        t, w = tokens[a : a + b], weights[a : a + b]
        pad = b - len(t)  # The last batch padded to the others' shape: one compilation.
        if pad:
            t = np.concatenate([t, np.repeat(t[-1:], pad, axis=0)])
            w = np.concatenate([w, np.zeros((pad, width), w.dtype)])
        pred, logp = fn(ckpt.apply_fn, ckpt.params, t, w)
        preds.append(np.asarray(pred)[: b - pad])
        logps.append(np.asarray(logp)[: b - pad])
    pred_NxT, logp_N = np.concatenate(preds), np.concatenate(logps)
    mask = weights > 0
    answers = [ckpt.tokenizer.decode(pred_NxT[i][mask[i]].tolist()).strip() for i in range(n)]
    correct = np.array([np.array_equal(pred_NxT[i][mask[i]], tokens[i][mask[i]]) for i in range(n)])
    return answers, np.exp(logp_N.astype(np.float64)), correct


# The jitted greedy_answer (built once per process: the apply function is a static argument).
_GREEDY: dict[str, Any] = {}


def _mean(values: Sequence[float | None]) -> dict[str, float | int | None]:
    """``metrics.mean_se`` of the defined values (None: a query without ground truth)."""
    stats = metrics.mean_se(np.array([np.nan if v is None else v for v in values], np.float64))
    return {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in stats.items()}


def release_table(summary: dict) -> str:
    """The release task's metrics as a small Markdown table (printed by ``run``)."""
    lines = [
        f"release task: {summary['n_queries']} queries, {summary['n_with_ground_truth']} with "
        f"ground truth in the corpus ({summary['ground_truth']}); preset {summary['preset']}",
        "",
        "| metric | mean | se | n |",
        "|---|---|---|---|",
    ]
    for name, label in (("mrr", "MRR"), (f"recall@{RECALL_AT}", f"Recall@{RECALL_AT}")):
        m = summary[name]
        cell = [("-" if m[k] is None else f"{m[k]:.4f}") for k in ("mean", "se")]
        lines.append(f"| {label} | {cell[0]} | {cell[1]} | {m['n']} |")
    return "\n".join(lines) + "\n"


def stage_release(
    cfg: ml_collections.ConfigDict,
    queries: Sequence[ReleaseFileQuery],
    passages: Passages,
    ckpt: Checkpoint,
    query_examples: Examples,
) -> dict:
    """The release's task evaluated: ``release_results_path`` (release results schema) and
    its ``.release_metrics.json``, from ``stage_score``'s proponents and opponents; reused
    while the scores, the queries and the corpus are the same.

    Each record has the fact's ``fact_id`` and ``relation``, ``proponent_correct`` (the
    proponent's sentence is in the fact's ground truth, ``release_ground_truth``), the
    model's own answer, and in ``extra`` (as E1's files) ``entity0`` / ``entity1`` and
    ``metrics`` = the query's ``mrr`` (within the top ``score.top_k``) and ``recall@10``
    (None without ground truth in the corpus: left out of the means). Proponent and opponent
    ids are the passages' ``sentence_id`` values (``corpus_files.passage_doc_id``).

    Returns the metrics summary (the JSON file's content).
    """
    with open(results_path(cfg, "proponents.key"), encoding="utf-8") as f:
        score_key = f.read().strip()
    key = stages.config_key(
        "release", RELEASE_VERSION, score_key, queries_tag(cfg), passages.key, RECALL_AT
    )
    out = release_results_path(cfg)
    summary_file = release_results_path(cfg, ".release_metrics.json")
    record = release_results_path(cfg, ".release.key")
    if all(os.path.isfile(p) for p in (out, summary_file, record)):
        with open(record, encoding="utf-8") as f:
            if f.read().strip() == key:
                with open(summary_file, encoding="utf-8") as g:
                    return json.load(g)
    stages.CACHE_MISSES["release"] += 1
    with np.load(results_path(cfg, "proponents.npz")) as z:
        ids, scores = z["rows"], z["scores"]
        opp_ids, opp_scores = z["opponent_rows"], z["opponent_scores"]
    facts = [q.fact for q in queries]
    truth, source = release_ground_truth(cfg, facts)
    gt_rows = truth_rows(passages, truth)
    # Texts and sentence ids of the rows the records name, read from the passage file.
    named = np.unique(np.concatenate([ids.ravel(), opp_ids.ravel()]))
    named = named[named >= 0]
    found = passages.texts.rows(named)
    texts = {int(r): text for r, (_, text) in zip(named, found, strict=True)}
    names = {int(r): passage_doc_id(pid) for r, (pid, _) in zip(named, found, strict=True)}
    k = ids.shape[1]
    per = metrics.fact_tracing_metrics(ids, gt_rows, mrr_k=k, at_k=RECALL_AT)
    has = [bool(g) for g in gt_rows]
    per_query = [
        {name: (float(per[name][i]) if has[i] else None) for name in ("mrr", f"recall@{RECALL_AT}")}
        for i in range(len(queries))
    ]
    answers, confidence, correct = model_answers(
        ckpt, query_examples, int(cfg.featurize.batch_size)
    )
    records = release.results_from_run(
        queries,
        ids,
        scores,
        texts,
        opp_ids_QxK=opp_ids,
        opp_scores_QxK=opp_scores,
        ground_truth=gt_rows,
        example_names=names,
        model_correct=correct,
        model_confidence=confidence,
        model_prediction=answers,
    )
    for q, rec, m in zip(queries, records, per_query, strict=True):
        rec.fact_id, rec.relation = q.fact.fact_id, q.fact.relation
        rec.extra["entity0"], rec.extra["entity1"] = q.fact.entity0, q.fact.entity1
        rec.extra["metrics"] = m
    release.write_results(out, records)
    summary = {
        "preset": str(cfg.score.preset),
        "results": os.path.basename(out),
        "ground_truth": source,
        "n_queries": len(queries),
        "n_with_ground_truth": int(sum(has)),
        "top_k": int(k),
        "model_accuracy": float(np.mean(correct)),
        **{name: _mean([m[name] for m in per_query]) for name in per_query[0]},
        "per_query": [
            {"fact_id": q.query_id, **m, "ground_truth_sentences": sorted(t)}
            for q, m, t in zip(queries, per_query, truth, strict=True)
        ],
    }
    write_json(summary_file, summary)
    write_text(record, key + "\n")
    return summary


# ----- the pipeline -----------------------------------------------------------------------------


def run(cfg: ml_collections.ConfigDict, progress: bool = True) -> dict:
    """The whole pipeline (module docstring) on ``cfg``; every step resumes or is reused.

    Returns ``{"rows": proponents rows, "path": proponents.jsonl, "stores": {set: path},
    "hessian": fit path or None, "passages": N}``, and for release queries ``"release"`` (the
    metrics summary of ``stage_release``) and ``"release_path"`` (its results file).
    """
    check_config(cfg)
    ckpt = load(cfg)
    queries = load_queries(cfg)
    q_examples = query_encoder(cfg, ckpt)(
        [q.prompt for q in queries], [q.target for q in queries], [q.where for q in queries]
    )
    passages = stage_passages(cfg, ckpt, progress)
    spec = score.get_preset(str(cfg.score.preset))
    featurizer = make_featurizer(cfg, ckpt, passages, spec.corrected, progress=progress)
    # step_influence scores raw query gradients against corrected passages.
    query_featurizer = featurizer
    if spec.query_side_corrected != featurizer.corrected:
        query_featurizer = dataclasses.replace(
            featurizer, settings=None, preconditioner=None, optimizer_fingerprint="none"
        )
    source = {"checkpoint_dir": os.path.abspath(str(cfg.model.checkpoint_dir))}
    stores = {
        CORPUS: featurize(
            cfg, ckpt, featurizer, CORPUS, passages.examples,
            {**source, "passages_key": passages.key}, progress,
        ),
        QUERIES: featurize(
            cfg, ckpt, query_featurizer, QUERIES, q_examples,
            {**source, "queries": os.path.abspath(str(cfg.queries.path))},
            progress, queries_tag(cfg),
        ),
    }  # fmt: skip
    fit_path = None
    if score.get_preset(str(cfg.score.preset)).hessian != "none":
        fit_path = stages.stage_hessian(
            cfg, CORPUS, featurizer.corrected, query_tag=queries_tag(cfg)
        )
    rows = stage_score(cfg, queries, passages, progress)
    out = {
        "rows": rows,
        "path": results_path(cfg, "proponents.jsonl"),
        "stores": {k: v.path for k, v in stores.items()},
        "hessian": fit_path,
        "passages": len(passages.examples),
    }
    if query_format(cfg) == "release":
        out["release"] = stage_release(cfg, queries, passages, ckpt, q_examples)
        out["release_path"] = release_results_path(cfg)
        if progress:  # What `trackstar attribute` shows of the evaluation.
            print(release_table(out["release"]))
            print(f"release results -> {out['release_path']}")
    return out


@dataclasses.dataclass
class AttributorParts:
    """What ``trackstar.Attributor`` needs for a run of this pipeline (``attributor_parts``)."""

    checkpoint: Checkpoint
    train_store: store_lib.VectorStore
    fit: hessian.HessianFit | None
    featurizer: Featurizer
    output_fn: str
    query_dtype: str
    encode_queries: Callable[..., Examples]
    passage_ids: PassageRows
    texts: PassageRows


def attributor_parts(cfg: ml_collections.ConfigDict, preset: str | None = None) -> AttributorParts:
    """The checkpoint, the finished corpus store and fit of a run of ``run(cfg)``, and how its
    queries were featurized (projection and correction from the store's own metadata).

    Raises:
      StageError: the run's stores or fit are not there yet (run ``trackstar attribute``).
    """
    preset = preset or str(cfg.score.preset)
    spec = score.get_preset(preset)
    ckpt = load(cfg)
    path = stages.store_path(cfg, CORPUS, spec.corrected)
    try:
        train_store = stages.open_store(path)
    except store_lib.StoreError as e:
        raise stages.StageError(
            f"the corpus store of this run is not ready ({' '.join(str(e).split())}); run the "
            "pipeline first: trackstar attribute --config ... (same overrides)"
        ) from None
    key = train_store.meta.extra.get("passages_key")
    directory = stages.path(cfg, "passages", str(key))
    if not os.path.isfile(os.path.join(directory, "manifest.json")):
        raise stages.StageError(
            f"the passages {directory} of the corpus store are missing; run trackstar attribute"
        )
    passages = stage_passages(cfg, ckpt, progress=False)
    if passages.key != key:
        raise CheckpointRunError(
            f"the corpus store was made from passages {key}, but this config gives {passages.key}"
            " (another corpus file, tokenizer or model.max_len); use the run's config"
        )
    meta = train_store.meta
    settings = None
    if meta.correction != "none":
        settings = correction.CorrectionSettings(**meta.correction_settings)
    featurizer = make_featurizer(
        cfg,
        ckpt,
        passages,
        spec.corrected,
        settings,
        progress=False,
        projector=_store_projector(ckpt, meta),
    )
    fit = None
    if spec.hessian != "none":
        fit_path = stages.hessian_path(cfg, CORPUS, spec.corrected, "", queries_tag(cfg))
        if not os.path.isfile(fit_path):
            raise stages.StageError(
                f"preset {preset!r} needs the Hessian fit {fit_path}; run trackstar attribute"
            )
        fit = stages.preset_fit(cfg, preset, CORPUS, train_store, "", queries_tag(cfg))
    query_meta = _query_meta(cfg, spec.query_side_corrected)
    return AttributorParts(
        checkpoint=ckpt,
        train_store=train_store,
        fit=fit,
        featurizer=featurizer,
        output_fn=query_meta.output_fn if query_meta else output_fn(cfg, QUERIES),
        query_dtype=query_meta.dtype if query_meta else str(cfg.featurize.dtype),
        encode_queries=query_encoder(cfg, ckpt),
        passage_ids=PassageRows(passages.texts, "id"),
        texts=PassageRows(passages.texts, "text"),
    )


def _store_projector(ckpt: Checkpoint, meta: store_lib.StoreMeta) -> Projector:

    return projection_lib.from_meta(ckpt.params, meta.projection)


def _query_meta(cfg, corrected: bool) -> store_lib.StoreMeta | None:
    try:
        return stages.open_store(stages.store_path(cfg, QUERIES, corrected, queries_tag(cfg))).meta
    except store_lib.StoreError:
        return None


def config_for_run_dir(run_dir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The config a finished run saved (``results/config.json``) laid over the defaults of
    ``configs/hf_gpt2.py`` (when the checkout has it), with ``run_dir`` set to ``run_dir``."""
    return stages.config_for_run_dir(
        run_dir,
        saved_file=os.path.join("results", "config.json"),
        default_config="hf_gpt2.py",
        missing=(
            "so the pipeline has not finished there; run trackstar attribute --config ... first "
            "(or pass its config)"
        ),
    )
