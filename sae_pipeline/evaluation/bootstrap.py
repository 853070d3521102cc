"""Percentile bootstrap confidence intervals for rates, reproducible per (seed, name)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np


def _rng(seed: int, name: str) -> np.random.Generator:
    # one stream per named rate, so adding a rate never shifts another rate's interval
    return np.random.Generator(np.random.PCG64(int(hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()[:16], 16)))


def rate_with_ci(flags: Sequence[bool], name: str, seed: int, resamples: int, level: float) -> dict:
    """{"rate", "ci_low", "ci_high", "n"}; rate and bounds are None for an empty group."""
    values_N = np.asarray(flags, dtype=np.float64)
    n = len(values_N)
    if n == 0:
        return {"rate": None, "ci_low": None, "ci_high": None, "n": 0}
    means_R = values_N[_rng(seed, name).integers(0, n, size=(resamples, n))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means_R, [tail, 100 - tail])
    return {"rate": round(float(values_N.mean()), 6), "ci_low": round(float(low), 6),
            "ci_high": round(float(high), 6), "n": n}
