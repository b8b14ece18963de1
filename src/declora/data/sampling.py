"""Per-peer data order: each peer walks its own shuffled epochs, seeded by (seed, peer)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


class PeerSampler:
    """Yields batches of indices from one peer's data, reshuffled every epoch.

    A batch always has `batch_size` examples (it wraps into the next epoch), so every peer
    contributes the same number of rows to a batched step."""

    def __init__(self, indices: np.ndarray, batch_size: int, seed: int, peer: int) -> None:
        if len(indices) == 0:
            raise ValueError(f"peer {peer} has no data")
        self.indices = np.asarray(indices, dtype=np.int64)
        self.batch_size = batch_size
        self.rng = np.random.default_rng([seed, peer])
        self.order = self.rng.permutation(self.indices)
        self.pos = 0
        self.epoch = 0

    def next(self) -> np.ndarray:
        out = []
        need = self.batch_size
        while need:
            take = self.order[self.pos : self.pos + need]
            out.append(take)
            need -= len(take)
            self.pos += len(take)
            if self.pos == len(self.order):
                self.order = self.rng.permutation(self.indices)
                self.pos = 0
                self.epoch += 1
        return np.concatenate(out)

    def state_dict(self) -> dict[str, Any]:
        """Where this peer is in its data order (for checkpoints: tensors and plain numbers)."""
        return {
            "rng": self.rng.bit_generator.state,
            "order": torch.from_numpy(self.order.copy()),
            "pos": int(self.pos),
            "epoch": int(self.epoch),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.order = state["order"].numpy().astype(np.int64)
        self.pos = int(state["pos"])
        self.epoch = int(state["epoch"])
