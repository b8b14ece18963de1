"""Partition schemes: coverage, disjointness, skew, determinism and every user error."""

from __future__ import annotations

import json

import numpy as np
import pytest

from declora.data.partition import SCHEMES, label_counts, partition, skew_summary
from declora.errors import PartitionError

PAPER_PROPORTIONS = [[0.15, 0.85], [0.85, 0.15], [0.5, 0.5]]


def _labels(n: int = 600, num_classes: int = 3, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, num_classes, size=n)


def _kwargs(scheme: str, labels: np.ndarray, n_peers: int) -> dict:
    """Scheme-specific arguments that make every scheme valid on ``labels``."""
    num_classes = int(labels.max()) + 1
    if scheme == "label-skew":
        return {"proportions": [[1 / num_classes] * num_classes] * n_peers}
    if scheme == "natural":
        return {"groups": np.arange(len(labels)) % (3 * n_peers)}
    return {}


def _assert_disjoint(parts: list[np.ndarray]) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined))


def _mean_tv(labels: np.ndarray, alpha: float, seeds=range(5)) -> float:
    tvs = []
    for seed in seeds:
        parts = partition(labels, 8, "dirichlet", alpha=alpha, seed=seed)
        tvs.append(skew_summary(label_counts(labels, parts, 3))["mean_tv_distance"])
    return float(np.mean(tvs))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_scheme_gives_sorted_disjoint_int64_parts(scheme):
    labels = _labels()
    parts = partition(labels, 4, scheme, seed=3, **_kwargs(scheme, labels, 4))
    assert len(parts) == 4
    for part in parts:
        assert part.dtype == np.int64
        assert len(part) > 0
        assert np.all(np.diff(part) > 0)
        assert part.min() >= 0 and part.max() < len(labels)
    _assert_disjoint(parts)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "natural", "quantity"])
def test_covering_schemes_use_every_example_once(scheme):
    labels = _labels()
    parts = partition(labels, 5, scheme, seed=0, **_kwargs(scheme, labels, 5))
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))


def test_iid_sizes_differ_by_at_most_one():
    sizes = [len(p) for p in partition(_labels(103), 4, "iid")]
    assert sum(sizes) == 103 and max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("scheme", SCHEMES)
def test_same_seed_same_partition_other_seed_different(scheme):
    labels = _labels()
    kw = _kwargs(scheme, labels, 4)
    a = partition(labels, 4, scheme, seed=7, **kw)
    b = partition(labels, 4, scheme, seed=7, **kw)
    c = partition(labels, 4, scheme, seed=8, **kw)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_dirichlet_skew_grows_as_alpha_falls():
    labels = _labels(3000)
    high, mid, low = _mean_tv(labels, 100.0), _mean_tv(labels, 1.0), _mean_tv(labels, 0.1)
    assert high < 0.1
    assert high < mid < low
    assert low > 0.4


@pytest.mark.parametrize(("scheme", "alpha"), [("dirichlet", 0.3), ("quantity", 2.0)])
def test_min_size_is_honoured(scheme, alpha):
    labels = _labels(400)
    for seed in range(5):
        parts = partition(labels, 8, scheme, alpha=alpha, min_size=20, seed=seed)
        assert min(len(p) for p in parts) >= 20
    # the floor matters: without it some draws leave a peer below 20
    loose = [partition(labels, 8, scheme, alpha=alpha, min_size=0, seed=s) for s in range(20)]
    assert min(len(p) for parts in loose for p in parts) < 20


def test_quantity_skews_sizes_not_labels():
    labels = _labels(4000)
    counts = label_counts(labels, partition(labels, 4, "quantity", alpha=0.5, seed=2), 3)
    summary = skew_summary(counts)
    assert summary["max_peer_size"] > 2 * summary["min_peer_size"]
    assert summary["mean_tv_distance"] < 0.1


def test_label_skew_reproduces_paper_proportions_and_drops_the_rest():
    labels = np.repeat([0, 1], [300, 260])
    parts = partition(labels, 3, "label-skew", proportions=PAPER_PROPORTIONS, seed=0)
    counts = label_counts(labels, parts, 2)
    sizes = counts.sum(axis=1)
    assert len(set(sizes.tolist())) == 1  # all peers the same size
    s = int(sizes[0])
    # class 1 is the scarcer: 1.5 * s of it are needed, so s = 260 // 1.5 = 173
    assert s == 173
    for row, props in zip(counts, PAPER_PROPORTIONS, strict=True):
        assert np.all(np.abs(row - np.array(props) * s) <= 1)  # within rounding
    assert counts.sum() == 3 * s < len(labels)  # the rest is dropped
    assert np.all(counts.sum(axis=0) <= [300, 260])
    _assert_disjoint(parts)


def test_label_skew_zero_share_gives_single_class_peer():
    labels = _labels(300, num_classes=2)
    parts = partition(labels, 2, "label-skew", proportions=[[1.0, 0.0], [0.0, 1.0]])
    assert set(labels[parts[0]].tolist()) == {0}
    assert set(labels[parts[1]].tolist()) == {1}


