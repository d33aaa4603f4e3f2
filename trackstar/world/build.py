"""``build_world``: the world of a ``world`` config section, whatever its source."""

from __future__ import annotations

from typing import Any

from trackstar.world.checks import _get
from trackstar.world.corpus import with_candidates
from trackstar.world.lama import load_lama_world, read_trex_candidates
from trackstar.world.records import World, WorldError
from trackstar.world.synthetic import make_world


def build_world(cfg: Any) -> World:
    """The world of ``cfg.world``: synthetic, or LAMA files when ``source == "lama"``.

    With ``trex_candidates_path`` set, that file's sentences replace the closed candidate set.
    Every input is checked before the world is returned, so nothing is written for a world
    that cannot be used.
    """
    source = _get(cfg, "source")
    if source == "synthetic":
        world = make_world(cfg)
    elif source == "lama":
        world = load_lama_world(cfg.lama_facts_path, cfg.lama_templates_path, cfg)
    else:
        raise WorldError(f"world.source must be 'synthetic' or 'lama', got {source!r}")
    trex = cfg.get("trex_candidates_path", "") if hasattr(cfg, "get") else ""
    if trex:
        world = with_candidates(world, read_trex_candidates(trex, world))
    return world
