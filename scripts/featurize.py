"""Stage 3: per-example gradients -> V correction -> projection -> store (resumable)."""

from _cli import parse

from trackstar import stages


def _args(p):
    p.add_argument(
        "--sets",
        default="candidates,task,heldout",
        help=f"comma-separated example sets from {stages.EXAMPLE_SETS}",
    )
    p.add_argument(
        "--correction",
        default="on",
        choices=["on", "off", "both"],
        help="optimizer correction: on (TrackStar), off (grad_dot/grad_cosine/trak), both",
    )


if __name__ == "__main__":
    cfg, args = parse(__doc__, _args)
    trained = stages.load_trained(cfg)
    flags = {"on": [True], "off": [False], "both": [True, False]}[args.correction]
    for corrected in flags:
        for which in args.sets.split(","):
            out = stages.stage_featurize(cfg, which, corrected, trained=trained)
            print(f"store: {out}")
