"""Candidate corpora and queries from files: streamed reading, sentence passages, packed examples.

A corpus too large for a world file is read from disk in batches and never held whole:

- ``read_documents`` yields batches of ``SourceDocument`` from a jsonl file, a parquet file
  (``pyarrow.parquet`` ``iter_batches``), a directory of parquet or jsonl files, or a directory
  written by ``datasets.Dataset.save_to_disk`` (its arrow files read with pyarrow directly;
  ``datasets`` itself is not needed). Field names are configurable (``CorpusSource``).
- ``document_passages`` cuts a document longer than the context into passages at sentence
  boundaries: greedy, as many whole sentences as fit ``max_len`` tokens with BOS, the next
  passage starting ``overlap_sentences`` sentences before the previous one ended (the overlap
  is counted in *sentences*). A single sentence longer than the context is cut at token
  boundaries, without overlap. Passage ids are stable: ``"<doc id>:<k>"`` for the k-th passage
  (from 0) of the document, so they depend only on the document, tokenizer, ``max_len`` and
  overlap, never on what else the corpus holds.
- ``iter_packed`` tokenizes and packs the passages chunk by chunk (``PackedChunk``: the
  ``tokens_NxT`` / ``weights_NxT`` arrays of ``trackstar.data.encode_texts``, one passage a row),
  optionally writing each passage's id and text beside the store as it goes; memory stays flat
  in the corpus size (one document batch and one chunk at a time).
- ``write_passages`` writes the passage texts only (``PassageFile``: jsonl rows
  ``{"id", "text"}`` plus a ``.offsets`` index of int64 byte offsets), so the number of
  passages is known before featurizing and ``PassageFile.iter_chunks(start=c)`` resumes the
  packed stream at any chunk; ``PassageFile.rows`` reads given rows back for display.
- ``read_queries`` reads queries from jsonl rows with a prompt and a target: ``prompt`` /
  ``target``, or the TrackStar release's ``inputs_plaintext`` / ``targets_plaintext``;
  ``detect_query_format`` tells those from the release's query files (``fact_id``, ``entity1``,
  ``prompt0``: ``trackstar.release.read_release_queries`` reads them).

jsonl files may be gzipped (``.jsonl.gz``, as the release's corpus shards are): a directory's
``*.jsonl.gz`` files are read with its ``*.jsonl`` ones.

Every bad input row raises ``CorpusFileError`` naming ``path:line`` (jsonl) or ``path:row N``
(parquet / arrow rows, counted from 1).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from trackstar.files import iter_jsonl
from trackstar.tokenizer import BOS, PAD

FORMATS = ("jsonl", "parquet", "datasets")
# Field names accepted for a query's prompt and target, in order of preference.
PROMPT_FIELDS = ("prompt", "inputs_plaintext")
TARGET_FIELDS = ("target", "targets_plaintext")
# The fields that mark a row of the release's query files (docs/release_format.md).
RELEASE_QUERY_FIELDS = ("fact_id", "entity1", "prompt0")
# Names of jsonl files in a directory (gzipped ones are read through gzip by iter_jsonl).
JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz")

_OFFSETS_SUFFIX = ".offsets"
# A sentence ends at a run of . ! ? (closing quotes and brackets included) followed by
# whitespace or the end of the text; a blank line (paragraph break) ends one too.
_SENTENCE_END = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*(?=\s|$)|\n[ \t\r]*\n")


class CorpusFileError(ValueError):
    """A corpus or query file that cannot be read as asked; the message names the file (row)."""


# ----- reading documents ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CorpusSource:
    """Where the candidate documents are and which fields hold their id and text.

    ``format``: "jsonl", "parquet", "datasets" (a ``save_to_disk`` directory) or "auto" (a
    directory holding ``state.json`` is "datasets"; otherwise by the file names' ending,
    ``.parquet`` or else jsonl). A directory of parquet or jsonl files is read file by file in
    sorted order. ``id_field`` empty: a document's id is its row number in the whole source
    (from 0), which is stable only while the files are.
    """

    path: str
    format: str = "auto"
    id_field: str = "id"
    text_field: str = "text"


@dataclasses.dataclass(frozen=True)
class SourceDocument:
    """One document: its id (as a string), its text, and where it was read (``path:line``)."""

    doc_id: str
    text: str
    where: str


def detect_format(path: str) -> str:
    """The format ``CorpusSource(format="auto")`` reads ``path`` as."""
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "state.json")):
            return "datasets"
        if os.path.isfile(os.path.join(path, "dataset_dict.json")):
            raise CorpusFileError(
                f"{path} is a datasets DatasetDict; pass the directory of one split "
                f"(e.g. {os.path.join(path, 'train')})"
            )
        names = os.listdir(path)
        if any(n.endswith(".parquet") for n in names):
            return "parquet"
        if any(n.endswith(JSONL_SUFFIXES) for n in names):
            return "jsonl"
        raise CorpusFileError(f"{path} holds no state.json, *.parquet, *.jsonl or *.jsonl.gz files")
    if not os.path.isfile(path):
        raise CorpusFileError(f"corpus file {path!r} does not exist")
    return "parquet" if path.endswith(".parquet") else "jsonl"


def _files(path: str, fmt: str) -> list[str]:
    if fmt == "datasets":
        try:
            with open(os.path.join(path, "state.json"), encoding="utf-8") as fh:
                state = json.load(fh)
            names = [f["filename"] for f in state["_data_files"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CorpusFileError(
                f"{path}: not a datasets save_to_disk directory (state.json: {e})"
            ) from None
        if state.get("_indices_data_files"):
            raise CorpusFileError(
                f"{path}: the dataset has an indices mapping; save it with "
                "dataset.flatten_indices().save_to_disk(...) first"
            )
        return [os.path.join(path, n) for n in names]
    if not os.path.isdir(path):
        if not os.path.isfile(path):
            raise CorpusFileError(f"corpus file {path!r} does not exist")
        return [path]
    ends = (".parquet",) if fmt == "parquet" else JSONL_SUFFIXES
    files = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(ends))
    if not files:
        raise CorpusFileError(f"{path} holds no {' or '.join(ends)} files")
    return files


def _jsonl_rows(path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(path:line, row)`` of each JSON object of a jsonl file, read line by line."""
    for i, row in iter_jsonl(path, CorpusFileError):
        yield f"{path}:{i}", row


