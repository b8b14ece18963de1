"""The evaluator's personalized score: each peer on held-out examples with its own label mix."""

from __future__ import annotations

import numpy as np
import pytest

from declora.runners.build import label_mix
from declora.tasks.evaluate import personal_accuracy


def test_personal_accuracy_weights_each_class_by_the_peers_share():
    labels = np.array([0, 0, 1, 1, 2, 2])
    preds = np.array([0, 0, 1, 0, 0, 0])  # class 0: 1.0, class 1: 0.5, class 2: 0.0
    assert personal_accuracy(preds, labels, np.array([1.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert personal_accuracy(preds, labels, np.array([0.0, 0.0, 1.0])) == pytest.approx(0.0)
    assert personal_accuracy(preds, labels, np.array([0.5, 0.5, 0.0])) == pytest.approx(0.75)
    uniform = np.full(3, 1 / 3)
    assert personal_accuracy(preds, labels, uniform) == pytest.approx(0.5)


def test_personal_accuracy_is_the_mean_accuracy_on_a_resampled_test_set():
    """Drawing a large test set class by class with the peer's mix gives the same number."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=600)
    preds = np.where(rng.random(600) < 0.3 + 0.2 * labels, labels, (labels + 1) % 3)
    mix = np.array([0.7, 0.2, 0.1])
    draws = rng.choice(3, size=200_000, p=mix)
    per_class = [np.mean(preds[labels == c] == c) for c in range(3)]
    resampled = np.mean([per_class[c] for c in draws])
    assert personal_accuracy(preds, labels, mix) == pytest.approx(resampled, abs=3e-3)


def test_classes_missing_from_the_sample_are_left_out_and_the_rest_renormalised():
    labels = np.array([0, 0, 1])
    preds = np.array([0, 1, 1])
    assert personal_accuracy(preds, labels, np.array([0.5, 0.0, 0.5])) == pytest.approx(0.5)
    assert np.isnan(personal_accuracy(preds, labels, np.array([0.0, 0.0, 1.0])))


def test_label_mix_rows_are_each_peers_proportions():
    counts = np.array([[3, 1, 0], [0, 0, 0], [1, 1, 2]])
    mix = label_mix(counts, None)
    np.testing.assert_allclose(mix[0], [0.75, 0.25, 0.0])
    np.testing.assert_allclose(mix[1], [0.0, 0.0, 0.0])
    np.testing.assert_allclose(label_mix(counts, [2]), [[0.25, 0.25, 0.5]])
    assert label_mix(np.zeros((0, 0)), None) is None
