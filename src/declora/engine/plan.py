"""A plan: who trains what on which data and who talks to whom, round by round.

The round loop reads only this; an algorithm (`declora.algorithms`) makes it. Every per-round
quantity is a pure function of the round (and the seed), so a resumed run, or a peer in its own
process, recomputes it instead of saving or receiving it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from declora.network.schedules import Schedule


class RoundPolicy(Protocol):
    """What the round loop asks the algorithm that made the plan."""

    name: str
    gossips: bool
    server_average: bool

    def trainable(self, round: int) -> frozenset[str]: ...
    def stale_optimizer_state(self, round: int) -> frozenset[str]: ...

    #: The stale state is that of the peers whose factors the round's mixing changed, cleared
    #: right after it (DeCAF's re-factorization), not every peer's at the round's start (ADF).
    stale_after_mixing: bool


@dataclass(frozen=True)
class Plan:
    """Without a schedule every round is the same: `mixing`, every peer online for K steps."""

    policy: RoundPolicy
    parts: list[np.ndarray]
    mixing: np.ndarray
    batch_size: int
    messages: np.ndarray  # per peer: how many copies of its values it sends each round
    weights: np.ndarray  # per peer: factor on its updates (n * its share of the data, or 1)
    schedule: Schedule | None = None  # per-round matrix, online peers and local steps

    @property
    def algorithm(self) -> str:
        return self.policy.name

    @property
    def n(self) -> int:
        return len(self.parts)

    def factors(self, t: int) -> frozenset[str]:
        """The LoRA factors that train in round t (a head, if any, always trains)."""
        return self.policy.trainable(t)

    def mixing_at(self, t: int) -> np.ndarray:
        return self.mixing if self.schedule is None else self.schedule.matrix(t)

    def local_steps(self, t: int, k: int) -> np.ndarray:
        """Local steps of each peer in round t: k, fewer for a straggler, 0 when offline."""
        if self.schedule is None:
            return np.full(self.n, k, dtype=np.int64)
        return self.schedule.local_steps(t, k)

    def messages_at(self, t: int) -> np.ndarray:
        """How many copies of its values each peer sends in round t."""
        if self.schedule is None:
            return self.messages
        if self.policy.server_average:  # every online peer uploads once
            return self.messages * self.schedule.live(t)
        return self.schedule.messages(t)

    def stale_peers(self, t: int) -> np.ndarray:
        """The peers whose optimizer state `policy.stale_optimizer_state(t)` concerns: with
        `stale_after_mixing`, those that combined with at least one neighbour in round t (the
        state is cleared right after that mixing); otherwise every peer (at the round's
        start)."""
        if not self.policy.stale_after_mixing:
            return np.ones(self.n, dtype=bool)
        W = self.mixing_at(t)
        return ((W != 0) & ~np.eye(self.n, dtype=bool)).any(axis=1)

    def one_peer(self, rank: int) -> Plan:
        """The engine's view in a one-peer process: its data share and weight only."""
        return Plan(
            self.policy,
            [self.parts[rank]],
            np.eye(1),
            self.batch_size,
            self.messages[rank : rank + 1],
            self.weights[rank : rank + 1],
        )


def peer_weights(parts: list[np.ndarray], weighting: str) -> np.ndarray:
    """Factors on each peer's updates so that the network minimises the right objective.

    With "data-size", peer i's updates are scaled by n * N_i / N: averaged over the peers, the
    gradient is then the pooled data's gradient (what centralized training follows), instead of
    the mean of the local gradients, which over-weights small peers and shifts the class prior
    whenever data sizes and label mixes differ. "uniform" is plain D-SGD (every peer alike)."""
    n = len(parts)
    if weighting == "uniform" or n == 1:
        return np.ones(n)
    if weighting == "data-size":
        sizes = np.array([len(p) for p in parts], dtype=np.float64)
        return n * sizes / sizes.sum()
    raise ValueError(f"unknown peer weighting {weighting!r} (accepted: data-size, uniform)")