def _columns(names: Sequence[str], source: CorpusSource, path: str) -> list[str]:
    want = [f for f in (source.id_field, source.text_field) if f]
    missing = [f for f in want if f not in names]
    if missing:
        raise CorpusFileError(
            f"{path} has no column {missing[0]!r} (columns: {', '.join(names)}); set the "
            "corpus id_field / text_field"
        )
    return want


def _table_rows(path: str, fmt: str, source: CorpusSource, batch_rows: int):
    """``(path:row N, {field: value})`` of a parquet or arrow file, ``batch_rows`` at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if fmt == "parquet":
        pf = pq.ParquetFile(path)
        cols = _columns(pf.schema_arrow.names, source, path)
        batches: Iterable[Any] = pf.iter_batches(batch_size=batch_rows, columns=cols)
        stream = None
    else:
        # datasets writes the IPC stream format; the IPC file format is read as well.
        fh = pa.OSFile(path, "rb")
        try:
            stream = pa.ipc.open_stream(fh)
        except pa.ArrowInvalid:
            fh.close()
            stream = pa.ipc.open_file(pa.OSFile(path, "rb"))
        cols = _columns(stream.schema.names, source, path)
        batches = stream if hasattr(stream, "__iter__") else _file_batches(stream)
    n = 0
    for batch in batches:
        values = {c: batch.column(c).to_pylist() for c in cols}
        for j in range(batch.num_rows):
            n += 1
            yield f"{path}:row {n}", {c: values[c][j] for c in cols}


def _file_batches(reader: Any) -> Iterator[Any]:
    for i in range(reader.num_record_batches):
        yield reader.get_batch(i)


def _document(where: str, row: dict[str, Any], source: CorpusSource, n: int) -> SourceDocument:
    text = row.get(source.text_field)
    if text is None:
        raise CorpusFileError(f"{where}: row lacks text field {source.text_field!r}")
    if not isinstance(text, str):
        raise CorpusFileError(
            f"{where}: text field {source.text_field!r} is {type(text).__name__}, not a string"
        )
    if source.id_field:
        doc_id = row.get(source.id_field)
        if doc_id is None:
            raise CorpusFileError(f"{where}: row lacks id field {source.id_field!r}")
        if isinstance(doc_id, bool) or not isinstance(doc_id, str | int):
            raise CorpusFileError(
                f"{where}: id field {source.id_field!r} is {type(doc_id).__name__}, not a "
                "string or integer"
            )
        doc_id = str(doc_id)
        if not doc_id:
            raise CorpusFileError(f"{where}: empty id in field {source.id_field!r}")
    else:
        doc_id = str(n)
    return SourceDocument(doc_id, text, where)


def read_documents(source: CorpusSource, batch_rows: int = 1024) -> Iterator[list[SourceDocument]]:
    """Batches of at most ``batch_rows`` documents of ``source``, in file order.

    A row without the text or id field, or with a value of the wrong type, is an error naming
    its file and line (row). Nothing but the current batch is held in memory.
    """
    if batch_rows < 1:
        raise CorpusFileError(f"batch_rows must be >= 1, got {batch_rows}")
    fmt = detect_format(source.path) if source.format == "auto" else source.format
    if fmt not in FORMATS:
        raise CorpusFileError(f"corpus format must be one of {FORMATS} or 'auto', got {fmt!r}")
    batch: list[SourceDocument] = []
    n = 0
    for path in _files(source.path, fmt):
        if fmt == "jsonl":
            rows: Iterable[tuple[str, dict[str, Any]]] = _jsonl_rows(path)
        else:
            rows = _table_rows(path, fmt, source, batch_rows)
        for where, row in rows:
            batch.append(_document(where, row, source, n))
            n += 1
            if len(batch) == batch_rows:
                yield batch
                batch = []
    if batch:
        yield batch


# ----- sentence passages ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Passage:
    """A passage of a document: ``passage_id`` is ``"<doc_id>:<index>"``; ``ids`` its tokens."""

    passage_id: str
    doc_id: str
    index: int
    text: str
    ids: tuple[int, ...]


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` character spans of the sentences of ``text``, whitespace trimmed.

    A sentence ends after a run of ``.``, ``!`` or ``?`` (with closing quotes or brackets)
    followed by whitespace, or at a blank line. Abbreviations ("Dr. Smith") end a sentence too;
    that only moves a passage boundary.
    """
    spans = []
    start = 0
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    for end in [*ends, len(text)]:
        a, b = start, end
        while a < b and text[a].isspace():
            a += 1
        while b > a and text[b - 1].isspace():
            b -= 1
        if a < b:
            spans.append((a, b))
        start = end
    return spans


