"""The ``trackstar`` command: the pipeline's stages, the end-to-end job and proponents.

    trackstar world       --config configs/demo.py      world/ and tokenizer.json
    trackstar train       --config configs/demo.py      checkpoints/, results/accuracy.json
    trackstar featurize   --config configs/demo.py      stores/<set>-<correction>/
    trackstar hessian     --config configs/demo.py      hessian/<name>.npz
    trackstar score       --config configs/demo.py      results/proponents_<...>.jsonl / .npz
    trackstar index       --config configs/demo.py      indexes/<candidates>-<preset>-<dtype>/
    trackstar run         --config configs/demo.py      all of the above, then the E1 table
    trackstar experiment  --config configs/e1.py        one experiment (E1-E8) and its table
    trackstar proponents  --config configs/demo.py --prompt "..." --target "..." --k 10
    trackstar attribute   --config configs/hf_gpt2.py --config.model.checkpoint_dir=DIR \
                          --config.corpus.path=FILE --config.queries.path=FILE
                                                    proponents of a Hugging Face checkpoint
    trackstar export      --config configs/demo.py --out DIR   a trained run as HF GPT-2

Every command takes ``--config FILE`` (default ``configs/demo.py``; ``configs/e1.py`` for
``experiment``) and any ``--config.section.field=VALUE`` override (``trackstar.config``): the
config is validated before any work, and on a run directory that already holds a world the
settings it was built with come from its ``config.json``. A config error prints one line and
exits with 2; an error of the library (a missing stage, a store that does not match, ...)
prints one line and exits with 1 (``TRACKSTAR_TRACEBACK=1`` shows the traceback). The scripts
in ``scripts/`` are these commands (``scripts/_cli.py`` uses this module's parser).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence

from trackstar.config import ConfigError, default_config_path, load_command, save_config


def is_library_error(exc: BaseException) -> bool:
    """Errors of the library (classes defined in ``trackstar``), whose messages say the fix."""
    return type(exc).__module__.startswith("trackstar")


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())  # One line, whatever the message holds.
    return f"error ({type(exc).__name__}): {text}\n"


def install_one_line_errors() -> None:
    """Uncaught library errors print one line and exit with 1 (for the scripts)."""
    default = sys.excepthook

    def hook(etype, value, tb):
        if not is_library_error(value) or os.environ.get("TRACKSTAR_TRACEBACK"):
            default(etype, value, tb)
            return
        sys.stderr.write(one_line(value))

    sys.excepthook = hook


def parse(
    description: str,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    default_config: str | None = None,
    argv: Sequence[str] | None = None,
    prog: str | None = None,
):
    """``(config, args)`` of a command line: the config file with its ``--config.x=y``
    overrides, resolved against its run directory and validated, and the other flags.

    ``argv`` defaults to ``sys.argv[1:]``. ``-h``/``--help`` prints the command's help without
    loading a config. A config error exits with code 2 and one line, no traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog=prog,
        description=inspect.cleandoc(description) if description else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Config: --config PATH and any --config.section.field=VALUE override.",
    )
    if add_arguments:
        add_arguments(parser)
    if any(a in ("-h", "--help") for a in argv):
        parser.parse_args(["--help"])
    try:
        cmd = load_command(argv, default_config=default_config or default_config_path())
    except ConfigError as e:
        parser.exit(2, f"config error: {' '.join(str(e).split())}\n")
    if cmd.from_run_dir:
        shown = ", ".join(cmd.from_run_dir[:8])
        more = f" (+{len(cmd.from_run_dir) - 8} more)" if len(cmd.from_run_dir) > 8 else ""
        print(
            f"note: {cmd.config.run_dir} was built with other settings than {cmd.path}; "
            f"using the run's {shown}{more}",
            file=sys.stderr,
        )
    args = parser.parse_args(cmd.rest)
    # Third-party chatter (index building, read-only checkpoint notices) is not results.
    for name in ("bm25s", "absl"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return cmd.config, args


def save_resolved(cfg, directory: str) -> str:
    """Writes the command's resolved config as ``<directory>/config.json`` (after success)."""
    from trackstar.world import unused_fields

    out = os.path.join(directory, "config.json")
    save_config(cfg, out, unused=[f"world.{f}" for f in unused_fields(cfg.world)])
    return out


# ----- commands ---------------------------------------------------------------------------------
# Each command is ``fn(argv, prog) -> int``; the library (JAX) is imported only when one runs.


@dataclasses.dataclass(frozen=True)
class Command:
    summary: str
    run: Callable[[list[str], str], int]


def _world(argv: list[str], prog: str) -> int:
    """Stage 1: generate (or load) the fact world and train the tokenizer into the run
    directory."""
    cfg, _ = parse(_world.__doc__, argv=argv, prog=prog)
    from trackstar import stages

    w = stages.stage_world(cfg)
    print(
        f"world: {len(w.facts)} facts, {len(w.documents)} documents, {len(w.candidates)} "
        f"candidates, {len(w.task_queries)} task + {len(w.heldout_queries)} held-out queries "
        f"-> {stages.path(cfg, 'world')}"
    )
    return 0


def _train(argv: list[str], prog: str) -> int:
    """Stage 2: train the LM with Orbax checkpoints (resumes), then report greedy fact
    accuracy."""
    cfg, _ = parse(_train.__doc__, argv=argv, prog=prog)
    from trackstar import report, stages

    print(report.accuracy_table(stages.stage_train(cfg)))
    return 0


def _featurize_args(p: argparse.ArgumentParser) -> None:
    from trackstar.stages import EXAMPLE_SETS

    p.add_argument(
        "--sets",
        default="candidates,task,heldout",
        help=f"comma-separated example sets from {EXAMPLE_SETS}",
    )
    p.add_argument(
        "--correction",
        default="on",
        choices=["on", "off", "both"],
        help="optimizer correction: on (TrackStar), off (grad_dot/grad_cosine/trak), both",
    )


def _featurize(argv: list[str], prog: str) -> int:
    """Stage 3: per-example gradients -> V correction -> projection -> store (resumable)."""
    cfg, args = parse(_featurize.__doc__, _featurize_args, argv=argv, prog=prog)
    from trackstar import stages

    trained = stages.load_trained(cfg)
    flags = {"on": [True], "off": [False], "both": [True, False]}[args.correction]
    for corrected in flags:
        for which in args.sets.split(","):
            out = stages.stage_featurize(cfg, which, corrected, trained=trained)
            print(f"store: {out}")
    return 0


def _hessian_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--candidates", default="candidates", choices=["candidates", "corpus"])
    p.add_argument("--correction", default="on", choices=["on", "off"])


def _hessian(argv: list[str], prog: str) -> int:
    """Stage 4: fit R = λ R_eval + (1 − λ) R_train and R^{-1/2} from the stores."""
    cfg, args = parse(_hessian.__doc__, _hessian_args, argv=argv, prog=prog)
    from trackstar import hessian, stages

    out = stages.stage_hessian(cfg, args.candidates, args.correction == "on")
    fit = hessian.HessianFit.load(out)
    print(f"hessian: d={fit.dim} lambda={fit.lambda_mix:.4f} -> {out}")
    return 0


def _score_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--candidates", default="candidates", choices=["candidates", "corpus"])
    p.add_argument("--preset", default=None, help="scoring preset (default: config score.preset)")


def _score(argv: list[str], prog: str) -> int:
    """Stage 5: stream the candidate store, score the task queries, write top-k proponents."""
    cfg, args = parse(_score.__doc__, _score_args, argv=argv, prog=prog)
    from trackstar import stages

    res = stages.stage_score(cfg, args.preset, args.candidates)
    print(f"proponents -> {res['path']}")
    return 0


def _index_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--candidates", default="candidates", choices=["candidates", "corpus"])
    p.add_argument("--preset", default=None, help="scoring preset (default: config score.preset)")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="row dtype of the index (bfloat16: half the bytes to stream)",
    )


