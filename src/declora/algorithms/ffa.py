"""FFA-LoRA (and ConLoRA in the decentralized setting): A stays at the common init, only B
trains and only B is sent. With every A equal, averaging B is averaging the products exactly,
at half the bytes."""

from __future__ import annotations

from collections.abc import Iterable

from declora.algorithms.base import Algorithm
from declora.algorithms.registry import register
from declora.network.mixing import factor_of


@register
class FFA(Algorithm):
    name = "ffa"
    label = "FFA-LoRA"
    needs_lora_factors = True

    def trainable(self, round: int) -> frozenset[str]:
        return frozenset({"lora_B"})

    def sent_keys(self, keys: Iterable[str]) -> set[str]:
        """No A: every peer's A is the common init, equal everywhere, so mixing it is a no-op."""
        return {k for k in keys if factor_of(k) != "lora_A"}