def test_natural_keeps_each_group_on_one_peer_and_balances():
    rng = np.random.default_rng(0)
    groups = np.array([f"topic{g}" for g in rng.integers(0, 12, size=500)])
    labels = _labels(500)
    parts = partition(labels, 3, "natural", groups=groups, seed=4)
    owners = [set(groups[p].tolist()) for p in parts]
    assert all(not (owners[i] & owners[j]) for i in range(3) for j in range(i + 1, 3))
    assert set().union(*owners) == set(groups.tolist())
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= np.bincount(rng.integers(0, 12, size=500)).max()


def test_label_counts_and_skew_summary_values():
    labels = np.array([0, 0, 1, 1, 2, 2])
    parts = [np.array([0, 1]), np.array([2, 3, 4, 5])]
    counts = label_counts(labels, parts, 3)
    assert counts.tolist() == [[2, 0, 0], [0, 2, 2]]
    assert counts.dtype == np.int64
    summary = skew_summary(counts)
    json.dumps(summary)
    assert summary["min_peer_size"] == 2 and summary["max_peer_size"] == 4
    # peer 0: (1,0,0) vs (1/3,1/3,1/3) -> TV 2/3; peer 1: (0,.5,.5) -> TV 1/3
    assert summary["mean_tv_distance"] == pytest.approx(0.5)
    assert summary["max_tv_distance"] == pytest.approx(2 / 3)
    assert summary["min_classes_per_peer"] == 1


def test_iid_summary_has_little_skew():
    labels = _labels(3000)
    counts = label_counts(labels, partition(labels, 5, "iid"), 3)
    assert skew_summary(counts)["mean_tv_distance"] < 0.05


# --------------------------------------------------------------------------- errors


def _raises(match: str, *args, **kwargs) -> None:
    with pytest.raises(PartitionError, match=match):
        partition(*args, **kwargs)


def test_error_n_peers_below_one():
    _raises("n_peers must be an integer >= 1", _labels(), 0, "iid")


def test_error_unknown_scheme_lists_schemes():
    _raises(r"unknown partition scheme 'shards'; accepted: iid, dirichlet", _labels(), 2, "shards")


def test_error_fewer_examples_than_peers():
    _raises("12 examples cannot be split over 20 peers", _labels(12), 20, "iid")


@pytest.mark.parametrize("alpha", [0, -1.0])
def test_error_alpha_not_positive(alpha):
    _raises("alpha must be > 0", _labels(), 2, "dirichlet", alpha=alpha)


def test_error_negative_min_size():
    _raises("min_size must be >= 0", _labels(), 2, "dirichlet", min_size=-1)


def test_error_dirichlet_cannot_meet_min_size_suggests_larger_alpha():
    labels = _labels(200)
    _raises(r"peer \d+ only .* larger alpha", labels, 10, "dirichlet", alpha=0.01, min_size=15)


def test_error_min_size_impossible_for_data_size():
    _raises("min_size=30 over 10 peers needs 300", _labels(200), 10, "quantity", min_size=30)


def test_error_peer_left_without_data_is_named():
    labels = np.array([0] * 10 + [2])  # class 1 never occurs
    _raises(
        "label-skew partition left peer 0 with no data",
        labels,
        2,
        "label-skew",
        proportions=[[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]],
    )


def test_error_label_skew_missing_proportions():
    _raises("needs proportions", _labels(), 3, "label-skew")


def test_error_label_skew_wrong_rows():
    _raises(
        "must have 2 rows .* and 3 columns .* got shape 3x3",
        _labels(),
        2,
        "label-skew",
        proportions=[[1 / 3] * 3] * 3,
    )


def test_error_label_skew_wrong_columns_names_both():
    _raises(
        r"3 rows \(one per peer\) and 2 columns \(one per class\); got shape 3x3",
        _labels(num_classes=2),
        3,
        "label-skew",
        proportions=[[1 / 3] * 3] * 3,
    )


def test_error_label_skew_negative_value():
    _raises(
        "must be finite and >= 0",
        _labels(num_classes=2),
        2,
        "label-skew",
        proportions=[[1.2, -0.2], [0.5, 0.5]],
    )


def test_error_label_skew_row_not_summing_to_one():
    _raises(
        "row 1 sums to 0.9",
        _labels(num_classes=2),
        2,
        "label-skew",
        proportions=[[0.5, 0.5], [0.5, 0.4]],
    )


def test_error_natural_without_groups():
    _raises("natural partition needs groups", _labels(), 2, "natural")


def test_error_natural_groups_wrong_length():
    _raises("one value per example \\(600\\)", _labels(), 2, "natural", groups=np.zeros(5))


def test_error_natural_fewer_groups_than_peers_says_how_many():
    groups = np.arange(600) % 3
    _raises("there are 3 groups for 4 peers", _labels(), 4, "natural", groups=groups)