def _index(argv: list[str], prog: str) -> int:
    """Builds a scoring index: the candidate store's rows R^{-1/2}-transformed and normalized
    once for a preset, so scoring a query batch is one streamed matmul (trackstar.index).

    Reuses an index built from the same store, fit, preset and dtype; resumes a partial one.
    """
    cfg, args = parse(_index.__doc__, _index_args, argv=argv, prog=prog)
    from trackstar import index, stages

    out = stages.stage_index(cfg, args.preset, args.candidates, args.dtype)
    idx = index.ScoringIndex.open(out)
    print(f"index: {idx.num_rows} rows, d={idx.dim}, {idx.info.preset}, {idx.info.dtype} -> {out}")
    return 0


def _run(argv: list[str], prog: str) -> int:
    """The main job, end to end: world -> train -> featurize -> R -> score -> proponents, then
    the E1 table (every scoring preset + bm25 + random: MRR, Recall@10, tail-patch with its lr
    sweep).

    Every stage resumes: rerunning after an interruption continues where it stopped. The E1
    table is printed and saved to <run_dir>/results/summary.md and <run_dir>/experiments/e1/.
    """
    cfg, _ = parse(_run.__doc__, argv=argv, prog=prog)
    from trackstar import experiments, report, stages

    t0 = time.perf_counter()
    w = stages.stage_world(cfg)
    print(f"[world] {len(w.facts)} facts, {len(w.candidates)} candidates")
    print(report.accuracy_table(stages.stage_train(cfg)))
    trained = stages.load_trained(cfg)
    for which in ("candidates", "task", "heldout"):
        stages.stage_featurize(cfg, which, corrected=True, trained=trained)
    stages.stage_hessian(cfg)
    res = stages.stage_score(cfg, "trackstar")
    with open(res["path"]) as f:
        rows = [json.loads(line) for line in f]
    queries = list(trained.world.task_queries)
    print("\nTrackStar proponents (closed set), one query per frequency bucket:")
    print(
        report.proponents_preview(
            rows,
            buckets=[q.bucket for q in queries],
            ground_truth=[q.candidate_ids for q in queries],
            answers=stages.model_answers(cfg, trained, queries),
        )
    )
    with cfg.unlocked():
        cfg.experiment.name = "e1"
    e1 = experiments.run(cfg)
    print("\n" + e1["markdown"])
    report.save_text(e1["markdown"], stages.path(cfg, "results", "summary.md"))
    save_resolved(cfg, stages.path(cfg, "results"))  # Beside summary.md.
    print(f"\ndone in {time.perf_counter() - t0:.0f} s; results in {stages.path(cfg, 'results')}")
    if cfg.get("viewer") is None or cfg.viewer.write:
        from trackstar.viewer import write_viewer

        # Last, so the path is the line a reader sees: open it in any browser.
        print(f"viewer: {write_viewer(cfg.run_dir, experiment='e1')}")
    return 0


