"""Stage 5: stream the candidate store, score the task queries, write top-k proponents."""

from _cli import parse

from trackstar import stages


def _args(p):
    p.add_argument("--candidates", default="candidates", choices=["candidates", "corpus"])
    p.add_argument("--preset", default=None, help="scoring preset (default: config score.preset)")


if __name__ == "__main__":
    cfg, args = parse(__doc__, _args)
    res = stages.stage_score(cfg, args.preset, args.candidates)
    print(f"proponents -> {res['path']}")