def _encode(tok: Tokenizer, texts: Sequence[str]) -> list[Any]:
    return tok.encode_batch(list(texts), add_special_tokens=False)


def _windows(
    text: str, ids: Sequence[int], offsets: Sequence[tuple[int, int]], budget: int
) -> list[tuple[str, tuple[int, ...]]]:
    """Tokens too many for one row as consecutive windows of ``budget`` (no overlap); each
    window's text is the span of its tokens in ``text`` (``offsets`` index into it)."""
    out = []
    for a in range(0, len(ids), budget):
        b = min(a + budget, len(ids))
        out.append((text[offsets[a][0] : offsets[b - 1][1]], tuple(ids[a:b])))
    return out


def _context_free(tok: Tokenizer) -> bool:
    # A word-level model gives each pre-token one id whatever surrounds it, so a passage's
    # tokens are the slice of its document's tokens (no re-encoding). Other models (BPE,
    # WordPiece, Unigram) may tokenize a passage's first word differently on its own.
    return type(tok.model).__name__ == "WordLevel"


def _sentence_tokens(enc: Any, spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]] | None:
    """``[start, end)`` token ranges of each sentence span in the document's encoding, or None
    when some token is not inside one sentence (then passages are encoded on their own)."""
    offsets = enc.offsets
    n = len(offsets)
    ranges = []
    k = 0
    for a, b in spans:
        t0 = k
        while k < n and offsets[k][0] < b:
            if offsets[k][0] < a or offsets[k][1] > b:
                return None
            k += 1
        ranges.append((t0, k))
    return ranges if k == n else None


