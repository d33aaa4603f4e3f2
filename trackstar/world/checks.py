"""Checks of the ``world`` config section shared by every source, and the fields a source reads.

``unused_fields`` names the fields a source leaves unread; ``_plain_config`` is the config a
world records (and its content hash covers), without those fields.
"""

from __future__ import annotations

import json
from typing import Any

from trackstar.world.records import WorldError
from trackstar.world.templates import _PREFIXES

# World fields only the synthetic generator reads: a LAMA world takes its sizes from the files.
SYNTHETIC_ONLY_FIELDS = (
    "n_subjects",
    "n_relations",
    "n_objects_per_type",
    "zipf_exponent",
    "n_templates",
)
LAMA_ONLY_FIELDS = ("lama_facts_path", "lama_templates_path", "lama_query_patterns")


def _get(cfg: Any, name: str) -> Any:
    try:
        return cfg[name]
    except (KeyError, AttributeError) as e:
        raise WorldError(f"world config has no field {name!r} (see configs/demo.py)") from e


def _check_common(cfg: Any) -> None:
    buckets = tuple(_get(cfg, "freq_buckets"))
    if not buckets or any(int(b) != b or b < 1 for b in buckets):
        raise WorldError(f"world.freq_buckets must be positive integers, got {buckets!r}")
    if len(set(buckets)) != len(buckets):
        raise WorldError(f"world.freq_buckets has repeated values: {buckets!r}")
    af = _get(cfg, "anchor_frac")
    if not 0.0 <= af < 1.0:
        raise WorldError(f"world.anchor_frac must be in [0, 1), got {af}")
    for name in ("anchor_query_form_p", "filler_p", "distractor_p"):
        p = _get(cfg, name)
        if not 0.0 <= p <= 1.0:
            raise WorldError(f"world.{name} must be a probability in [0, 1], got {p}")
    if _get(cfg, "zipf_exponent") < 0:
        raise WorldError(f"world.zipf_exponent must be >= 0, got {cfg.zipf_exponent}")
    n_pre = _get(cfg, "n_prefixes")
    if not 1 <= n_pre <= len(_PREFIXES):
        raise WorldError(f"world.n_prefixes must be in 1..{len(_PREFIXES)}, got {n_pre}")
    ds = tuple(_get(cfg, "doc_sentences"))
    if len(ds) != 2 or not 1 <= ds[0] <= ds[1]:
        raise WorldError(f"world.doc_sentences must be (min, max) with 1 <= min <= max, got {ds}")
    for name in ("n_distractor_candidates", "n_heldout_queries"):
        if _get(cfg, name) < 0:
            raise WorldError(f"world.{name} must be >= 0, got {cfg[name]}")
    if _n_rare_token_candidates(cfg) < 0:
        raise WorldError(
            f"world.rare_token_candidates must be >= 0, got {_n_rare_token_candidates(cfg)}"
        )
    # Without task queries nothing is scored: every metric would be an empty mean.
    if _get(cfg, "n_queries") < 1:
        raise WorldError(f"world.n_queries must be >= 1 (nothing to trace), got {cfg.n_queries}")


def _n_rare_token_candidates(cfg: Any) -> int:
    # Absent from configs and manifests older than the field: those worlds had none.
    return int(cfg.get("rare_token_candidates", 0) if hasattr(cfg, "get") else 0)


def _n_anchors(n_subjects: int, anchor_frac: float) -> int:
    return int(round(n_subjects * anchor_frac))


def _check_query_capacity(cfg: Any, n_queryable: int) -> None:
    need = cfg.n_queries + cfg.n_heldout_queries
    if need > n_queryable:
        raise WorldError(
            f"world.n_queries + world.n_heldout_queries = {need} exceeds the {n_queryable} facts "
            "of non-anchor subjects; lower them, or raise world.n_subjects / world.n_relations "
            "or lower world.anchor_frac"
        )


def unused_fields(cfg: Any) -> tuple[str, ...]:
    """The ``world`` fields that ``cfg.source`` (and a T-REx candidate file) leave unread.

    A LAMA world takes its sizes from its files, so the synthetic generator's sizes and Zipf
    exponent mean nothing there; a synthetic world reads no LAMA file; a T-REx file replaces
    the distractor candidates. The world's recorded config (and the run's ``config.json``)
    leave these out, so no saved setting claims an effect it did not have.
    """
    source = _get(cfg, "source")
    unused: list[str] = []
    if source == "lama":
        unused += SYNTHETIC_ONLY_FIELDS
    elif source == "synthetic":
        unused += LAMA_ONLY_FIELDS
    trex = cfg.get("trex_candidates_path", "") if hasattr(cfg, "get") else ""
    if trex:
        unused += ["n_distractor_candidates", "rare_token_candidates"]
    return tuple(f for f in unused if f in cfg)


def _plain_config(cfg: Any) -> dict[str, Any]:
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    for name in unused_fields(cfg):
        d.pop(name, None)
    # JSON-normalized (tuples -> lists), so a loaded world compares equal to a fresh one.
    return json.loads(json.dumps(d, sort_keys=True, default=str))
