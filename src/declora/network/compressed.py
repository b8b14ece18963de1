"""Gossip with compressed messages, simulated on stacked tensors ([n, ...]).

Two schemes share the contract of `declora.network.simulated.SimulatedGossip.mix`, plus exact
byte accounting (`last_bytes`) and checkpointable state:

* `CompressedGossip`: every peer sends a compressed copy of its value (optionally with error
  feedback) and mixes its own exact value with what it decoded from its neighbours.
* `ChocoGossip`: peers send compressed *differences* to public copies, so the message size in
  information terms shrinks as the peers agree (Koloskova et al., 2019).

Row i of W is peer i's weights over itself and the peers it receives from; column i lists the
peers that receive peer i's messages (the same peers when W is symmetric, as the topology module
builds it; a one-peer exponential graph is not). `set_mixing` swaps in the matrix of the next
round (dynamic networks) and keeps the generators and the per-tensor memory.
Every peer draws its stochastic rounding from its own generator, seeded by (seed, peer), in a
fixed order (tensors in dict order): a run is reproducible for a seed, and a peer running in its
own process (`declora.network.distributed`) draws exactly the same numbers as in simulation.
"""

from __future__ import annotations

import numpy as np
import torch

from declora.errors import ConfigError, TopologyError
from declora.network.compress import Compressor
from declora.network.health import refusal
from declora.network.mixing import choco_step, mix_with_own_exact

_GENERATOR_KEY = "generator"
_OVERFLOW = (
    "a finite value overflowed its wire format (fp16 holds at most 65504: use comm.half=bf16 "
    "or more comm.bits)"
)


def peer_generator(seed: int, peer: int) -> torch.Generator:
    """The generator peer `peer` uses for stochastic rounding: independent across peers and the
    same whether the peer is simulated or runs in its own process."""
    state = np.random.SeedSequence([int(seed), int(peer)]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2**63 - 1))