def document_passages(
    doc_id: str,
    text: str,
    tok: Tokenizer,
    max_len: int,
    overlap_sentences: int = 0,
    encoding: Any = None,
) -> list[Passage]:
    """The passages of one document, each at most ``max_len`` tokens with BOS.

    A document that fits is one passage (its text stripped). A longer one is cut at sentence
    boundaries: each passage takes as many whole sentences as fit, and the next one starts
    ``overlap_sentences`` sentences before the previous one's end (at least one sentence
    further on, and never a passage ending where the previous one did). A sentence longer
    than the context on its own is cut into token windows. A passage's tokens are those of
    its text encoded on its own (a token window's: the sentence's tokens). ``encoding``: the
    document's ``tok.encode`` result when already known (saves one encoding).
    """
    if max_len < 2:
        raise CorpusFileError(f"max_len must be >= 2 (BOS and one token), got {max_len}")
    if overlap_sentences < 0:
        raise CorpusFileError(f"overlap_sentences must be >= 0, got {overlap_sentences}")
    budget = max_len - 1
    enc = encoding if encoding is not None else _encode(tok, [text])[0]
    ids = enc.ids
    if len(ids) <= budget:
        return [Passage(f"{doc_id}:0", doc_id, 0, text.strip(), tuple(ids))] if ids else []
    spans = sentence_spans(text)
    ranges = _sentence_tokens(enc, spans) if _context_free(tok) else None
    if ranges is not None:  # Sentences' tokens are slices of the document's.
        counts = [int(t1 - t0) for t0, t1 in ranges]
    else:
        encs = _encode(tok, [text[a:b] for a, b in spans])
        counts = [len(e.ids) for e in encs]

    def whole_sentences(i: int, j: int) -> tuple[str, list[int], int] | None:
        # Sentences i..j-1 as one passage, shrunk at the end while encoding them on their own
        # makes them longer than the budget; None if even sentence i alone does not fit.
        while j > i:
            ptext = text[spans[i][0] : spans[j - 1][1]]
            if ranges is not None:
                pids = ids[ranges[i][0] : ranges[j - 1][1]]
            else:
                pids = _encode(tok, [ptext])[0].ids
            if len(pids) <= budget:
                return ptext, pids, j
            j -= 1
        return None

    def cut(i: int) -> list[tuple[str, tuple[int, ...]]]:
        if ranges is not None:
            t0, t1 = ranges[i]
            return _windows(text, ids[t0:t1], enc.offsets[t0:t1], budget)
        sentence = text[spans[i][0] : spans[i][1]]
        return _windows(sentence, encs[i].ids, encs[i].offsets, budget)

    pieces: list[tuple[str, tuple[int, ...]]] = []
    i, last_end = 0, 0
    while i < len(spans):
        j, total = i + 1, counts[i]
        while j < len(spans) and total + counts[j] <= budget:
            total += counts[j]
            j += 1
        if j <= last_end:  # Overlap would only repeat part of the previous passage.
            i = last_end
            continue
        got = whole_sentences(i, j) if counts[i] <= budget else None
        if got is None:  # One sentence longer than the context: token windows.
            pieces += cut(i)
            i = last_end = i + 1
            continue
        ptext, pids, j = got
        if j <= last_end:  # Shrunk into the previous passage: go on after it instead.
            i = last_end
            continue
        if pids:
            pieces.append((ptext, tuple(pids)))
        last_end = j
        if j >= len(spans):
            break
        i = max(j - overlap_sentences, i + 1)
    return [Passage(f"{doc_id}:{k}", doc_id, k, t, p) for k, (t, p) in enumerate(pieces)]


