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


class PoissonSampler:
    """Poisson sampling for DP-SGD: each of a peer's examples joins a step independently with
    probability `sample_rate`, so batch sizes vary (and may be 0). This is the sampling that
    Opacus' RDP and PRV accountants assume; seeded by (seed, peer) like `PeerSampler`."""

    def __init__(self, indices: np.ndarray, sample_rate: float, seed: int, peer: int) -> None:
        if len(indices) == 0:
            raise ValueError(f"peer {peer} has no data")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample rate must be in (0, 1], got {sample_rate}")
        self.indices = np.asarray(indices, dtype=np.int64)
        self.sample_rate = float(sample_rate)
        self.rng = np.random.default_rng([seed, peer])

    def next(self) -> np.ndarray:
        return self.indices[self.rng.random(len(self.indices)) < self.sample_rate]

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]


def make_sampler(
    indices: np.ndarray, batch_size: int, seed: int, peer: int, *, poisson: bool = False
) -> PeerSampler | PoissonSampler:
    """A peer's sampler: shuffled epochs of `batch_size`, or Poisson sampling at expected
    batch `batch_size` (DP-SGD)."""
    if poisson:
        return PoissonSampler(indices, min(1.0, batch_size / len(indices)), seed, peer)
    return PeerSampler(indices, batch_size, seed, peer)
