"""The frozen base model's own dropout (`model.dropout`).

Engines train with the base model in train mode, so a pretrained model's dropout (MiniLM: 0.1
on hidden states and attention probabilities) is active unless it is set here. Dropout masks
come from the process's random stream, which differs between a simulation (all peers in one
stream) and real peers (one stream each): only with dropout 0 can the two end equal."""

from __future__ import annotations

from torch import nn


def set_dropout(model: nn.Module, p: float | None) -> int:
    """Set every dropout of `model` to `p` (None: leave the model's own); returns how many
    dropout sites were set. Covers `nn.Dropout` modules (BERT's hidden, attention and
    classifier dropout) and attention modules that keep their rate as a float
    (`attention_dropout`, as Llama does)."""
    if p is None:
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = float(p)
            count += 1
        elif isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = float(p)
            count += 1
    return count
