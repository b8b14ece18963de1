"""The gossip step in simulation: every peer's tensors become W times the stacked tensors.

Row i of W holds peer i's weights over itself and its neighbours, so `W @ X` is what each peer
would compute after receiving its neighbours' values. Also the quantities that describe how far
the peers are from agreeing.
"""

from __future__ import annotations

import numpy as np
import torch

from declora.model.adapters import PLAIN_LEAVES
from declora.network.health import MessageGuard, nonfinite_rows
from declora.network.mixing import mix_rows

BYTES_PER_VALUE = 4  # fp32 on the wire


class SimulatedGossip:
    """Mixes stacked tensors ([n, ...]) with a doubly stochastic matrix; `set_mixing` swaps in
    the matrix of the next round (dynamic networks)."""

    #: fp32 messages: the loop counts their bytes from the plan
    last_bytes: np.ndarray | None = None

    def __init__(self, mixing: np.ndarray, on_failure: str = "error") -> None:
        self.n = mixing.shape[0]
        self.guard = MessageGuard(on_failure)  # refuses non-finite values as real peers do
        self.set_mixing(mixing)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}  # stateless: the matrix is a function of the round

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"unexpected keys {sorted(state)[:3]} in a plain gossip state")

    def set_mixing(self, mixing: np.ndarray) -> None:
        if mixing.shape != (self.n, self.n):
            raise ValueError(f"expected a {self.n} x {self.n} mixing matrix, got {mixing.shape}")
        self.identity = bool(np.allclose(mixing, np.eye(self.n)))
        self.mixing = np.array(mixing, dtype=np.float64)
        self.W = torch.tensor(mixing, dtype=torch.float32)  # a copy: W may be read-only
        if self.n > 256 and float((mixing != 0).mean()) < 0.1:
            self.W = self.W.to_sparse()

    def mix(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.identity:
            return values
        bad = nonfinite_rows(values)
        W = self.guard.mixing(self.mixing, bad)  # raises on `bad` with on_failure=error
        if W is self.mixing:
            return {k: mix_rows(self.W, v) for k, v in values.items()}
        return _mix_refusing(W, values, sorted(bad))


def _mix_refusing(
    W: np.ndarray, values: dict[str, torch.Tensor], bad: list[int]
) -> dict[str, torch.Tensor]:
    """W @ X after some peers were dropped (their weights are 0 in W): a refused peer's
    values must not reach anyone through the product (0 x NaN = NaN), only its own row."""
    Wt = torch.tensor(W, dtype=torch.float32)
    rows = torch.tensor(bad, dtype=torch.long)
    out = {}
    for k, v in values.items():
        clean = v.clone()
        clean[rows] = 0
        mixed = mix_rows(Wt, clean)
        if len(bad):  # a peer that sent garbage still mixes its own values, like a real one
            mixed[rows] = mix_rows(Wt[rows], v)
        out[k] = mixed
    return out


def consensus_distance(
    values: dict[str, torch.Tensor], lora_modules: tuple[str, ...], scale: float = 1.0
) -> float:
    """sqrt(mean_i sum_layers ||s B_i A_i - mean_j s B_j A_j||_F^2): disagreement of the peers'
    weight updates, which is what the factors' product (times LoRA's scale s = alpha / r)
    changes in the model. Without s, disagreement at small r would be understated by the
    ratio of the scales.

    Other PEFT methods' tensors (DoRA magnitudes, IA3 vectors, prompt embeddings: keys whose
    leaf is in `PLAIN_LEAVES`) add their plain distance sum ||x_i - mean_j x_j||^2 the same way;
    the head never counts."""
    total = 0.0
    for name in lora_modules:
        a, b = values[f"{name}.lora_A"], values[f"{name}.lora_B"]
        prod = scale * torch.bmm(b.float(), a.float())
        total += float((prod - prod.mean(dim=0, keepdim=True)).pow(2).sum()) / a.shape[0]
    for k, v in values.items():
        if k.rpartition(".")[2] in PLAIN_LEAVES:
            x = v.float()
            total += float((x - x.mean(dim=0, keepdim=True)).pow(2).sum()) / x.shape[0]
    return total**0.5


def values_per_peer(values: dict[str, torch.Tensor]) -> int:
    """How many numbers one peer sends to one neighbour per round."""
    return sum(int(v[0].numel()) for v in values.values())
