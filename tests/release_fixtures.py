"""Small files in the TrackStar release's schema (PAIR-code/pretraining-tda), written by the tests.

Nothing is downloaded: these mirror the release's query files (``fact_id``, ``entity0``,
``relation``, ``entity1``, ``prompt0``..``prompt2``, aliases, ``trex_sentences``) and corpus
shards (``sentence_id``, ``text``, ``fact_triples``).
"""

import gzip
import json
import os

QUERIES = [
    {
        "fact_id": "f_curie_p19",
        "entity0": "Marie Curie",
        "relation": "P19",
        "entity1": "Warsaw",
        "prompt0": "Marie Curie was born in",
        "prompt1": "The birthplace of Marie Curie is",
        "prompt2": "Marie Curie's place of birth is",
        "entity0_aliases": ["Maria Sklodowska"],
        "entity1_aliases": ["Warszawa"],
        "trex_sentences": ["s0"],
    },
    {
        "fact_id": "f_einstein_p19",
        "entity0": "Albert Einstein",
        "relation": "P19",
        "entity1": "Ulm",
        "prompt0": "Albert Einstein was born in",
        "prompt1": "The birthplace of Albert Einstein is",
        "prompt2": "Albert Einstein's place of birth is",
        # s4 is named here only (its triples do not carry the fact).
        "trex_sentences": [{"sentence_id": "s4"}],
    },
    {
        "fact_id": 7,  # an integer id is read as "7"
        "entity0": "Galileo Galilei",
        "relation": "P27",
        "entity1": "Italy",
        "prompt0": "Galileo Galilei was a citizen of",
    },
]

SHARDS = [
    [
        {
            "sentence_id": "s0",
            "text": "Marie Curie was born in Warsaw .",
            "fact_triples": [["Marie Curie", "P19", "Warsaw"]],
        },
        {
            "sentence_id": "s1",
            "text": "Albert Einstein , a physicist , was born in Ulm .",
            "fact_triples": [
                ["Albert Einstein", "P19", "Ulm"],
                {"sub_label": "Albert Einstein", "predicate_id": "P106", "obj_label": "physicist"},
            ],
        },
    ],
    [
        # An integer sentence_id is read as "2".
        {"sentence_id": 2, "text": "The weather in Pisa was mild .", "fact_triples": []},
        {
            "sentence_id": "s3",
            "text": "Galileo Galilei lived in Italy .",
            "fact_triples": [["Galileo Galilei", "P27", "Italy"]],
        },
        {"sentence_id": "s4", "text": "Einstein grew up in Munich, born in Ulm ."},
    ],
]


def write_jsonl(path, rows, gz=False):
    """Writes ``rows`` as JSONL (through gzip when ``gz``); returns the path."""
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    return path


def write_release(root):
    """Writes ``queries.jsonl`` and a ``corpus/`` directory of two shards (one gzipped) under
    ``root``; returns ``(query_path, corpus_dir)``."""
    corpus = os.path.join(root, "corpus")
    os.makedirs(corpus, exist_ok=True)
    write_jsonl(os.path.join(corpus, "shard-00000.jsonl"), SHARDS[0])
    write_jsonl(os.path.join(corpus, "shard-00001.jsonl.gz"), SHARDS[1], gz=True)
    return write_jsonl(os.path.join(root, "queries.jsonl"), QUERIES), corpus
