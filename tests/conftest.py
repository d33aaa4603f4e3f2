"""Fixtures shared across test files, and one compilation cache per test session."""

import atexit
import copy
import os
import shutil
import tempfile

import jax
import pytest
from run_fixtures import SHARED_PRESETS, tiny_scored_run

# Most of the suite's time is XLA compiling small programs, and many tests build the same ones
# again (one tiny model per run dir or fixture, each with its own jitted closures). JAX's
# persistent cache is keyed by the compiled program, so a session-wide cache dir lets those
# repeats load instead of recompile. A fresh dir per session: no entry outlives the checkout
# that wrote it. TRACKSTAR_TEST_COMPILE_CACHE=0 turns it off.
if os.environ.get("TRACKSTAR_TEST_COMPILE_CACHE", "1") != "0":
    _cache_dir = tempfile.mkdtemp(prefix="trackstar-xla-")
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
    jax.config.update("jax_compilation_cache_dir", _cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture(scope="session")
def _tiny_run(tmp_path_factory):
    # Built once per test session: the attributor, breakdown and variants tests only read it.
    return tiny_scored_run(str(tmp_path_factory.mktemp("shared") / "tiny"), SHARED_PRESETS)


@pytest.fixture(scope="module")
def tiny_run(_tiny_run):
    """``(cfg, trained, results)`` of the shared tiny run (each module a private config copy)."""
    cfg, trained, results = _tiny_run
    return copy.deepcopy(cfg), trained, results
