"""The Dec-LoRA family, one file per algorithm; each registers itself on import.

To add one: a file with an `Algorithm` subclass decorated with `@register`, and its import
line below. Nothing else changes: the config check, the plan, the communicator choice, the
report labels and the CLI help all read the registry."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from declora.algorithms import (  # noqa: F401
    adf,
    centralized,
    dec_lora,
    decaf,
    fedavg,
    fedsa,
    ffa,
    local_only,
)
from declora.algorithms.base import Algorithm
from declora.algorithms.registry import algorithm_class, label, make_algorithm, names

if TYPE_CHECKING:
    from declora.engine.plan import Plan
    from declora.network.schedules import Schedule
    from declora.network.topology import Topology

__all__ = ["Algorithm", "algorithm_class", "label", "make_algorithm", "make_plan", "names"]


def make_plan(
    name: str,
    topology: Topology,
    parts: list[np.ndarray],
    batch_size: int,
    weighting: str = "uniform",
    *,
    schedule: Schedule | None = None,
    period: int = 6,
    adf_start: str = "B",
) -> Plan:
    """A plan without a whole config (tests, notebooks): the named algorithm with these
    settings and every other key at its default."""
    from declora.config.schema import RunConfig

    cfg = RunConfig.model_validate(
        {
            "algorithm": {"name": name, "period": period, "adf_start": adf_start},
            "train": {"peer_weighting": weighting},
        }
    )
    return make_algorithm(name, cfg).plan(topology, parts, batch_size, schedule)
