"""A tiny run built through the stages, shared by the test files that need a scored run."""

import os

from trackstar import stages
from trackstar.config import load_config_file

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
# The presets the shared run is scored with (tests/conftest.py: the tiny_run fixture).
SHARED_PRESETS = ("trackstar", "exp_opt", "step_influence")


def tiny_scored_run(run_dir: str, presets=("trackstar",)):
    """``(cfg, trained, {preset: stage_score result})`` of configs/tiny.py in ``run_dir``:
    world, training, the candidate/task/heldout stores, R, and each preset's proponents
    (with the uncorrected task store when a preset's query side is uncorrected)."""
    from trackstar.score import get_preset

    cfg = load_config_file(os.path.join(CONFIGS, "tiny.py"))
    cfg.run_dir = run_dir
    stages.stage_world(cfg)
    stages.stage_train(cfg, progress=False)
    trained = stages.load_trained(cfg)
    for which in ("candidates", "task", "heldout"):
        stages.stage_featurize(cfg, which, trained=trained, progress=False)
    stages.stage_hessian(cfg)
    if any(not get_preset(p).query_side_corrected for p in presets):
        stages.stage_featurize(cfg, "task", corrected=False, trained=trained, progress=False)
    return cfg, trained, {p: stages.stage_score(cfg, p, progress=False) for p in presets}
