"""The TrackStar release's file formats (PAIR-code/pretraining-tda), written and read.

The paper's release publishes three kinds of JSONL files, one JSON object per line; this module
writes the first and reads all three, streaming line by line (a ``.gz`` name is read and written
through gzip). docs/release_format.md describes every field.

**Results** (``write_results`` / ``read_results``, one ``ResultRecord`` per query):
``example_id``, ``inputs_plaintext``, ``targets_plaintext``, ``proponents`` (texts, best
first), ``proponent_ids``, ``proponent_scores``; for gradient methods ``opponents``,
``opponent_ids``, ``opponent_scores`` (the most negative scores, most negative first); for fact
queries ``fact_id``, ``relation``, ``proponent_correct`` (per proponent: does it state the
query's fact), ``frequency_bucket``, and the model's own ``model_prediction``,
``model_correct`` and ``model_confidence``. Fields the release names are kept as named; where
the release's exact name was not available to check (the bucket and the model's prediction and
confidence) this module chose the names above. Fields this module does not know are kept in
``ResultRecord.extra`` and written back unchanged, so a release file round-trips.

**Queries** (``read_release_queries``, one ``ReleaseQuery`` per fact): ``fact_id``, ``entity0``,
``relation``, ``entity1``, ``prompt0`` .. ``prompt2`` (cloze prompts; the target is
``entity1``), optional ``entity0_aliases`` / ``entity1_aliases`` (lists of strings) and
``trex_sentences`` (the ``sentence_id`` values of the corpus sentences annotated with the fact;
an entry may also be an object with a ``sentence_id``).

**Corpus shards** (``read_corpus_shards``, one ``ReleaseSentence`` per sentence):
``sentence_id``, ``text``, ``fact_triples`` (each ``[entity0, relation, entity1]`` or
``{"sub_label", "predicate_id", "obj_label"}``, as ``trackstar.world.read_trex_candidates``
reads them).

``release_task`` turns query files and shards into the project's own records
(``trackstar.world.Query`` / ``Candidate``) plus the ground truth ``fact_id -> sentence ids``.
``score_with_opponents`` gives proponents and opponents in one pass over the train store, and
``results_from_run`` builds result records from what ``stages.stage_score`` has for a run (the
model's own answers from ``stages.model_answers`` and ``model.greedy_correct``).

Every bad line raises ``ReleaseError`` naming ``path:line``, the field and what to change.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from trackstar.files import atomic_write, iter_jsonl
from trackstar.world.records import Candidate, Fact, Query

if TYPE_CHECKING:
    from trackstar.score import PresetSpec

# Where E1/E2 write each method's results file inside an experiment directory (the viewer
# reads them from there).
PROPONENTS_DIR = "proponents"


class ReleaseError(ValueError):
    """A release file (or record) that does not follow the schema; the message says the fix."""


# ----------------------------------------------------------------------------- opponents


def score_with_opponents(
    train_chunks: Any,
    query_vectors_QxD: Any,
    preset: str | PresetSpec,
    hessian_fit: Any,
    k: int,
    **score_kwargs: Any,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Top-k proponents and top-k opponents (most negative scores) per query, one store pass.

    Every preset's score is linear in the query vector: T_q(-u) = -T_q u and unit(-x) =
    -unit(x), so score(m, -q) = -score(m, q) exactly (IEEE negation commutes with products,
    sums and rounding). The opponents are therefore the proponents of the negated queries;
    both query blocks are scored together so the store is streamed once. Ties go to the lower
    example id on both sides, as ``score.top_k_scores`` does.

    Args:
      train_chunks, preset, hessian_fit, k: as ``score.score_preset``.
      query_vectors_QxD: the query vectors (an array, or a store with ``read_all``).
      **score_kwargs: passed to ``score.score_preset`` (``rows_per_step``, ``progress``,
        ``mesh``).

    Returns:
      ``(prop_ids_QxK, prop_scores_QxK, opp_ids_QxK, opp_scores_QxK)``: proponents best first;
      opponents most negative first, with their (negative) scores.
    """
    # Scoring needs JAX; reading and writing results files (the viewer) does not.
    from trackstar.score import query_array, score_preset

    q = query_array(query_vectors_QxD)
    if q.ndim != 2 or q.shape[0] == 0:
        raise ReleaseError(f"query vectors must have shape (Q, D) with Q > 0, got {q.shape}")
    n = q.shape[0]
    ids, scores = score_preset(
        train_chunks, np.concatenate([q, -q]), preset, hessian_fit, k, **score_kwargs
    )
    return ids[:n], scores[:n], ids[n:], -scores[n:]


