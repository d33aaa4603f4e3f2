"""Stage 1: generate (or load) the fact world and train the tokenizer into the run directory."""

from _cli import parse

from trackstar import stages

if __name__ == "__main__":
    cfg, _ = parse(__doc__)
    w = stages.stage_world(cfg)
    print(
        f"world: {len(w.facts)} facts, {len(w.documents)} documents, {len(w.candidates)} "
        f"candidates, {len(w.task_queries)} task + {len(w.heldout_queries)} held-out queries "
        f"-> {stages.path(cfg, 'world')}"
    )
