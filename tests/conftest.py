"""Fixtures shared across test files."""

import copy

import pytest
from run_fixtures import SHARED_PRESETS, tiny_scored_run


@pytest.fixture(scope="session")
def _tiny_run(tmp_path_factory):
    # Built once per test session: the attributor, breakdown and variants tests only read it.
    return tiny_scored_run(str(tmp_path_factory.mktemp("shared") / "tiny"), SHARED_PRESETS)


@pytest.fixture(scope="module")
def tiny_run(_tiny_run):
    """``(cfg, trained, results)`` of the shared tiny run (each module a private config copy)."""
    cfg, trained, results = _tiny_run
    return copy.deepcopy(cfg), trained, results
