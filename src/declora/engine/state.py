"""An engine's whole training state for checkpoints: its adapters, optimizers and schedulers,
as plain tensors and numbers (saved with safetensors + JSON, never pickled)."""

from __future__ import annotations

from typing import Any

import torch

from declora.errors import CheckpointError


class TrainingState:
    """Mixin for engines: `state_dict` / `load_state_dict` over `stacked()` and the
    optimizers and schedulers that `_optimizers` names (one for all peers, or one per peer)."""

    def _optimizers(self) -> tuple[list[torch.optim.Optimizer], list[Any]]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        opts, scheds = self._optimizers()
        return {
            "values": dict(self.stacked()),  # type: ignore[attr-defined]
            "optimizers": [o.state_dict() for o in opts],
            "schedulers": [s.state_dict() for s in scheds],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        opts, scheds = self._optimizers()
        if len(opts) != len(state["optimizers"]):
            raise CheckpointError(
                f"checkpoint holds {len(state['optimizers'])} optimizers, this engine has "
                f"{len(opts)}"
            )
        self.load_stacked(state["values"])  # type: ignore[attr-defined]
        for o, s in zip(opts, state["optimizers"], strict=True):
            o.load_state_dict(s)
        for sch, s in zip(scheds, state["schedulers"], strict=True):
            sch.load_state_dict(s)