class _GossipBase:
    """The parts both schemes share: the matrix, who talks to whom, the RNG and byte counts."""

    _state_prefix = "state"

    def __init__(self, mixing: np.ndarray, compressor: Compressor, seed: int) -> None:
        mixing = np.asarray(mixing, dtype=np.float64)
        if mixing.ndim != 2 or mixing.shape[0] != mixing.shape[1] or mixing.shape[0] == 0:
            raise TopologyError(
                f"mixing matrix has shape {mixing.shape}; it must be square, one row per peer"
            )
        self.n = mixing.shape[0]
        self.own_index = torch.arange(self.n)  # each peer's own message: its own row
        self.compressor = compressor
        self.set_mixing(mixing)
        self.seed = seed
        self.generators = [peer_generator(seed, i) for i in range(self.n)]
        self.last_bytes = np.zeros(self.n, dtype=np.int64)
        self._memory: dict[str, torch.Tensor] = {}  # residuals or public copies, per tensor

    def set_mixing(self, mixing: np.ndarray) -> None:
        """Use this matrix from the next `mix` on; memory and generators carry over."""
        mixing = np.asarray(mixing, dtype=np.float64)
        if mixing.shape != (self.n, self.n):
            raise TopologyError(
                f"mixing matrix has shape {mixing.shape}; expected {self.n} x {self.n}"
            )
        self.W = torch.tensor(mixing, dtype=torch.float32)
        self.self_weight = torch.tensor(np.diag(mixing), dtype=torch.float32)
        off_diagonal = (mixing != 0) & ~np.eye(self.n, dtype=bool)
        # How many peers receive each peer's packet (column i); 0: it sends nothing.
        self.degree = off_diagonal.sum(axis=0).astype(np.int64)
        self.senders = [i for i in range(self.n) if self.degree[i] > 0]
        # Peers that receive nothing keep their exact value.
        self.isolated = torch.as_tensor(~off_diagonal.any(axis=1))

    def _memory_for(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The per-tensor state (zeros at first); it must keep the tensor's shape across rounds."""
        mem = self._memory.get(name)
        if mem is None:
            mem = torch.zeros_like(x)
            self._memory[name] = mem
        elif mem.shape != x.shape:
            raise ValueError(
                f"tensor {name!r} changed shape from {tuple(mem.shape)} to {tuple(x.shape)}"
            )
        return mem.to(x.device)

    def _send(self, value: torch.Tensor, peer: int, sent: np.ndarray) -> torch.Tensor:
        """Encode one peer's tensor, count its bytes once per neighbour, return what they see."""
        packet = self.compressor.encode(value, self.generators[peer])
        sent[peer] += packet.nbytes() * int(self.degree[peer])
        decoded = self.compressor.decode(packet).to(value.device)
        if not bool(torch.isfinite(decoded).all()):  # what a real peer refuses to mix
            if bool(torch.isfinite(value).all()):
                raise refusal(self.W, peer, ["a compressed tensor"], hint=_OVERFLOW)
            raise refusal(self.W, peer, ["a compressed tensor"])
        return decoded

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Generator states plus per-tensor memory, all as tensors (safe for safetensors)."""
        state = {f"{_GENERATOR_KEY}.{i}": g.get_state() for i, g in enumerate(self.generators)}
        for name, mem in self._memory.items():
            state[f"{self._state_prefix}.{name}"] = mem.detach().cpu().clone()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what `state_dict` saved, so a resumed run continues bit for bit."""
        memory: dict[str, torch.Tensor] = {}
        prefix = f"{self._state_prefix}."
        for key, value in state.items():
            if key.startswith(f"{_GENERATOR_KEY}."):
                peer = int(key.rpartition(".")[2])
                if not 0 <= peer < self.n:
                    raise ValueError(f"state holds a generator for peer {peer} of {self.n}")
                self.generators[peer].set_state(value.to(torch.uint8).cpu())
                continue
            if not key.startswith(prefix):
                raise ValueError(f"unexpected key {key!r} in a {type(self).__name__} state")
            memory[key[len(prefix) :]] = value.detach().to(torch.float32).clone()
        self._memory = memory


class CompressedGossip(_GossipBase):
    """Each peer sends one compressed packet of each of its tensors; every neighbour decodes it.

    A peer mixes its own EXACT value with its neighbours' decoded values:
    x_i <- W_ii x_i + sum_{j != i} W_ij dec(enc(x_j)).

    With error feedback a peer sends enc(x_i + e_i) and keeps e_i <- (x_i + e_i) - dec(...), so
    what it fails to send one round is sent later instead of being lost; its own value in the
    mix stays the exact x_i.
    """

    _state_prefix = "residual"

    def __init__(
        self,
        mixing: np.ndarray,
        compressor: Compressor,
        *,
        error_feedback: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(mixing, compressor, seed)
        self.error_feedback = error_feedback

    def decode_all(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What every peer's neighbours decode from its packets (error feedback applied; a peer
        that sends nothing keeps its own value): the block a combine rule reads."""
        sent = np.zeros(self.n, dtype=np.int64)
        out = {}
        for name, v in values.items():
            x = v.detach().to(torch.float32)
            decoded = x.clone()  # isolated peers keep their exact value here
            residual = self._memory_for(name, x) if self.error_feedback else None
            for i in self.senders:
                message = x[i] + residual[i] if residual is not None else x[i]
                decoded[i] = self._send(message, i, sent)
                if residual is not None:
                    residual[i] = message - decoded[i]
            if residual is not None:
                self._memory[name] = residual
            out[name] = decoded
        self.last_bytes = sent
        return out

    def mix(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name, decoded in self.decode_all(values).items():
            v = values[name]
            x = v.detach().to(torch.float32)
            mixed = mix_with_own_exact(self.W, self.self_weight, x, decoded, self.own_index)
            alone = self.isolated.to(x.device)
            mixed[alone] = x[alone]
            out[name] = mixed.to(v.dtype)
        return out


class ChocoGossip(_GossipBase):
    """CHOCO-gossip (Koloskova et al. 2019): every peer keeps public copies xhat_j of itself and
    its neighbours; per round q_i = enc(x_i - xhat_i) is sent, everyone updates xhat_i +=
    dec(q_i), then x_i <- x_i + gamma * sum_j W_ij (xhat_j - xhat_i). Compressed differences
    shrink as peers agree, so quantization noise vanishes at consensus instead of stalling it.

    xhat starts at zeros, so the first rounds send the values themselves. With W symmetric and
    doubly stochastic, the network average of x is preserved every round for any compressor.
    """

    _state_prefix = "xhat"

    def __init__(
        self,
        mixing: np.ndarray,
        compressor: Compressor,
        *,
        gamma: float = 0.5,
        seed: int = 0,
    ) -> None:
        ok = isinstance(gamma, int | float) and not isinstance(gamma, bool) and 0 < gamma <= 1
        if not ok:
            raise ConfigError(f"comm.gamma={gamma!r} is not supported; choose a value in (0, 1]")
        super().__init__(mixing, compressor, seed)
        self.gamma = float(gamma)

    def mix(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        sent = np.zeros(self.n, dtype=np.int64)
        out = {}
        for name, v in values.items():
            x = v.detach().to(torch.float32)
            xhat = self._memory_for(name, x)
            for i in self.senders:
                xhat[i] += self._send(x[i] - xhat[i], i, sent)
            self._memory[name] = xhat
            mixed = choco_step(self.W, x, xhat, self.own_index, self.gamma)
            alone = self.isolated.to(x.device)
            mixed[alone] = x[alone]
            out[name] = mixed.to(v.dtype)
        self.last_bytes = sent
        return out
