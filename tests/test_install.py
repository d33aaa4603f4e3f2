"""The project's virtual environment holds exactly the versions requirements.lock pins."""

import os
import sys
from importlib import metadata

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pins() -> dict[str, str]:
    pins = {}
    with open(os.path.join(ROOT, "requirements.lock")) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                name, version = line.split("==")
                pins[name.lower().replace("_", "-")] = version
    return pins


@pytest.mark.skipif(
    os.path.realpath(sys.prefix) != os.path.realpath(os.path.join(ROOT, ".venv")),
    reason="checks the environment `make install` builds (.venv), not a user's own",
)
def test_venv_matches_lock():
    pins = _pins()
    for core in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tensorstore", "numpy"):
        assert core in pins, f"requirements.lock does not pin {core}"
    wrong = {}
    for name, want in pins.items():
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            have = None
        if have != want:
            wrong[name] = (have, want)
    assert not wrong, f"installed vs locked versions differ (rerun `make install`): {wrong}"
