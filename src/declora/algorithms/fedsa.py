"""FedSA-LoRA, decentralized (Guo et al., "Selective Aggregation for Low-Rank Adaptation in
Federated Learning", arXiv 2410.01463, ICLR 2025): A learns what is common to all peers and B
what is specific to each, so peers gossip A only and every peer keeps its own B.

Both factors train. A classification head follows `lora.mix_head` like every other algorithm.
The product of each peer is its personalized model: score it with the personalized metric
(`personal_accuracy`, each peer on held-out examples weighted to its own label mix); the
averaged model (mean A, mean B) is reported as for every algorithm, for comparison."""

from __future__ import annotations

from collections.abc import Iterable

from declora.algorithms.base import Algorithm
from declora.algorithms.registry import register
from declora.network.mixing import factor_of


@register
class FedSA(Algorithm):
    name = "fedsa"
    label = "FedSA-LoRA"
    needs_lora_factors = True

    def sent_keys(self, keys: Iterable[str]) -> set[str]:
        """Every tensor but B: A (shared knowledge) and, with lora.mix_head, the head."""
        return {k for k in keys if factor_of(k) != "lora_B"}
