"""trackstar: training-data attribution at pretraining scale (TrackStar) in JAX."""

__version__ = "0.1.0"