def _experiment(argv: list[str], prog: str) -> int:
    """Runs one experiment (E1-E8, docs/method.md) over a run directory and prints its table.

    The run directory is trained first when it has no final checkpoint; stores, Hessian fits,
    rankings and tail-patch deltas already there are reused. Results land in
    <run_dir>/experiments/<name>/: results.json, table.md, PNG plots and config.json (the
    resolved config of this command).
    """
    cfg, _ = parse(
        _experiment.__doc__, default_config=default_config_path("e1.py"), argv=argv, prog=prog
    )
    from trackstar import experiments, report, stages

    t0 = time.perf_counter()
    stages.stage_world(cfg)
    print(report.accuracy_table(stages.stage_train(cfg)) + "\n")
    results = experiments.run(cfg)
    print(results["markdown"])
    out = experiments.output_dir(cfg)
    save_resolved(cfg, out)  # The settings these results came from, beside them.
    print(f"\n{cfg.experiment.name} done in {time.perf_counter() - t0:.0f} s; results in {out}")
    return 0


def _proponents_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--prompt", action="append", required=True, help="query prompt (repeat for several)"
    )
    p.add_argument("--target", action="append", required=True, help="its target (one per --prompt)")
    p.add_argument("--k", type=int, default=10, help="proponents per query (default 10)")
    p.add_argument("--preset", default=None, help="scoring preset (default: config score.preset)")
    p.add_argument("--candidates", default="candidates", choices=["candidates", "corpus"])
    p.add_argument("--json", action="store_true", help="print one JSON object per query")