# ----------------------------------------------------------------------------- result records


@dataclasses.dataclass
class ResultRecord:
    """One query's line of a release results file (field names as the release writes them)."""

    example_id: str | int
    """The query's id (a string in the release; this project's integer query ids pass)."""
    inputs_plaintext: str
    """The query prompt."""
    targets_plaintext: str
    """The target continuation the attribution explains."""
    proponents: list[str]
    """Texts of the top-k training examples, best (highest score) first."""
    proponent_ids: list[str | int]
    """Their ids (release: corpus ``sentence_id`` strings; this project: integer example ids)."""
    proponent_scores: list[float]
    """Their scores, descending."""
    opponents: list[str] | None = None
    """Texts of the k most negative scores, most negative first (gradient methods only)."""
    opponent_ids: list[str | int] | None = None
    """Their ids."""
    opponent_scores: list[float] | None = None
    """Their scores, ascending (most negative first)."""
    fact_id: str | int | None = None
    """The fact the query asks (fact queries)."""
    relation: str | None = None
    """The fact's relation (e.g. a Wikidata property such as ``P19``)."""
    proponent_correct: list[bool] | None = None
    """Per proponent: whether it states the query's fact (ground truth)."""
    frequency_bucket: int | None = None
    """The fact's corpus-frequency bucket (this project: its number of corpus statements)."""
    model_prediction: str | None = None
    """The model's own greedy answer at the target positions, decoded
    (``stages.model_answers``)."""
    model_correct: bool | None = None
    """Whether greedy decoding reproduces the target (``model.greedy_correct``)."""
    model_confidence: float | None = None
    """The model's probability of its own prediction (``stages.model_answers``: exp of the
    summed log-probability of its greedy tokens)."""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Fields this module does not know, kept so that a file round-trips."""

    def to_json(self) -> dict[str, Any]:
        """The JSON object of this record: known fields in order (None ones left out), then
        ``extra``."""
        out = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name != "extra" and getattr(self, f.name) is not None
        }
        clash = sorted(set(out) & set(self.extra))
        if clash:
            raise ReleaseError(f"extra fields {clash} clash with the record's own fields")
        out.update(self.extra)
        return out


# (field, required, kind) in file order; kind names the check in _check_value.
_SCHEMA: tuple[tuple[str, bool, str], ...] = (
    ("example_id", True, "id"),
    ("inputs_plaintext", True, "str"),
    ("targets_plaintext", True, "str"),
    ("proponents", True, "list[str]"),
    ("proponent_ids", True, "list[id]"),
    ("proponent_scores", True, "list[float]"),
    ("opponents", False, "list[str]"),
    ("opponent_ids", False, "list[id]"),
    ("opponent_scores", False, "list[float]"),
    ("fact_id", False, "id"),
    ("relation", False, "str"),
    ("proponent_correct", False, "list[bool]"),
    ("frequency_bucket", False, "int"),
    ("model_prediction", False, "str"),
    ("model_correct", False, "bool"),
    ("model_confidence", False, "float"),
)
_KNOWN = {name for name, _, _ in _SCHEMA}
_WANT = {
    "id": "a string or an integer",
    "str": "a string",
    "int": "an integer",
    "bool": "true or false",
    "float": "a finite number",
    "list[str]": "a list of strings",
    "list[id]": "a list of strings or integers",
    "list[float]": "a list of finite numbers",
    "list[bool]": "a list of true/false values",
}


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_float(x: Any) -> bool:
    # JSON has no NaN/inf; Python's json would write them as invalid tokens.
    return (_is_int(x) or isinstance(x, float)) and bool(np.isfinite(x))


_CHECKS: dict[str, Callable[[Any], bool]] = {
    "id": lambda x: isinstance(x, str) or _is_int(x),
    "str": lambda x: isinstance(x, str),
    "int": _is_int,
    "bool": lambda x: isinstance(x, bool),
    "float": _is_float,
}


def _check_value(value: Any, kind: str) -> bool:
    if kind.startswith("list["):
        inner = _CHECKS[kind[5:-1]]
        return isinstance(value, list) and all(inner(v) for v in value)
    return _CHECKS[kind](value)


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def record_from_json(row: Mapping[str, Any], where: str = "record") -> ResultRecord:
    """Checks one results object against the schema and returns its ``ResultRecord``.

    Raises ``ReleaseError`` naming ``where`` and the field: a required field missing, a value
    of the wrong type, lists of one group (proponents / opponents) of different lengths, an
    opponents group given in part, or ``proponent_correct`` not one entry per proponent.
    """
    if not isinstance(row, Mapping):
        raise ReleaseError(f"{where}: expected a JSON object, got {_type_name(row)}")
    for name, required, kind in _SCHEMA:
        if name not in row or row[name] is None:
            if required:
                raise ReleaseError(
                    f"{where}: missing required field {name!r}; every results line needs "
                    f"{', '.join(n for n, r, _ in _SCHEMA if r)}"
                )
            continue
        if not _check_value(row[name], kind):
            raise ReleaseError(
                f"{where}: field {name!r} must be {_WANT[kind]}, got {_type_name(row[name])} "
                f"{json.dumps(row[name], default=str)[:80]}; write it as {_WANT[kind]}"
            )
    for side in ("proponent", "opponent"):
        names = (f"{side}s", f"{side}_ids", f"{side}_scores")
        present = [n for n in names if row.get(n) is not None]
        if present and len(present) != 3:
            missing = [n for n in names if n not in present]
            raise ReleaseError(
                f"{where}: field {missing[0]!r} missing while {present} are given; write the "
                f"{side}s' texts, ids and scores together"
            )
        lengths = {n: len(row[n]) for n in present}
        if len(set(lengths.values())) > 1:
            raise ReleaseError(
                f"{where}: fields {names} have different lengths {lengths}; write one text, id "
                f"and score per {side}"
            )
    correct = row.get("proponent_correct")
    if correct is not None and len(correct) != len(row["proponents"]):
        raise ReleaseError(
            f"{where}: field 'proponent_correct' has {len(correct)} entries for "
            f"{len(row['proponents'])} proponents; write one per proponent"
        )
    known = {n: row[n] for n in _KNOWN if n in row and row[n] is not None}
    extra = {n: v for n, v in row.items() if n not in _KNOWN}
    return ResultRecord(**known, extra=extra)


def write_results(path: str | os.PathLike, records: Iterable[ResultRecord]) -> int:
    """Writes result records as release JSONL (gzip when ``path`` ends in ``.gz``), atomically.

    Records are checked (``record_from_json``) and written one at a time, so a generator of
    records is never held whole. Returns the number of lines written; a bad record raises
    ``ReleaseError`` naming its position and leaves any previous file in place.
    """
    path = os.fspath(path)
    count = 0

    def write(f: IO) -> None:
        if path.endswith(".gz"):
            # No timestamp and no name (the file object's is the temporary one): the same
            # records give the same bytes.
            with gzip.GzipFile(filename="", fileobj=f, mode="wb", mtime=0) as gz:
                _write_lines(gz, records, lambda line: line.encode("utf-8"))
        else:
            _write_lines(f, records, lambda line: line.encode("utf-8"))

    def _write_lines(out: IO, recs: Iterable[ResultRecord], enc: Callable[[str], bytes]) -> None:
        nonlocal count
        for i, rec in enumerate(recs):
            if not isinstance(rec, ResultRecord):
                raise ReleaseError(f"record {i}: expected a ResultRecord, got {_type_name(rec)}")
            where = f"record {i} (example_id {rec.example_id!r})"
            try:
                row = rec.to_json()
            except ReleaseError as e:
                raise ReleaseError(f"{where}: {e}") from None
            record_from_json(row, where)
            out.write(enc(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n"))
            count += 1

    atomic_write(path, write, binary=True)
    return count


def _iter_jsonl(path: str, what: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line, object)`` per non-blank line of a jsonl(.gz) file; a bad line names
    ``path:line`` (``trackstar.files.iter_jsonl``)."""
    if not os.path.isfile(path):
        raise ReleaseError(f"{what} file {path!r} does not exist")
    yield from iter_jsonl(path, ReleaseError)


