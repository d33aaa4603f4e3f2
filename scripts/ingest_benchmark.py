"""Peak memory of the streamed corpus ingest (trackstar.corpus_files.iter_packed) vs corpus size.

Writes, for each size N, a jsonl corpus of N short synthetic documents (1-6 sentences of 3-12
made-up words, from one vocabulary; some longer than the context, so they are cut into
sentence passages), then runs the tokenize-and-pack pass over it in a fresh subprocess: read
in batches, split into passages (overlap 1 sentence), pack into ``chunk_size`` x ``max_len``
arrays, write the passage texts file. The child reports its peak RSS (``VmHWM``), its peak
after imports and tokenizer load, and the rows and seconds; the parent prints them and the
ratio of peak RSS between the largest and the smallest corpus (flat memory: about 1).

Run: python scripts/ingest_benchmark.py --sizes 100000,1000000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _words(n: int, rng: np.random.Generator) -> list[str]:
    letters = np.array(list("abcdefghiklmnoprstuvz"))
    out: dict[str, None] = {}
    while len(out) < n:
        k = int(rng.integers(3, 9))
        out["".join(rng.choice(letters, k))] = None
    return list(out)


def write_corpus(path: str, n_docs: int, vocab: list[str], seed: int = 0) -> int:
    """Writes ``n_docs`` jsonl rows ``{"id", "text"}``; returns the file's size in bytes."""
    rng = np.random.default_rng(seed)
    words = np.array(vocab)
    with open(path, "w", encoding="utf-8") as fh:
        block = 10_000
        for start in range(0, n_docs, block):
            n = min(block, n_docs - start)
            n_sents = rng.integers(1, 7, n)
            lines = []
            for i in range(n):
                sents = []
                for _ in range(n_sents[i]):
                    k = int(rng.integers(3, 13))
                    sents.append(" ".join(words[rng.integers(0, len(words), k)]) + " .")
                row = {"id": f"doc{start + i}", "text": " ".join(sents)}
                lines.append(json.dumps(row))
            fh.write("\n".join(lines) + "\n")
    return os.path.getsize(path)


def _rss_mb() -> float:
    """Peak resident set of this process, in MB.

    VmHWM, the high-water mark of this process image: ``ru_maxrss`` would keep the parent's
    peak across fork + exec, and the parent has just written the corpus.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux.


def child(args: argparse.Namespace) -> None:
    from trackstar import corpus_files as C
    from trackstar.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    base = _rss_mb()
    t0 = time.perf_counter()
    rows = tokens = 0
    source = C.CorpusSource(args.corpus)
    for chunk in C.iter_packed(
        source,
        tok,
        args.max_len,
        chunk_size=args.chunk_size,
        overlap_sentences=1,
        texts_path=args.texts,
    ):
        rows += len(chunk)
        tokens += int(chunk.weights_NxT.sum())
    seconds = time.perf_counter() - t0
    result = {
        "peak_rss_mb": _rss_mb(),
        "rss_after_setup_mb": base,
        "passages": rows,
        "tokens": tokens,
        "seconds": seconds,
    }
    print(json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="100000,1000000", help="corpus sizes (documents)")
    p.add_argument("--max_len", type=int, default=32, help="context length (tokens with BOS)")
    p.add_argument("--chunk_size", type=int, default=1024, help="rows per packed chunk")
    p.add_argument("--vocab", type=int, default=5000, help="distinct words of the corpus")
    p.add_argument("--dir", default="", help="work directory (default: a temporary one)")
    p.add_argument("--json", default="", help="also write the results here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--corpus", default="", help=argparse.SUPPRESS)
    p.add_argument("--tokenizer", default="", help=argparse.SUPPRESS)
    p.add_argument("--texts", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return

    import ml_collections

    from trackstar.tokenizer import save_tokenizer, train_tokenizer

    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(dir=args.dir or None) as work:
        vocab = _words(args.vocab, np.random.default_rng(1))
        tok = train_tokenizer(
            [" ".join(vocab) + " ."], ml_collections.ConfigDict({"kind": "word", "vocab_size": 0})
        )
        tok_path = os.path.join(work, "tokenizer.json")
        save_tokenizer(tok, tok_path)
        results = {}
        for n in sizes:
            corpus = os.path.join(work, f"corpus-{n}.jsonl")
            t0 = time.perf_counter()
            nbytes = write_corpus(corpus, n, vocab)
            write_s = time.perf_counter() - t0
            texts = os.path.join(work, f"passages-{n}.jsonl")
            cmd = [sys.executable, os.path.abspath(__file__), "--child", "--corpus", corpus]
            cmd += ["--tokenizer", tok_path, "--texts", texts, "--max_len", str(args.max_len)]
            cmd += ["--chunk_size", str(args.chunk_size)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r.update(documents=n, corpus_mb=nbytes / 2**20, write_s=write_s)
            r["texts_mb"] = os.path.getsize(texts) / 2**20
            results[n] = r
            print(
                f"N={n:>9,d} docs ({r['corpus_mb']:.0f} MB jsonl): {r['passages']:,d} passages, "
                f"{r['tokens']:,d} tokens, {r['seconds']:.1f} s "
                f"({n / r['seconds']:,.0f} docs/s); RSS after setup {r['rss_after_setup_mb']:.0f}"
                f" MB, peak {r['peak_rss_mb']:.0f} MB",
                flush=True,
            )
            os.remove(corpus)
            os.remove(texts)
        lo, hi = min(sizes), max(sizes)
        ratio = results[hi]["peak_rss_mb"] / results[lo]["peak_rss_mb"]
        print(f"peak RSS growth N={lo:,d} -> N={hi:,d} ({hi / lo:.0f}x docs): {ratio:.3f}x")
        if args.json:
            payload = {"max_len": args.max_len, "chunk_size": args.chunk_size, "ratio": ratio}
            payload["runs"] = {str(k): v for k, v in results.items()}
            with open(args.json, "w", encoding="utf-8") as fh:
                json.dump(payload, fh, indent=2)


if __name__ == "__main__":
    main()
