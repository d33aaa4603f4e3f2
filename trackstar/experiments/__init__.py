"""The paper's experiments E1–E8 (docs/method.md) over a run directory, built on ``stages``.

Each runner takes a full config (the demo sections plus an ``experiment`` section), reuses what
the run directory already holds (checkpoint, stores, Hessian fits) and writes
``<run_dir>/experiments/<experiment.name>/`` with ``results.json``, ``table.md`` and PNG plots
(tables and plots are built by ``trackstar.report``).

| id | what | candidates |
|---|---|---|
| e1 | every scoring preset + bm25 + random: MRR, Recall@10, tail-patch | closed set |
| e2 | bm25, grad_dot, grad_cosine, trackstar | open set (corpus passages) |
| e3 | MRR / tail-patch vs projection dimension d = k·k | closed set |
| e4 | the same across model sizes (one run dir per size) | closed set |
| e5 | query output function: loss, margin, logit | closed set |
| e6 | tail-patch@1, 3, 5, 10 | closed set |
| e7 | split by greedy correctness and by fact frequency bucket | closed set |
| e8 | LDS: scores summed over K half-subsets vs retrained log-probs | training documents |

The package: ``harness`` (config checks, ``Setup``/``make_setup``, the run's checkpoint,
caches, ``rank``), ``evaluation`` (``tailpatch_deltas``, ``evaluate``, ``retrieval_results``),
``records`` (E1/E2's per-method results files for the viewer) and one module per experiment,
``e1`` ... ``e8``, each with ``run(cfg, progress)``; a runner
is found by the experiment's name (``runner``, ``RUNNERS``, ``run``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import ml_collections

from trackstar.config import EXPERIMENTS
from trackstar.experiments.e3 import subgrid
from trackstar.experiments.evaluation import (
    evaluate,
    per_query_tailpatch,
    retrieval_results,
    tailpatch_deltas,
    tailpatch_info,
)
from trackstar.experiments.harness import (
    ALL_METHODS,
    BASELINES,
    GROUND_TRUTH,
    PRESET_METHODS,
    ExperimentError,
    Setup,
    ensure_stores,
    experiment_section,
    ground_truth_ids,
    make_setup,
    output_dir,
    rank,
    with_overrides,
)

__all__ = [
    "ALL_METHODS",
    "BASELINES",
    "GROUND_TRUTH",
    "NAMES",
    "PRESET_METHODS",
    "RUNNERS",
    "ExperimentError",
    "Setup",
    "ensure_stores",
    "evaluate",
    "experiment_section",
    "ground_truth_ids",
    "make_setup",
    "output_dir",
    "per_query_tailpatch",
    "rank",
    "retrieval_results",
    "run",
    "runner",
    "subgrid",
    "tailpatch_deltas",
    "tailpatch_info",
    "with_overrides",
]

# The experiments, in table order: every module of this package but the harness and evaluation
# (listed from the files by ``trackstar.config``); ``name`` is ``trackstar.experiments.<name>``.
NAMES = EXPERIMENTS

Runner = Callable[..., dict]


def runner(name: str) -> Runner:
    """The ``run(cfg, progress)`` function of the experiment module ``name`` (one of ``NAMES``)."""
    if name not in NAMES:
        raise ExperimentError(f"experiment.name = {name!r}; choose one of {', '.join(NAMES)}")
    return importlib.import_module(f"{__name__}.{name}").run


RUNNERS: dict[str, Runner] = {name: runner(name) for name in NAMES}


def run(cfg: ml_collections.ConfigDict, progress: bool = True) -> dict:
    """Runs the experiment named by ``cfg.experiment.name`` (one of ``RUNNERS``)."""
    return runner(experiment_section(cfg).name)(cfg, progress=progress)