def _proponents(argv: list[str], prog: str) -> int:
    """The training examples that most influenced the model's prediction of --target after
    --prompt (the run's checkpoint, candidate store and Hessian fit; trackstar.Attributor)."""
    cfg, args = parse(_proponents.__doc__, _proponents_args, argv=argv, prog=prog)
    if len(args.prompt) != len(args.target):
        print(
            f"{prog}: error: {len(args.prompt)} --prompt but {len(args.target)} --target; give "
            "one --target per --prompt",
            file=sys.stderr,
        )
        return 2
    if args.k < 1:
        print(f"{prog}: error: --k must be >= 1, got {args.k}", file=sys.stderr)
        return 2
    from trackstar.attributor import Attributor

    att = Attributor.from_run(cfg, args.preset or cfg.score.preset, args.candidates)
    found = att.proponents_batch(args.prompt, args.target, args.k)
    if args.json:
        for p in found:
            print(json.dumps(p.to_dict(), ensure_ascii=False))
    else:
        print("\n\n".join(p.table() for p in found))
    return 0


def _attribute_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--k", type=int, default=5, help="proponents shown per query (default 5)")


def _attribute(argv: list[str], prog: str) -> int:
    """Proponents of a Hugging Face checkpoint (config.json, model.safetensors, tokenizer.json)
    over a corpus file, for the queries of a jsonl file (docs/bring_your_own_model.md).

    Loads model.checkpoint_dir, packs corpus.path into passages with the checkpoint's
    tokenizer, estimates V, featurizes the passages and the queries (queries.path), fits R,
    scores with score.preset and writes <run_dir>/results/proponents.jsonl, proponents.md and
    config.json. A query file of the TrackStar release (queries.format) also gets opponents, a
    results file in the release schema and MRR / Recall@10 against its trex_sentences
    (<run_dir>/results/<preset>.release.jsonl.gz, <preset>.release_metrics.json). Every step is
    cached in the run directory: rerunning resumes or reuses it.
    """
    cfg, args = parse(
        _attribute.__doc__,
        _attribute_args,
        default_config=default_config_path("hf_gpt2.py"),
        argv=argv,
        prog=prog,
    )
    from trackstar import checkpoint_run

    t0 = time.perf_counter()
    res = checkpoint_run.run(cfg)
    print(checkpoint_run.proponents_table(res["rows"], k=max(1, args.k)))
    print(
        f"{len(res['rows'])} queries over {res['passages']} passages in "
        f"{time.perf_counter() - t0:.0f} s; proponents -> {res['path']}"
    )
    return 0


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="directory to write the checkpoint into")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def _export(argv: list[str], prog: str) -> int:
    """Writes the trained model of a run (model.family = "gpt2") as a Hugging Face GPT-2
    checkpoint directory (config.json, model.safetensors, tokenizer.json)."""
    cfg, args = parse(_export.__doc__, _export_args, argv=argv, prog=prog)
    from trackstar.stages import export_run

    out = export_run(cfg, args.out, args.overwrite)
    print(f"exported {cfg.run_dir} -> {out}")
    return 0