def read_results(path: str | os.PathLike) -> Iterator[ResultRecord]:
    """Yields the ``ResultRecord`` of each line of a results file (``.gz`` read through gzip).

    Streaming: one line at a time. A line that breaks the schema raises ``ReleaseError``
    naming ``path:line``, the field and the fix (``record_from_json``).
    """
    path = os.fspath(path)
    for line, row in _iter_jsonl(path, "results"):
        yield record_from_json(row, f"{path}:{line}")


# ----------------------------------------------------------------------------- from a run


def results_from_run(
    queries: Sequence[Any],
    prop_ids_QxK: np.ndarray,
    prop_scores_QxK: np.ndarray,
    texts: Sequence[str] | Mapping[int, str],
    *,
    opp_ids_QxK: np.ndarray | None = None,
    opp_scores_QxK: np.ndarray | None = None,
    facts: Sequence[Fact] | None = None,
    ground_truth: Sequence[Iterable[int]] | None = None,
    example_names: Sequence[str] | Mapping[int, str] | None = None,
    model_correct: Sequence[bool] | np.ndarray | None = None,
    model_confidence: Sequence[float] | np.ndarray | None = None,
    model_prediction: Sequence[str] | None = None,
) -> list[ResultRecord]:
    """Release records of a scored run: a pure function of its arrays and world records.

    Args:
      queries: the scored queries in row order: ``trackstar.world.Query`` (fact queries: its
        ``fact_id`` and ``bucket`` are written) or any object with ``query_id``, ``prompt``,
        ``target`` (e.g. ``corpus_files.FileQuery``).
      prop_ids_QxK, prop_scores_QxK: ``score.score_preset``'s output.
      texts: the scored pool's text per example id (``stages.candidate_pool``'s texts).
      opp_ids_QxK, opp_scores_QxK: ``score_with_opponents``' opponents, if scored.
      facts: the world's facts, to name each fact query's relation.
      ground_truth: per query the example ids that state its fact (``stages.candidate_pool``'s
        ground truth); gives ``proponent_correct``.
      example_names: per example id the name written as its id (e.g. each candidate's
        ``source_id``, the T-REx ``sentence_id``); default: the integer id.
      model_correct, model_confidence, model_prediction: per query, whether greedy decoding
        gives the target (``model.greedy_correct``), and the model's own answer and its
        probability (``stages.model_answers``), if computed.

    Returns:
      One ``ResultRecord`` per query, in order.
    """
    prop_ids = np.asarray(prop_ids_QxK, np.int64)
    prop_scores = np.asarray(prop_scores_QxK, np.float64)
    n = len(queries)
    if prop_ids.ndim != 2 or prop_ids.shape != prop_scores.shape or prop_ids.shape[0] != n:
        raise ReleaseError(
            f"{n} queries, ids of shape {prop_ids.shape} and scores of shape "
            f"{prop_scores.shape} do not line up; pass the arrays score_preset returned"
        )
    if (opp_ids_QxK is None) != (opp_scores_QxK is None):
        raise ReleaseError("pass opp_ids_QxK and opp_scores_QxK together (or neither)")
    opp_ids = opp_scores = None
    if opp_ids_QxK is not None:
        opp_ids = np.asarray(opp_ids_QxK, np.int64)
        opp_scores = np.asarray(opp_scores_QxK, np.float64)
        if opp_ids.shape != opp_scores.shape or opp_ids.shape[:1] != (n,):
            raise ReleaseError(
                f"{n} queries but opponent ids {opp_ids.shape} / scores {opp_scores.shape}; "
                "pass the arrays score_with_opponents returned"
            )
    for name, per_query in (
        ("ground_truth", ground_truth),
        ("model_correct", model_correct),
        ("model_confidence", model_confidence),
        ("model_prediction", model_prediction),
    ):
        if per_query is not None and len(per_query) != n:
            raise ReleaseError(f"{name} has {len(per_query)} entries for {n} queries")
    relation_of = {f.fact_id: f.relation for f in facts} if facts is not None else {}

    def text(i: int, where: str) -> str:
        try:
            return texts[i]
        except (KeyError, IndexError):
            raise ReleaseError(
                f"{where}: example id {i} has no text; pass the texts of the pool that was scored"
            ) from None

    def name(i: int) -> str | int:
        return i if example_names is None else example_names[i]

    def filled(ids_K: np.ndarray, scores_K: np.ndarray) -> tuple[list[int], list[float]]:
        # A pool smaller than k leaves empty slots (id -1, score -inf): they are not examples.
        keep = ids_K >= 0
        return ids_K[keep].tolist(), [float(s) for s in scores_K[keep]]

    out = []
    for row, q in enumerate(queries):
        where = f"query {q.query_id!r}"
        ids, scores = filled(prop_ids[row], prop_scores[row])
        rec = ResultRecord(
            example_id=q.query_id,
            inputs_plaintext=q.prompt,
            targets_plaintext=q.target,
            proponents=[text(i, where) for i in ids],
            proponent_ids=[name(i) for i in ids],
            proponent_scores=scores,
        )
        if opp_ids is not None:
            o_ids, o_scores = filled(opp_ids[row], opp_scores[row])
            rec.opponents = [text(i, where) for i in o_ids]
            rec.opponent_ids = [name(i) for i in o_ids]
            rec.opponent_scores = o_scores
        fact_id = getattr(q, "fact_id", None)
        if fact_id is not None:
            rec.fact_id = int(fact_id)
            rec.relation = relation_of.get(int(fact_id))
            bucket = getattr(q, "bucket", None)
            rec.frequency_bucket = None if bucket is None else int(bucket)
        if ground_truth is not None:
            truth = {int(i) for i in ground_truth[row]}
            rec.proponent_correct = [i in truth for i in ids]
        if model_correct is not None:
            rec.model_correct = bool(model_correct[row])
        if model_confidence is not None:
            rec.model_confidence = float(model_confidence[row])
        if model_prediction is not None:
            rec.model_prediction = str(model_prediction[row])
        out.append(rec)
    return out