def iter_passages(
    source: CorpusSource,
    tok: Tokenizer,
    max_len: int,
    overlap_sentences: int = 0,
    batch_rows: int = 1024,
    skip_empty: bool = False,
) -> Iterator[list[Passage]]:
    """The passages of every document of ``source``, one document batch at a time.

    Documents are encoded a batch at a time (``tok.encode_batch``); those that fit the context
    are one passage each without further work. A document with no tokens is an error naming
    its row, or with ``skip_empty`` left out (it has no passage).
    """
    for docs in read_documents(source, batch_rows):
        encs = _encode(tok, [d.text for d in docs])
        out: list[Passage] = []
        for d, e in zip(docs, encs, strict=True):
            if not e.ids:
                if skip_empty:
                    continue
                raise CorpusFileError(
                    f"{d.where}: document {d.doc_id!r} has no tokens; remove it or pass "
                    "skip_empty=True"
                )
            out += document_passages(d.doc_id, d.text, tok, max_len, overlap_sentences, e)
        yield out


# ----- packing --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PackedChunk:
    """Rows ``start .. start + len - 1`` of the packed corpus: ``[BOS] + ids``, right padded.

    ``weights_NxT`` is 1 on each passage's tokens (``trackstar.data.encode_texts``' layout);
    ``passage_ids`` and ``texts`` are the rows' passages.
    """

    start: int
    passage_ids: tuple[str, ...]
    texts: tuple[str, ...]
    tokens_NxT: np.ndarray
    weights_NxT: np.ndarray

    def __len__(self) -> int:
        return self.tokens_NxT.shape[0]

    def examples(self):
        """The chunk as ``trackstar.featurize.Examples`` (imports JAX)."""
        from trackstar.featurize import Examples

        return Examples(self.tokens_NxT, self.weights_NxT)


def pack(passages: Sequence[Passage], max_len: int, start: int = 0) -> PackedChunk:
    """One chunk of rows ``[BOS] + ids`` (``max_len`` wide), weights 1 on the passage tokens."""
    tokens_NxT = np.full((len(passages), max_len), PAD, dtype=np.int32)
    weights_NxT = np.zeros((len(passages), max_len), dtype=np.float32)
    for row, p in enumerate(passages):
        n = len(p.ids)
        if not 1 <= n <= max_len - 1:
            raise CorpusFileError(
                f"passage {p.passage_id!r} has {n} tokens; a row holds 1 to {max_len - 1}"
            )
        tokens_NxT[row, 0] = BOS
        tokens_NxT[row, 1 : 1 + n] = p.ids
        weights_NxT[row, 1 : 1 + n] = 1.0
    return PackedChunk(
        start,
        tuple(p.passage_id for p in passages),
        tuple(p.text for p in passages),
        tokens_NxT,
        weights_NxT,
    )


def _rechunk(batches: Iterable[list[Passage]], chunk_size: int) -> Iterator[list[Passage]]:
    buf: list[Passage] = []
    for b in batches:
        buf += b
        while len(buf) >= chunk_size:
            yield buf[:chunk_size]
            buf = buf[chunk_size:]
    if buf:
        yield buf


