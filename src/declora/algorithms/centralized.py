"""Centralized LoRA: one model on the pooled data with the network's total batch (n x b), the
reference Dec-LoRA is measured against. Nothing is sent."""

from __future__ import annotations

import numpy as np

from declora.algorithms.base import Algorithm
from declora.algorithms.registry import register
from declora.engine.plan import Plan
from declora.network.schedules import Schedule
from declora.network.topology import Topology


@register
class Centralized(Algorithm):
    name = "centralized"
    label = "Centralized LoRA"
    gossips = False
    single_process = True

    def plan(
        self,
        topology: Topology,
        parts: list[np.ndarray],
        batch_size: int,
        schedule: Schedule | None = None,
    ) -> Plan:
        """One peer holding every peer's data; no offline rounds or stragglers."""
        n = len(parts)
        pooled = np.sort(np.concatenate(parts))
        return Plan(self, [pooled], np.eye(1), batch_size * n, np.zeros(1), np.ones(1))
