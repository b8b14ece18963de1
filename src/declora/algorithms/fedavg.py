"""FedAvg with full participation: W = 11^T / n, an exact average of every factor after each
round (a server, or an all-reduce between real peers). It separates the cost of gossip
(Dec-LoRA vs FedAvg) from the cost of the objective (FedAvg vs centralized)."""

from __future__ import annotations

import numpy as np

from declora.algorithms.base import Algorithm, availability_only
from declora.algorithms.registry import register
from declora.engine.plan import Plan, peer_weights
from declora.network.schedules import Schedule
from declora.network.topology import Topology


@register
class FedAvg(Algorithm):
    name = "fedavg"
    label = "FedAvg"
    gossips = False
    server_average = True

    def plan(
        self,
        topology: Topology,
        parts: list[np.ndarray],
        batch_size: int,
        schedule: Schedule | None = None,
    ) -> Plan:
        """Each online peer uploads once per round; offline peers (the gossip run's) keep
        their values and the others average among themselves."""
        n = len(parts)
        W = np.full((n, n), 1.0 / n)
        avail = availability_only(schedule, W, "fedavg")
        w = peer_weights(parts, self.cfg.train.peer_weighting)
        return Plan(self, parts, W, batch_size, np.ones(n), w, avail)
