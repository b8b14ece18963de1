"""The task a model is trained on: how examples become a batch and a per-peer loss.

Engines stay task-agnostic: they hand a task the model and a peer-major batch and get back one
mean loss per peer, so the same engines serve classification and (later) causal LM.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

Example = dict[str, Any]


class ClassificationTask:
    """Sequence classification: cross-entropy on the model's logits."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def collate(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        feats = [{k: v for k, v in ex.items() if k != "label"} for ex in examples]
        batch = self.tokenizer.pad(feats, return_tensors="pt")
        batch = dict(batch)
        batch["labels"] = torch.tensor([ex["label"] for ex in examples], dtype=torch.long)
        return batch

    def logits(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return model(**inputs).logits

    def peer_losses(
        self, model: nn.Module, batch: dict[str, torch.Tensor], n_peers: int
    ) -> torch.Tensor:
        """Mean cross-entropy of each peer's rows; rows are laid out peer-major."""
        logits = self.logits(model, batch)
        per_row = F.cross_entropy(logits.float(), batch["labels"], reduction="none")
        return per_row.view(n_peers, -1).mean(dim=1)
