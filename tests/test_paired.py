"""The shared paired-gap statistics every results table decides with."""

import math

import pytest
from scipy import stats

from declora.reporting.paired import gap_from_summary, paired_gap


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


def test_a_summary_gives_the_same_gap_as_its_pairs():
    a, b = [0.62, 0.60, 0.65], [0.60, 0.61, 0.62]
    d = [100 * (x - y) for x, y in zip(a, b, strict=True)]
    mean = sum(d) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    got, want = gap_from_summary(mean, sd, 3, margin=1.0), paired_gap(a, b, margin=1.0)
    assert (got.mean, got.low, got.high) == pytest.approx((want.mean, want.low, want.high))
    assert (got.n, got.verdict) == (want.n, want.verdict)
    # the iid row of the short-budget table: -0.7 +- 3.4 over 3 seeds spans +-8.4 points
    iid = gap_from_summary(-0.7, 3.4, 3, margin=1.0)
    assert iid.verdict == "inconclusive" and iid.high - iid.low == pytest.approx(16.9, abs=0.1)
    assert gap_from_summary(-16.0, 2.6, 3, margin=1.0).verdict == "worse"
    assert gap_from_summary(0.1, 0.2, 1, margin=1.0).verdict == "inconclusive"
