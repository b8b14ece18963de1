"""Paired gaps between two settings run on the same seeds, with a 95% t-interval and the
verdict it implies, so that every results table decides the same way and no verdict word is
written by hand."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Gap:
    """A paired gap (points) with its 95% t-interval and the verdict it implies."""

    mean: float
    low: float
    high: float
    n: int
    verdict: str

    def shown(self) -> str:
        """`+0.45 [-1.20, +2.10] (n=3)`; one pair has no interval."""
        if self.n < 2:
            return f"{self.mean:+.2f} (n={self.n})"
        return f"{self.mean:+.2f} [{self.low:+.2f}, {self.high:+.2f}] (n={self.n})"


def paired_gap(a: Sequence[float], b: Sequence[float], margin: float, scale: float = 100.0) -> Gap:
    """Gap a - b, times `scale` (100: accuracies in [0, 1] become points), paired by position
    (= seed).

    Verdicts, in this order: "equivalent" when the 95% interval lies inside +-margin; "better"
    or "worse" when it excludes 0; otherwise (or with fewer than 2 pairs) "inconclusive"."""
    if len(a) != len(b):
        raise ValueError(f"paired gap needs as many values on each side ({len(a)} vs {len(b)})")
    d = (np.asarray(a, dtype=float) - np.asarray(b, dtype=float)) * scale
    n = len(d)
    if n == 0:
        return Gap(float("nan"), float("nan"), float("nan"), 0, "inconclusive")
    return gap_from_summary(float(d.mean()), float(d.std(ddof=1)) if n > 1 else 0.0, n, margin)


def gap_from_summary(mean: float, sd: float, n: int, margin: float) -> Gap:
    """The same interval and verdict from a gap's mean and sample standard deviation over n
    pairs (for tables that kept only those)."""
    if n < 2:
        return Gap(mean, float("-inf"), float("inf"), n, "inconclusive")
    half = float(stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n))
    return Gap(mean, mean - half, mean + half, n, verdict(mean - half, mean + half, margin))


def verdict(low: float, high: float, margin: float) -> str:
    if -margin < low and high < margin:
        return "equivalent"
    if low > 0:
        return "better"
    if high < 0:
        return "worse"
    return "inconclusive"
