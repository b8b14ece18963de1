"""Turning texts into model features once, before training (never inside the step loop)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from declora.tasks.task import Example


def tokenize_classification(
    tokenizer: Any,
    texts: Sequence[str],
    pairs: Sequence[str] | None,
    labels: np.ndarray,
    max_length: int,
) -> tuple[list[Example], int]:
    """Features per example (unpadded) and how many examples were cut at max_length."""
    pair_list = list(pairs) if pairs is not None else None
    enc = dict(tokenizer(list(texts), pair_list, truncation=False))
    long = [i for i, ids in enumerate(enc["input_ids"]) if len(ids) > max_length]
    if long:
        cut_pairs = [pair_list[i] for i in long] if pair_list is not None else None
        redo = tokenizer(
            [texts[i] for i in long], cut_pairs, truncation=True, max_length=max_length
        )
        for key in enc:
            for j, i in enumerate(long):
                enc[key][i] = redo[key][j]
    cut = len(long)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    examples = [
        {**{k: enc[k][i] for k in keys}, "label": int(labels[i])} for i in range(len(labels))
    ]
    return examples, cut
