"""trackstar: training-data attribution at pretraining scale (TrackStar) in JAX."""

__version__ = "0.1.0"

# The attribution API, imported on first use so that ``import trackstar`` stays light (no JAX).
_LAZY = {
    "Attributor": "trackstar.attributor",
    "Proponents": "trackstar.attributor",
    "QueryFeaturizer": "trackstar.attributor",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'trackstar' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])