class _TextsWriter:
    """Streams ``{"id", "text"}`` rows and their byte offsets; renamed into place on close."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tag = f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._tmp = (path + tag, path + _OFFSETS_SUFFIX + tag)
        self._text = open(self._tmp[0], "wb")  # noqa: SIM115 - closed in finish / abort
        self._offsets = open(self._tmp[1], "wb")  # noqa: SIM115
        self._pos = 0
        self.rows = 0

    def write(self, passages: Sequence[Passage]) -> None:
        lines = [
            (json.dumps({"id": p.passage_id, "text": p.text}, ensure_ascii=False) + "\n").encode()
            for p in passages
        ]
        sizes = np.fromiter((len(x) for x in lines), dtype=np.int64, count=len(lines))
        offsets = self._pos + np.concatenate([[0], np.cumsum(sizes)[:-1]]) if lines else sizes
        self._text.write(b"".join(lines))
        self._offsets.write(np.asarray(offsets, dtype="<i8").tobytes())
        self._pos += int(sizes.sum())
        self.rows += len(lines)

    def finish(self) -> None:
        # The final offset (file size) lets a reader slice the last row like the others.
        self._offsets.write(np.asarray([self._pos], dtype="<i8").tobytes())
        for fh in (self._text, self._offsets):
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()
        os.replace(self._tmp[1], self.path + _OFFSETS_SUFFIX)
        os.replace(self._tmp[0], self.path)

    def abort(self) -> None:
        for fh, tmp in zip((self._text, self._offsets), self._tmp, strict=True):
            fh.close()
            if os.path.exists(tmp):
                os.remove(tmp)


def iter_packed(
    source: CorpusSource,
    tok: Tokenizer,
    max_len: int,
    chunk_size: int = 1024,
    overlap_sentences: int = 0,
    batch_rows: int = 1024,
    texts_path: str | None = None,
    skip_empty: bool = False,
) -> Iterator[PackedChunk]:
    """The corpus split into passages and packed ``chunk_size`` rows at a time.

    Row ``r`` of the whole stream is ``chunk.start + i`` (the example id in a store filled chunk
    by chunk). With ``texts_path``, each passage's id and text are written there as the chunks
    go (``PassageFile`` reads them); the file appears only once the stream is exhausted.
    """
    if chunk_size < 1:
        raise CorpusFileError(f"chunk_size must be >= 1, got {chunk_size}")
    writer = _TextsWriter(texts_path) if texts_path else None
    start = 0
    try:
        stream = iter_passages(source, tok, max_len, overlap_sentences, batch_rows, skip_empty)
        for passages in _rechunk(stream, chunk_size):
            if writer is not None:
                writer.write(passages)
            yield pack(passages, max_len, start)
            start += len(passages)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is not None:
        writer.finish()


def write_passages(
    source: CorpusSource,
    tok: Tokenizer,
    max_len: int,
    path: str,
    overlap_sentences: int = 0,
    batch_rows: int = 1024,
    skip_empty: bool = False,
) -> int:
    """Writes the passages' ids and texts to ``path`` (and ``path + ".offsets"``); returns N."""
    writer = _TextsWriter(path)
    try:
        for passages in iter_passages(
            source, tok, max_len, overlap_sentences, batch_rows, skip_empty
        ):
            writer.write(passages)
    except BaseException:
        writer.abort()
        raise
    writer.finish()
    return writer.rows


class PassageFile:
    """The passages written by ``write_passages`` / ``iter_packed(texts_path=...)``.

    ``len`` is the number of rows; ``rows(idx)`` reads ``(id, text)`` of given rows (one seek
    each, for showing proponents); ``iter_chunks`` packs the rows again chunk by chunk,
    starting at any chunk.
    """

    def __init__(self, path: str):
        self.path = path
        opath = path + _OFFSETS_SUFFIX
        if not (os.path.isfile(path) and os.path.isfile(opath)):
            raise CorpusFileError(
                f"no passage file at {path!r} (with {os.path.basename(opath)}); write it with "
                "write_passages"
            )
        self._offsets = np.memmap(opath, dtype="<i8", mode="r")
        if len(self._offsets) < 1 or int(self._offsets[-1]) != os.path.getsize(path):
            raise CorpusFileError(f"{opath} does not match {path}; write the passages again")

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def rows(self, idx: Iterable[int]) -> list[tuple[str, str]]:
        """``(passage id, text)`` of each row in ``idx``."""
        out = []
        with open(self.path, "rb") as fh:
            for i in idx:
                i = int(i)
                if not 0 <= i < len(self):
                    raise IndexError(f"row {i} outside 0..{len(self) - 1} of {self.path}")
                a, b = int(self._offsets[i]), int(self._offsets[i + 1])
                fh.seek(a)
                row = json.loads(fh.read(b - a))
                out.append((row["id"], row["text"]))
        return out

    def iter_ids(self) -> Iterator[tuple[int, str]]:
        """``(row, passage id)`` of every row in order, read line by line (a corpus's ids are
        never held whole: ground truth keeps only the rows it asks for)."""
        with open(self.path, "rb") as fh:
            for row in range(len(self)):
                yield row, json.loads(fh.readline())["id"]

    def iter_chunks(
        self, tok: Tokenizer, max_len: int, chunk_size: int = 1024, start_chunk: int = 0
    ) -> Iterator[PackedChunk]:
        """Chunks ``start_chunk, start_chunk + 1, ...``: chunk c packs rows
        ``[c * chunk_size, (c + 1) * chunk_size)``, re-encoding each passage's text."""
        if chunk_size < 1:
            raise CorpusFileError(f"chunk_size must be >= 1, got {chunk_size}")
        first = start_chunk * chunk_size
        if first >= len(self):
            return
        with open(self.path, "rb") as fh:
            fh.seek(int(self._offsets[first]))
            row = first
            while row < len(self):
                n = min(chunk_size, len(self) - row)
                rows = [json.loads(fh.readline()) for _ in range(n)]
                encs = _encode(tok, [r["text"] for r in rows])
                passages = []
                for r, e in zip(rows, encs, strict=True):
                    doc_id, _, k = r["id"].rpartition(":")
                    passages.append(Passage(r["id"], doc_id, int(k), r["text"], tuple(e.ids)))
                yield pack(passages, max_len, row)
                row += n