# ----------------------------------------------------------------------------- query files


@dataclasses.dataclass(frozen=True)
class ReleaseQuery:
    """One fact of a release query file."""

    fact_id: str
    """The fact's id (written as a string; an integer id is read as its decimal string)."""
    entity0: str
    """The subject."""
    relation: str
    """The relation (a Wikidata property id such as ``P19``)."""
    entity1: str
    """The object: the target every prompt asks for."""
    prompts: tuple[str, ...]
    """``prompt0``, ``prompt1``, ``prompt2`` (those present, at least ``prompt0``)."""
    entity0_aliases: tuple[str, ...] = ()
    """Other names of the subject."""
    entity1_aliases: tuple[str, ...] = ()
    """Other names of the object (answers a grader may accept)."""
    trex_sentences: tuple[str, ...] = ()
    """``sentence_id`` values of the corpus sentences annotated with this fact."""
    where: str = ""
    """``path:line`` it was read from."""


@dataclasses.dataclass(frozen=True)
class ReleaseSentence:
    """One sentence of a release corpus shard."""

    sentence_id: str
    """Its id (an integer id is read as its decimal string)."""
    text: str
    """The sentence."""
    fact_triples: tuple[tuple[str, str, str], ...]
    """The ``(entity0, relation, entity1)`` facts it states."""
    where: str = ""
    """``path:line`` it was read from."""


