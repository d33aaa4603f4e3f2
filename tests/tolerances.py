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


def assert_same_top_k(ids, scores, want_ids, want_scores, atol: float = 1e-5, err_msg: str = ""):
    """Two top-k results agree: scores within ``atol``, ids equal except inside near-ties.

    Positions whose ids differ must hold scores within ``2 * atol`` of each other in the
    reference (one tie block, ordered by rounding); a block touching the last position may
    also trade an id with the first one left out.
    """
    ids, want_ids = np.atleast_2d(ids), np.atleast_2d(want_ids)
    want_scores = np.atleast_2d(np.asarray(want_scores, np.float64))
    np.testing.assert_allclose(np.atleast_2d(scores), want_scores, atol=atol, err_msg=err_msg)
    for r, (got, want) in enumerate(zip(ids, want_ids, strict=True)):
        diff = np.nonzero(got != want)[0]
        if diff.size == 0:
            continue
        block = want_scores[r, diff]
        where = f"row {r}, positions {diff.tolist()}: {got[diff].tolist()} vs {want[diff].tolist()}"
        assert block.max() - block.min() <= 2 * atol, f"{err_msg} ids differ outside a tie: {where}"
        if set(got[diff].tolist()) != set(want[diff].tolist()):
            assert diff.max() == len(want) - 1, f"{err_msg} different ids: {where}"
