"""Gossip between peers of different LoRA ranks (`lora.ranks`), in simulation.

The stacked tensors hold every peer at the largest rank R, zero beyond its own rank r_i; the
combine rule (`algorithm.hetero`) is `declora.network.mixing.hetero_block`, the same function a
peer process applies to what it received. A peer sends only its own rank's factors, so its
bytes differ from its neighbours': `bytes_per_peer` counts them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from declora.network.mixing import HeteroRule, RuleGossip, factor_of, hetero_mix

BYTES_PER_VALUE = 4  # fp32 on the wire


class HeteroGossip(RuleGossip):
    """Mixed ranks in simulation: the combine rule `algorithm.hetero` over the stacked
    tensors with the round's matrix."""

    what = "mixed-rank gossip"

    def __init__(self, mixing: np.ndarray, ranks: Sequence[int], rule: HeteroRule) -> None:
        self.ranks, self.rule = tuple(int(r) for r in ranks), rule
        self.n = len(self.ranks)
        self.set_mixing(mixing)

    def combine(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return hetero_mix(values, self.mixing, self.ranks, self.rule)


def values_at_rank(values: Mapping[str, torch.Tensor], rank: int) -> int:
    """How many numbers one peer of rank `rank` sends per copy: its factors at its own rank
    (A: rank x in, B: out x rank) and every other tensor whole. `values` is stacked ([n, ...])."""
    total = 0
    for k, v in values.items():
        leaf = factor_of(k)
        shape = v.shape[1:]
        if leaf == "lora_A":
            total += rank * int(shape[-1])
        elif leaf == "lora_B":
            total += int(shape[-2]) * rank
        else:
            total += int(v[0].numel())
    return total


def values_per_peer(values: Mapping[str, torch.Tensor], ranks: Sequence[int]) -> np.ndarray:
    """`values_at_rank` for each peer of `ranks`: [n] numbers per copy sent."""
    return np.array([values_at_rank(values, r) for r in ranks], dtype=np.float64)