def _paths(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """One file, a directory (its ``*.jsonl`` / ``*.jsonl.gz`` files, sorted) or a list."""
    if isinstance(paths, str | os.PathLike):
        p = os.fspath(paths)
        if os.path.isdir(p):
            names = sorted(n for n in os.listdir(p) if n.endswith((".jsonl", ".jsonl.gz")))
            if not names:
                raise ReleaseError(f"{p} holds no *.jsonl or *.jsonl.gz files")
            return [os.path.join(p, n) for n in names]
        return [p]
    return [os.fspath(p) for p in paths]


def _str_field(row: Mapping[str, Any], name: str, where: str, *, id_like: bool = False) -> str:
    if name not in row or row[name] is None:
        raise ReleaseError(f"{where}: missing required field {name!r}")
    value = row[name]
    if id_like and _is_int(value):
        return str(value)
    if not isinstance(value, str) or not value.strip():
        want = "a non-empty string or an integer" if id_like else "a non-empty string"
        raise ReleaseError(
            f"{where}: field {name!r} must be {want}, got {_type_name(value)} "
            f"{json.dumps(value, default=str)[:80]}"
        )
    return value


def _str_list(row: Mapping[str, Any], name: str, where: str) -> tuple[str, ...]:
    value = row.get(name)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ReleaseError(f"{where}: field {name!r} must be a list of strings")
    return tuple(value)


def read_release_queries(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
) -> Iterator[ReleaseQuery]:
    """Yields the facts of release query files, line by line (``.gz`` read through gzip).

    ``paths``: a file, a directory of ``*.jsonl(.gz)`` files (sorted by name) or a list. A
    missing or mistyped field raises ``ReleaseError`` naming ``path:line`` and the field.
    """
    for path in _paths(paths):
        for line, row in _iter_jsonl(path, "query"):
            where = f"{path}:{line}"
            prompts = []
            for j in range(3):
                if row.get(f"prompt{j}") is not None:
                    prompts.append(_str_field(row, f"prompt{j}", where))
            if "prompt0" not in row:
                raise ReleaseError(f"{where}: missing required field 'prompt0' (the cloze prompt)")
            trex = row.get("trex_sentences") or []
            if not isinstance(trex, list):
                raise ReleaseError(f"{where}: field 'trex_sentences' must be a list")
            sentence_ids = []
            for s in trex:
                s = s.get("sentence_id") if isinstance(s, Mapping) else s
                if not (isinstance(s, str) or _is_int(s)):
                    raise ReleaseError(
                        f"{where}: field 'trex_sentences' holds {s!r}; each entry must be a "
                        "sentence_id (string or integer) or an object with one"
                    )
                sentence_ids.append(str(s))
            yield ReleaseQuery(
                fact_id=_str_field(row, "fact_id", where, id_like=True),
                entity0=_str_field(row, "entity0", where),
                relation=_str_field(row, "relation", where),
                entity1=_str_field(row, "entity1", where),
                prompts=tuple(prompts),
                entity0_aliases=_str_list(row, "entity0_aliases", where),
                entity1_aliases=_str_list(row, "entity1_aliases", where),
                trex_sentences=tuple(sentence_ids),
                where=where,
            )


def _triple(tr: Any, where: str) -> tuple[str, str, str]:
    if isinstance(tr, Mapping):
        key = (tr.get("sub_label"), tr.get("predicate_id"), tr.get("obj_label"))
    elif isinstance(tr, list) and len(tr) == 3:
        key = tuple(tr)
    else:
        key = None
    if key is None or not all(isinstance(x, str) for x in key):
        raise ReleaseError(
            f"{where}: malformed entry {json.dumps(tr, default=str)[:80]} of field "
            "'fact_triples'; write [entity0, relation, entity1] or "
            '{"sub_label", "predicate_id", "obj_label"} (strings)'
        )
    return key  # type: ignore[return-value]


def read_corpus_shards(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
) -> Iterator[ReleaseSentence]:
    """Yields the sentences of release corpus shards, line by line (``.gz`` through gzip).

    ``paths``: a shard, a directory of ``*.jsonl(.gz)`` shards (sorted by name) or a list.
    A missing ``sentence_id`` / ``text``, an empty text or a malformed triple raises
    ``ReleaseError`` naming ``path:line`` and the field.
    """
    for path in _paths(paths):
        for line, row in _iter_jsonl(path, "corpus shard"):
            where = f"{path}:{line}"
            triples = row.get("fact_triples") or []
            if not isinstance(triples, list):
                raise ReleaseError(f"{where}: field 'fact_triples' must be a list of triples")
            yield ReleaseSentence(
                sentence_id=_str_field(row, "sentence_id", where, id_like=True),
                text=_str_field(row, "text", where),
                fact_triples=tuple(_triple(t, where) for t in triples),
                where=where,
            )


@dataclasses.dataclass(frozen=True)
class ReleaseTask:
    """Release queries and corpus as the project's records.

    ``queries[i]`` asks ``fact_names[i]`` (its ``fact_id`` is ``i``; ``bucket`` is 0, the
    release's files carrying no count); ``candidates[j]`` is the j-th sentence read
    (``cand_id`` j, ``source_id`` its ``sentence_id``, ``fact_ids`` the queried facts its
    triples state); ``ground_truth`` maps each release ``fact_id`` to the ``sentence_id``
    values that state it: its ``trex_sentences`` plus the sentences whose triples match.
    """

    queries: tuple[Query, ...]
    candidates: tuple[Candidate, ...]
    ground_truth: dict[str, set[str]]
    fact_names: tuple[str, ...]


def release_task(
    query_paths: str | os.PathLike | Iterable[str | os.PathLike],
    shard_paths: str | os.PathLike | Iterable[str | os.PathLike],
    prompt_index: int = 0,
) -> ReleaseTask:
    """Reads release query files and corpus shards into ``ReleaseTask`` (held whole: the
    records are what a world or a candidate store is built from).

    Each fact gives one query, ``prompt{prompt_index}`` asking for ``entity1``; a fact
    without that prompt is an error. A query's ``candidate_ids`` are the candidates of its
    ground-truth sentences. Duplicate ``fact_id`` or ``sentence_id`` values are errors.
    """
    facts = list(read_release_queries(query_paths))
    if not facts:
        raise ReleaseError("the query files hold no facts")
    index: dict[tuple[str, str, str], int] = {}
    seen_ids: dict[str, str] = {}
    for i, f in enumerate(facts):
        if f.fact_id in seen_ids:
            raise ReleaseError(
                f"{f.where}: fact_id {f.fact_id!r} already used at {seen_ids[f.fact_id]}"
            )
        seen_ids[f.fact_id] = f.where
        if prompt_index >= len(f.prompts):
            raise ReleaseError(f"{f.where}: no field 'prompt{prompt_index}'; pick another index")
        index.setdefault((f.entity0, f.relation, f.entity1), i)
    truth: dict[str, set[str]] = {f.fact_id: set(f.trex_sentences) for f in facts}
    # A sentence the query file names states the fact even when its triples do not say so.
    named: dict[str, set[int]] = {}
    for i, f in enumerate(facts):
        for s in f.trex_sentences:
            named.setdefault(s, set()).add(i)
    candidates = []
    cand_of: dict[str, int] = {}
    for j, s in enumerate(read_corpus_shards(shard_paths)):
        if s.sentence_id in cand_of:
            raise ReleaseError(f"{s.where}: sentence_id {s.sentence_id!r} appears twice")
        cand_of[s.sentence_id] = j
        stated = sorted(
            {index[t] for t in s.fact_triples if t in index} | named.get(s.sentence_id, set())
        )
        for i in stated:
            truth[facts[i].fact_id].add(s.sentence_id)
        candidates.append(
            Candidate(j, s.text, tuple(stated), "fact" if stated else "distractor", s.sentence_id)
        )
    queries = tuple(
        Query(
            query_id=i,
            prompt=f.prompts[prompt_index],
            target=f.entity1,
            fact_id=i,
            bucket=0,
            candidate_ids=tuple(sorted(cand_of[s] for s in truth[f.fact_id] if s in cand_of)),
            split="task",
        )
        for i, f in enumerate(facts)
    )
    return ReleaseTask(queries, tuple(candidates), truth, tuple(f.fact_id for f in facts))
