"""Tolerances that scale with the quantity compared, so tests pass on any x86 CPU.

Float32 sums round differently with AVX2 and AVX-512 (other reduction orders and FMA
contractions), so a fixed absolute tolerance such as 1e-6 is a property of one machine. Here
the absolute part is a fraction of the largest magnitude of the expected array: an entry that
is small only because of cancellation is held to the precision of the terms that produced it.
"""

from __future__ import annotations

import numpy as np


def scaled_atol(desired, rel: float) -> float:
    """``rel`` times the largest ``|desired|`` (``rel`` itself when ``desired`` is all zero)."""
    peak = float(np.max(np.abs(np.asarray(desired, np.float64)), initial=0.0))
    return rel * (peak if peak > 0 else 1.0)


def assert_close(actual, desired, rtol: float = 1e-5, peak_rtol: float = 1e-5, err_msg: str = ""):
    """``|actual - desired| <= rtol * |desired| + peak_rtol * max|desired|`` elementwise."""
    np.testing.assert_allclose(
        actual, desired, rtol=rtol, atol=scaled_atol(desired, peak_rtol), err_msg=err_msg
    )


def assert_near_zero(actual, reference, rel: float = 1e-6, err_msg: str = ""):
    """``|actual| <= rel * max|reference|``: zero at the precision of ``reference``."""
    np.testing.assert_allclose(
        actual, np.zeros_like(np.asarray(actual)), atol=scaled_atol(reference, rel), err_msg=err_msg
    )
