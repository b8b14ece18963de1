"""Local-only training (W = I): every peer trains on its own data and never talks. Its peers'
own models are what it produces; the averaged model is reported for comparison only."""

from __future__ import annotations

import numpy as np

from declora.algorithms.base import Algorithm, availability_only
from declora.algorithms.registry import register
from declora.engine.plan import Plan
from declora.network.schedules import Schedule
from declora.network.topology import Topology


@register
class LocalOnly(Algorithm):
    name = "local-only"
    label = "Local-only"
    gossips = False
    single_process = True

    def plan(
        self,
        topology: Topology,
        parts: list[np.ndarray],
        batch_size: int,
        schedule: Schedule | None = None,
    ) -> Plan:
        """Peers never mix, so their own objective is the only one: always uniform weights.
        The same peers are offline (and straggle) as in the gossip run."""
        n = len(parts)
        avail = availability_only(schedule, np.eye(n), "identity")
        return Plan(self, parts, np.eye(n), batch_size, np.zeros(n), np.ones(n), avail)
