"""The shared paired-gap statistics every results table decides with."""

import math

import pytest
from scipy import stats

from declora.reporting.paired import paired_gap


def test_the_interval_is_the_t_interval_of_the_differences():
    a, b = [0.62, 0.60, 0.65], [0.60, 0.61, 0.62]
    d = [100 * (x - y) for x, y in zip(a, b, strict=True)]
    mean = sum(d) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    half = stats.t.ppf(0.975, 2) * sd / math.sqrt(3)
    gap = paired_gap(a, b, margin=1.0)
    assert gap.mean == pytest.approx(mean)
    assert (gap.low, gap.high) == pytest.approx((mean - half, mean + half))
    assert gap.shown() == f"{mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}] (n=3)"


def test_scale_and_margin_decide_the_verdict():
    tight = paired_gap([1.001, 1.002, 1.0015], [1.0, 1.0, 1.0], margin=1.0)
    assert tight.verdict == "equivalent"  # +0.15 points, well inside +-1
    as_fraction = paired_gap([1.001, 1.002, 1.0015], [1.0, 1.0, 1.0], margin=1.0, scale=1.0)
    assert as_fraction.verdict == "equivalent" and as_fraction.mean == pytest.approx(0.0015)
    clear = paired_gap([0.70, 0.72, 0.71], [0.60, 0.61, 0.60], margin=1.0)
    assert clear.verdict == "better" and clear.low > 0
    one = paired_gap([0.7], [0.6], margin=1.0)
    assert one.verdict == "inconclusive" and one.shown() == "+10.00 (n=1)"