def passage_doc_id(passage_id: str) -> str:
    """The document id of passage ``"<doc id>:<k>"`` (a doc id may itself hold ``:``)."""
    doc_id, sep, k = passage_id.rpartition(":")
    if not sep or not k.isdigit():
        raise CorpusFileError(f"{passage_id!r} is not a passage id '<doc id>:<k>'")
    return doc_id


# ----- queries --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FileQuery:
    """A query read from a file: id, prompt, target, and where it was read (``path:line``)."""

    query_id: str
    prompt: str
    target: str
    where: str


def _pick(row: dict[str, Any], field: str | None, names: Sequence[str], where: str, what: str):
    candidates = (field,) if field else tuple(names)
    for name in candidates:
        if name in row:
            value = row[name]
            if not isinstance(value, str):
                raise CorpusFileError(
                    f"{where}: {what} field {name!r} is {type(value).__name__}, not a string"
                )
            if not value.strip():
                raise CorpusFileError(f"{where}: empty {what} in field {name!r}")
            return value
    raise CorpusFileError(
        f"{where}: row lacks a {what} field (one of {', '.join(map(repr, candidates))})"
    )


def read_queries(
    path: str,
    prompt_field: str | None = None,
    target_field: str | None = None,
    id_field: str = "id",
) -> list[FileQuery]:
    """The queries of a jsonl file, one per row, in file order.

    The prompt is read from ``prompt_field``, or by default from ``prompt`` or
    ``inputs_plaintext`` (the TrackStar release's name); the target likewise from ``target``
    or ``targets_plaintext``. A query's id is its ``id_field`` value when the row has one,
    else its position (from 0). A row without a prompt or target, with an empty one, or with
    a value that is not a string is an error naming ``path:line``; so is a file with no rows.
    """
    if not os.path.isfile(path):
        raise CorpusFileError(f"query file {path!r} does not exist")
    out = []
    for where, row in _jsonl_rows(path):
        prompt = _pick(row, prompt_field, PROMPT_FIELDS, where, "prompt")
        target = _pick(row, target_field, TARGET_FIELDS, where, "target")
        qid = row.get(id_field) if id_field else None
        out.append(FileQuery(str(len(out)) if qid is None else str(qid), prompt, target, where))
    if not out:
        raise CorpusFileError(f"query file {path!r} is empty (no JSON rows)")
    return out


def detect_query_format(path: str) -> str:
    """``"release"`` when the first row of ``path`` (a file, or the first ``*.jsonl(.gz)`` file
    of a directory, as the release's query files are read) has ``RELEASE_QUERY_FIELDS``, else
    ``"prompt_target"`` (``read_queries``' rows). Only that one row is read."""
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.endswith((".jsonl", ".jsonl.gz")))
        if not names:
            raise CorpusFileError(f"query directory {path!r} holds no *.jsonl or *.jsonl.gz files")
        path = os.path.join(path, names[0])
    if not os.path.isfile(path):
        raise CorpusFileError(f"query file {path!r} does not exist")
    for _, row in iter_jsonl(path, CorpusFileError):
        return "release" if all(f in row for f in RELEASE_QUERY_FIELDS) else "prompt_target"
    raise CorpusFileError(f"query file {path!r} is empty (no JSON rows)")


def query_arrays(queries: Sequence[FileQuery], tok: Tokenizer, max_len: int, **kwargs: Any):
    """``trackstar.data.encode_queries`` of the queries (prompt + target, target tokens counted)."""
    from trackstar import data

    return data.encode_queries(
        tok, [q.prompt for q in queries], [q.target for q in queries], max_len, **kwargs
    )
