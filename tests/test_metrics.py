"""Metrics against small hand-computed cases."""

from __future__ import annotations

import json

import numpy as np
import pytest

from declora.tasks.metrics import classification_metrics


def test_accuracy_and_macro_f1_hand_computed():
    labels = np.array([0, 0, 1, 1, 2, 2])
    preds = np.array([0, 1, 1, 1, 2, 0])
    m = classification_metrics(preds, labels, 3)
    assert m["accuracy"] == pytest.approx(4 / 6)
    # class 0: P=1/2 R=1/2 F1=1/2; class 1: P=2/3 R=1 F1=4/5; class 2: P=1 R=1/2 F1=2/3
    assert m["macro_f1"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)
    assert "f1" not in m


def test_macro_f1_counts_a_never_predicted_class_as_zero():
    labels = np.array([0, 1, 2, 2])
    preds = np.array([0, 1, 1, 1])
    m = classification_metrics(preds, labels, 3)
    # class 0: F1=1; class 1: P=1/3 R=1 F1=1/2; class 2: never predicted -> 0
    assert m["macro_f1"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert m["accuracy"] == pytest.approx(0.5)


def test_macro_f1_includes_classes_absent_from_both():
    m = classification_metrics(np.array([0, 1]), np.array([0, 1]), 4)
    assert m["accuracy"] == 1.0
    assert m["macro_f1"] == pytest.approx(2 / 4)


def test_binary_f1_is_positive_class_one():
    labels = np.array([1, 1, 1, 0, 0])
    preds = np.array([1, 1, 0, 1, 0])
    m = classification_metrics(preds, labels, 2, binary_f1=True)
    # positive class: TP=2 FP=1 FN=1 -> P=R=2/3 -> F1=2/3
    assert m["f1"] == pytest.approx(2 / 3)
    # class 0: TP=1 FP=1 FN=1 -> F1=1/2
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert m["accuracy"] == pytest.approx(3 / 5)


def test_binary_f1_zero_when_positive_never_predicted():
    m = classification_metrics(np.zeros(4, int), np.array([0, 1, 0, 1]), 2, binary_f1=True)
    assert m["f1"] == 0.0


def test_values_are_plain_floats():
    m = classification_metrics(np.array([0, 1]), np.array([0, 0]), 2, binary_f1=True)
    assert all(type(v) is float for v in m.values())
    json.dumps(m)


def test_mismatched_lengths_rejected():
    with pytest.raises(ValueError, match="same length"):
        classification_metrics(np.array([0, 1]), np.array([0]), 2)


def test_binary_f1_needs_two_classes():
    with pytest.raises(ValueError, match="2-class"):
        classification_metrics(np.array([0, 1]), np.array([0, 2]), 3, binary_f1=True)
