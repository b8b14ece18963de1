"""Classification metrics, reported as plain floats so they go straight into JSON logs."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import f1_score


def classification_metrics(
    preds: np.ndarray, labels: np.ndarray, num_classes: int, *, binary_f1: bool = False
) -> dict[str, float]:
    """Accuracy and macro-F1 over all ``num_classes`` (a never-predicted class counts as 0 F1).

    With ``binary_f1`` also ``f1`` for positive class 1, the number GLUE reports for MRPC/QQP.
    """
    preds = np.asarray(preds).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if preds.shape != labels.shape:
        raise ValueError(
            f"preds and labels must have the same length; got {len(preds)} and {len(labels)}"
        )
    if len(labels) == 0:
        raise ValueError("cannot compute metrics on zero examples")
    if binary_f1 and num_classes != 2:
        raise ValueError(f"binary_f1 needs a 2-class task; num_classes is {num_classes}")
    out = {
        "accuracy": float(np.mean(preds == labels)),
        "macro_f1": float(
            f1_score(
                labels, preds, average="macro", labels=list(range(num_classes)), zero_division=0
            )
        ),
    }
    if binary_f1:
        out["f1"] = float(
            f1_score(labels, preds, average="binary", pos_label=1, labels=[0, 1], zero_division=0)
        )
    return out