def _view(argv: list[str], prog: str) -> int:
    """Writes the static HTML viewer of a run's proponents (one self-contained file: no
    server, no network) and prints its path.

    RUN_DIR is a run directory (its experiments/<--experiment> must hold proponents/ files,
    written by `trackstar run` or `trackstar experiment`) or an experiment directory. Results
    files in the release schema (--release NAME=PATH or PATH, repeatable) are shown as more
    methods beside the run's, joined by example_id; without RUN_DIR only they are shown.
    """
    parser = argparse.ArgumentParser(
        prog=prog,
        description=inspect.cleandoc(_view.__doc__ or ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", nargs="?", help="run or experiment directory")
    parser.add_argument("--experiment", default="e1", help="experiment to show (default e1)")
    parser.add_argument(
        "--release", action="append", default=[], metavar="[NAME=]PATH", help="results file"
    )
    parser.add_argument("--out", help="HTML file (default <experiment dir>/viewer.html)")
    parser.add_argument("--top-k", type=int, help="proponents shown per method")
    parser.add_argument(
        "--methods", help="comma-separated methods shown at first (default viewer.methods)"
    )
    args = parser.parse_args(argv)
    if args.run_dir is None and not args.release:
        parser.error("pass RUN_DIR, --release FILE, or both")
    from trackstar.viewer import write_viewer

    out = write_viewer(
        args.run_dir,
        out=args.out,
        experiment=args.experiment,
        release_files=args.release,
        top_k=args.top_k,
        shown=args.methods.split(",") if args.methods else None,
    )
    print(f"viewer: {out}")
    return 0


COMMANDS: dict[str, Command] = {
    "world": Command("build the fact world and tokenizer (stage 1)", _world),
    "train": Command("train the model, report fact accuracy (stage 2)", _train),
    "featurize": Command("featurize example sets into stores (stage 3)", _featurize),
    "hessian": Command("fit R and R^-1/2 from the stores (stage 4)", _hessian),
    "score": Command("score the task queries, write proponents (stage 5)", _score),
    "index": Command("build a scoring index of a candidate store for a preset", _index),
    "run": Command("the end-to-end job: every stage, then the E1 table", _run),
    "experiment": Command("run one experiment (E1-E8) and print its table", _experiment),
    "proponents": Command("proponents of new prompt/target pairs (Attributor)", _proponents),
    "attribute": Command("proponents of a Hugging Face checkpoint over a corpus file", _attribute),
    "export": Command("write a trained run's model as a Hugging Face GPT-2 checkpoint", _export),
    "view": Command("write the static HTML viewer of a run's proponents", _view),
}


def _top_parser() -> argparse.ArgumentParser:
    width = max(map(len, COMMANDS))
    listing = "\n".join(f"  {n:<{width}}  {c.summary}" for n, c in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="trackstar",
        description="Training-data attribution (TrackStar) over a run directory.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"commands:\n{listing}\n\n'trackstar COMMAND --help' shows a command's flags. "
        "Every command takes --config FILE and --config.section.field=VALUE overrides.",
    )
    parser.add_argument(
        "command", choices=list(COMMANDS), metavar="COMMAND", help="one of the commands below"
    )
    return parser


def run_command(name: str, argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Runs command ``name`` on ``argv`` (default ``sys.argv[1:]``); the exit code.

    A library error prints one line and gives 1 (``TRACKSTAR_TRACEBACK=1`` raises it instead);
    config and argument errors exit with 2 (``SystemExit``), as argparse does.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return COMMANDS[name].run(argv, prog or f"trackstar {name}")
    except Exception as e:
        if not is_library_error(e) or os.environ.get("TRACKSTAR_TRACEBACK"):
            raise
        sys.stderr.write(one_line(e))
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    """The ``trackstar`` console script: ``trackstar COMMAND [--config FILE] [overrides] ...``.

    Returns the exit code (0 on success, 1 for a library error, printed as one line); config
    and argument errors exit with 2 (``SystemExit``), as argparse does.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _top_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    if argv[0] == "--version":
        from trackstar import __version__

        print(f"trackstar {__version__}")
        return 0
    return run_command(parser.parse_args(argv[:1]).command, argv[1:])


if __name__ == "__main__":
    sys.exit(main())
