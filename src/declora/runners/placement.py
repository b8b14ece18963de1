"""Which configs can run as one process per peer. Kept light (no model libraries), so
`declora launch` asks it before starting any process."""

from __future__ import annotations

from declora.algorithms.registry import algorithm_class
from declora.config.schema import RunConfig


def simulation_only(cfg: RunConfig) -> str:
    """Why this config cannot run as one process per peer, or ''. Only the baselines that
    need no network (centralized training, local-only peers) are refused: they would only
    waste processes; run them with `declora run`."""
    algorithm = algorithm_class(cfg.algorithm.name)
    if algorithm.single_process:
        return (
            f"algorithm.name={cfg.algorithm.name} needs no network (one model, or peers that "
            "never talk)"
        )
    return ""


def refusal(cfg: RunConfig, world: int | None) -> str:
    """Why `world` processes cannot run this config as one process per peer, or ''. The
    launcher asks it too (world None where machines may start different numbers), so a
    wrong count stops before any process starts."""
    if world is not None and cfg.topology.peers != world:
        return (
            f"topology.peers={cfg.topology.peers} but {world} processes were started; "
            "start one process per peer (torchrun --nproc-per-node / --nnodes)"
        )
    if simulation_only(cfg):
        return f"{simulation_only(cfg)}: run it with `declora run` (no torchrun)"
    return ""
