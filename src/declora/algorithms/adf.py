"""ADF-LoRA (arXiv 2511.18291): train only A or only B, alternating every `algorithm.period`
rounds, and mix both factors every round (so peers stay in the same phase state)."""

from __future__ import annotations

from typing import Literal

from declora.algorithms.base import Algorithm
from declora.algorithms.registry import register


def adf_phase(round: int, period: int, start: Literal["A", "B"] = "B") -> Literal["A", "B"]:
    """Which factor trains in `round` (rounds start at 1): `start` for rounds 1..period, the
    other one for the next `period` rounds, and so on.

    B trains first by default: B starts at 0, so the gradient of A (which is B^T times the
    output gradient) is exactly 0 until B moves; an A-first phase would only apply weight decay.
    B-first is LoRA's own init logic: A is a fixed random projection while B learns."""
    if isinstance(round, bool) or not isinstance(round, int) or round < 1:
        raise ValueError(f"rounds are numbered from 1; got {round!r}")
    if isinstance(period, bool) or not isinstance(period, int) or period < 1:
        raise ValueError(f"algorithm.period must be an integer >= 1; got {period!r}")
    if start not in ("A", "B"):
        raise ValueError(f"algorithm.adf_start must be 'A' or 'B'; got {start!r}")
    other: Literal["A", "B"] = "A" if start == "B" else "B"
    return start if ((round - 1) // period) % 2 == 0 else other


@register
class ADF(Algorithm):
    name = "adf"
    label = "ADF-LoRA"
    needs_lora_factors = True

    def trainable(self, round: int) -> frozenset[str]:
        a = self.cfg.algorithm
        return frozenset({f"lora_{adf_phase(round, a.period, a.adf_start)}"})

    def stale_optimizer_state(self, round: int) -> frozenset[str]:
        """The factor that resumes training: its momentum is from its last phase, taken on a
        model that has moved since (the other factor trained, peers mixed), so it would push
        in a stale direction; it restarts from zero, as at the first phase."""
        if round == 1:
            return frozenset()
        now, before = self.trainable(round), self.trainable(round - 1)
        return now - before
