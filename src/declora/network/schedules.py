"""Time-varying mixing matrices and peer availability (offline peers, stragglers).

Everything here is a deterministic function of (seed, round): every peer, also one running in
its own process, computes the same matrix and the same list of live peers without talking.
Each random quantity has its own stream (liveness, stragglers, graph draws, pairings), so for
example raising the offline probability does not change which graphs are drawn.

Rounds are numbered from 1. Row i of W_t holds peer i's weights over the peers it *receives*
from in round t (W_ij > 0); peer i *sends* to the peers j with W_ji > 0. Every matrix here is
nonnegative and doubly stochastic, so gossip keeps the network average; all kinds but
`one-peer-exponential` are also symmetric (each link carries values both ways).

An offline peer neither sends nor receives: its row and column are those of the identity
(W_ii = 1). The others mix on the live subgraph, with the mixing rule applied to that induced
subgraph, so W stays doubly stochastic.
"""

from __future__ import annotations

import difflib
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import networkx as nx
import numpy as np

from declora.errors import ConfigError, TopologyError
from declora.network.topology import CUSTOM_RULE, Topology, graph_from_matrix, mixing_matrix

DYNAMIC_KINDS = ("static", "er-each-round", "one-peer-exponential", "random-pairs")
#: Mixing rules that are valid on any graph, hence on whatever graph a round draws.
ANY_GRAPH_RULES = ("metropolis", "laplacian")

# One independent random stream per quantity (the first entropy word of the seed sequence).
_LIVE, _STRAGGLE, _GRAPH, _PAIRS = 1, 2, 3, 4


def _rng(seed: int, round: int, stream: int) -> np.random.Generator:
    """The generator of one stream in one round: the same on every machine and process."""
    return np.random.default_rng([stream, int(seed) % 2**64, int(round)])


# --------------------------------------------------------------------------- checks


def _probability(
    key: str, value: object, *, closed_low: bool, closed_high: bool, why: str
) -> float:
    """Check a probability in an interval with the given open/closed ends."""
    bad = isinstance(value, bool) or not isinstance(value, int | float | np.floating)
    if not bad:
        v = float(value)  # type: ignore[arg-type]
        low_ok = v >= 0 if closed_low else v > 0
        high_ok = v <= 1 if closed_high else v < 1
        bad = not (low_ok and high_ok)  # also rejects NaN
    if bad:
        interval = f"{'[' if closed_low else '('}0, 1{']' if closed_high else ')'}"
        error = TopologyError if key.startswith("topology.") else ConfigError
        raise error(f"{key} must be a probability in {interval}{why}; got {value!r}")
    return float(value)  # type: ignore[arg-type]


def _check_peers(n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise TopologyError(f"topology.peers must be an integer >= 1; got {n!r}")
    return int(n)


def _check_round(round: object) -> int:
    if isinstance(round, bool) or not isinstance(round, int | np.integer) or round < 1:
        raise ValueError(f"rounds are numbered from 1; got {round!r}")
    return int(round)


def check_dynamic_mixing(W: np.ndarray, live: np.ndarray | None = None, atol: float = 1e-9) -> None:
    """Raise TopologyError unless W is a nonnegative doubly stochastic matrix in which every
    offline peer (live[i] False) has W_ii = 1 and no weight to or from anyone else."""
    W = np.asarray(W, dtype=np.float64)
    n = W.shape[0]
    if W.shape != (n, n) or not np.isfinite(W).all():
        raise TopologyError(f"mixing matrix must be square and finite; got shape {W.shape}")
    negative = np.less(W, -atol)
    if negative.any():
        i, j = np.argwhere(negative)[0]
        raise TopologyError(f"mixing matrix has a negative weight W[{i}, {j}] = {W[i, j]:.6g}")
    for axis, name in ((1, "row"), (0, "column")):
        sums = W.sum(axis=axis)
        worst = int(np.argmax(np.abs(sums - 1.0)))
        if abs(sums[worst] - 1.0) > atol:
            raise TopologyError(f"mixing matrix {name} {worst} sums to {sums[worst]:.6g}, not 1")
    if live is not None:
        for i in np.flatnonzero(~np.asarray(live, dtype=bool)):
            if abs(W[i, i] - 1.0) > atol:
                raise TopologyError(f"offline peer {i} has W_ii = {W[i, i]:.6g}, not 1")


# --------------------------------------------------------------------------- availability


@dataclass(frozen=True)
class Availability:
    """Which peers are online in a round and how many local steps each one gets.

    Each round every peer is offline with probability `offline_prob`, independently. An online
    peer straggles with probability `straggler_prob`: it does a uniformly random number of
    local steps in [1, K-1] instead of K (with K = 1 there is nothing to cut: 1 step)."""

    n: int
    seed: int = 0
    offline_prob: float = 0.0
    straggler_prob: float = 0.0

    def __post_init__(self) -> None:
        _check_peers(self.n)
        _probability(
            "topology.offline_prob",
            self.offline_prob,
            closed_low=True,
            closed_high=False,
            why=" (the chance that a peer is offline in a round)",
        )
        _probability(
            "train.straggler_prob",
            self.straggler_prob,
            closed_low=True,
            closed_high=True,
            why=" (the chance that a peer does fewer local steps in a round)",
        )

    def live(self, round: int) -> np.ndarray:
        """Boolean [n]: the peers online in `round`."""
        draw = _rng(self.seed, _check_round(round), _LIVE).random(self.n)
        return draw >= self.offline_prob

    def local_steps(self, round: int, K: int) -> np.ndarray:
        """Int [n]: each peer's local steps in `round`: K, fewer for a straggler, 0 offline."""
        if isinstance(K, bool) or not isinstance(K, int | np.integer) or K < 1:
            raise ConfigError(f"train.local_steps must be an integer >= 1; got {K!r}")
        rng = _rng(self.seed, _check_round(round), _STRAGGLE)
        slow = rng.random(self.n) < self.straggler_prob
        cut = rng.integers(1, K, size=self.n) if K > 1 else np.ones(self.n, dtype=np.int64)
        steps = np.where(slow, cut, K).astype(np.int64)
        steps[~self.live(round)] = 0
        return steps


def active_at(steps: np.ndarray, step: int) -> np.ndarray:
    """Boolean [n]: the peers that take local step `step` (0-based) of a round, given each
    peer's step count from `local_steps`: the `active` mask for an engine's `train_step`."""
    return np.asarray(steps) > step


# --------------------------------------------------------------------------- building blocks


def _embed(n: int, ids: np.ndarray, block: np.ndarray) -> np.ndarray:
    """An n x n matrix that is `block` on the peers `ids` and the identity elsewhere."""
    W = np.eye(n)
    W[np.ix_(ids, ids)] = block
    return W


def _rule_on(graph: nx.Graph, live: np.ndarray, rule: str) -> np.ndarray:
    """`rule` applied to the subgraph induced by the live peers; offline peers keep W_ii = 1."""
    n = len(live)
    ids = np.flatnonzero(live)
    if len(ids) == 0:
        return np.eye(n)
    if rule == "identity":
        return np.eye(n)
    if rule == "fedavg":
        return _embed(n, ids, np.full((len(ids), len(ids)), 1.0 / len(ids)))
    position = {int(i): a for a, i in enumerate(ids)}
    sub = nx.empty_graph(len(ids))
    sub.add_edges_from(
        (position[u], position[v]) for u, v in graph.edges() if u in position and v in position
    )
    return _embed(n, ids, mixing_matrix(sub, rule))


def restrict_to_live(W: np.ndarray, live: np.ndarray) -> np.ndarray:
    """A symmetric doubly stochastic W with the offline peers cut out: each live peer keeps the
    weight it would have given an offline neighbour for itself, offline peers get W_ii = 1.

    This is what a peer can do when a neighbour does not answer; it keeps W symmetric and
    doubly stochastic for any such W (used for matrices read from a file, which have no rule to
    rebuild them with)."""
    W = np.asarray(W, dtype=np.float64)
    live = np.asarray(live, dtype=bool)
    keep = np.outer(live, live)
    out = np.where(keep, W, 0.0)
    np.fill_diagonal(out, 0.0)
    lost = 1.0 - out.sum(axis=1)
    out[np.diag_indices_from(out)] = np.where(live, lost, 1.0)
    return out


# --------------------------------------------------------------------------- schedules


class Schedule(ABC):
    """A mixing matrix per round, on the peers that are live in that round."""

    kind: ClassVar[str]
    #: Whether every W_t is symmetric (each link carries values both ways).
    symmetric: ClassVar[bool] = True

    def __init__(self, n: int, seed: int = 0, availability: Availability | None = None) -> None:
        self.n = _check_peers(n)
        self.seed = int(seed)
        self.availability = availability or Availability(self.n, self.seed)
        if self.availability.n != self.n:
            raise TopologyError(
                f"availability is for {self.availability.n} peers, the schedule for {self.n}"
            )
        self._last: tuple[int, np.ndarray] | None = None

    def live(self, round: int) -> np.ndarray:
        """Boolean [n]: the peers online in `round`."""
        return self.availability.live(round)

    def local_steps(self, round: int, K: int) -> np.ndarray:
        """Int [n]: local steps of each peer in `round` (0 when offline)."""
        return self.availability.local_steps(round, K)

    def matrix(self, round: int) -> np.ndarray:
        """The [n, n] mixing matrix of `round` (read-only; the same on every call)."""
        round = _check_round(round)
        if self._last is None or self._last[0] != round:
            W = self._build(round, self.live(round))
            W.setflags(write=False)
            self._last = (round, W)
        return self._last[1]

    def graph(self, round: int) -> nx.Graph:
        """The links used in `round`: an undirected edge wherever W_ij or W_ji > 0."""
        return graph_from_matrix(self.matrix(round))

    def receives_from(self, round: int, i: int) -> list[int]:
        """The peers whose values peer i mixes in `round` (W_ij > 0, j != i)."""
        row = self.matrix(round)[i]
        return [int(j) for j in np.flatnonzero(row) if j != i]

    def sends_to(self, round: int, i: int) -> list[int]:
        """The peers that mix peer i's values in `round` (W_ji > 0, j != i)."""
        col = self.matrix(round)[:, i]
        return [int(j) for j in np.flatnonzero(col) if j != i]

    def messages(self, round: int) -> np.ndarray:
        """Int [n]: how many copies of its values each peer sends in `round`."""
        sent = self.matrix(round) != 0
        np.fill_diagonal(sent, False)
        return sent.sum(axis=0).astype(np.int64)

    @abstractmethod
    def _build(self, round: int, live: np.ndarray) -> np.ndarray:
        """The mixing matrix of `round` given the live peers (a fresh, writable array)."""


class StaticSchedule(Schedule):
    """A fixed topology; when peers drop out, its rule is rebuilt on the live subgraph (a
    matrix read from a file has no rule: offline peers' weights go to the diagonal instead)."""

    kind = "static"

    def __init__(
        self, base: Topology, seed: int = 0, availability: Availability | None = None
    ) -> None:
        super().__init__(base.n, seed, availability)
        self.base = base
        if base.rule == "uniform" and self.availability.offline_prob > 0:
            raise TopologyError(
                "topology.mixing 'uniform' needs a regular graph, which a graph with offline "
                "peers is not; use topology.mixing 'metropolis' with topology.offline_prob > 0"
            )

    def _build(self, round: int, live: np.ndarray) -> np.ndarray:
        if live.all():
            return np.array(self.base.mixing, dtype=np.float64)
        if self.base.rule == CUSTOM_RULE:
            return restrict_to_live(self.base.mixing, live)
        return _rule_on(self.base.graph, live, self.base.rule)


class ErdosRenyiEachRound(Schedule):
    """A fresh Erdős–Rényi graph G(n, p) every round, connected or not; the mixing rule (one
    that works on any graph) is applied to whatever was drawn, among the live peers."""

    kind = "er-each-round"

    def __init__(
        self,
        n: int,
        p: float,
        seed: int = 0,
        rule: str = "metropolis",
        availability: Availability | None = None,
    ) -> None:
        super().__init__(n, seed, availability)
        self.p = _probability(
            "topology.p",
            p,
            closed_low=False,
            closed_high=True,
            why=" (the edge probability of topology.dynamic 'er-each-round')",
        )
        if rule not in ANY_GRAPH_RULES:
            raise TopologyError(
                f"topology.mixing {rule!r} cannot be used with topology.dynamic 'er-each-round'"
                f" (a new, possibly irregular or disconnected graph each round); choose one of: "
                f"{', '.join(ANY_GRAPH_RULES)}"
            )
        self.rule = rule

    def drawn_graph(self, round: int) -> nx.Graph:
        """The G(n, p) drawn for `round`, before offline peers are removed."""
        rng = _rng(self.seed, _check_round(round), _GRAPH)
        upper = np.triu(rng.random((self.n, self.n)) < self.p, k=1)
        graph = nx.empty_graph(self.n)
        graph.add_edges_from((int(i), int(j)) for i, j in np.argwhere(upper))
        return graph

    def _build(self, round: int, live: np.ndarray) -> np.ndarray:
        return _rule_on(self.drawn_graph(round), live, self.rule)


class OnePeerExponential(Schedule):
    """One-peer exponential graph (Ying et al., 2021): in round t peer i averages with the
    peer h = 2^((t - 1) mod ceil(log2 n)) places ahead: W_t = (I + P_t) / 2.

    Peer i receives from (i + h) mod n and sends to (i - h) mod n: one message per peer per
    round. W_t is doubly stochastic but not symmetric (unless 2h = n). The shift matrices
    commute, so any ceil(log2 n) consecutive rounds multiply to exactly 11^T/n when n is a power
    of two. With offline peers the same graph is built over the live peers in id order (the
    live peer at position a receives from the live peer at position a + h, modulo their count).
    Round 1 uses h = 1 (rounds start at 1; the paper counts iterations from 0)."""

    kind = "one-peer-exponential"
    symmetric = False

    def hop(self, round: int, m: int | None = None) -> int:
        """The shift h used in `round` among m peers (default all)."""
        m = self.n if m is None else m
        tau = math.ceil(math.log2(m)) if m > 1 else 1
        return 2 ** ((_check_round(round) - 1) % tau)

    def _build(self, round: int, live: np.ndarray) -> np.ndarray:
        ids = np.flatnonzero(live)
        m = len(ids)
        if m < 2:
            return np.eye(self.n)
        h = self.hop(round, m)
        block = 0.5 * np.eye(m)
        block[np.arange(m), (np.arange(m) + h) % m] += 0.5
        return _embed(self.n, ids, block)


class RandomPairs(Schedule):
    """Random pairwise gossip: each round a uniformly random matching of the live peers (one
    left out when their count is odd); each matched pair averages (weights 1/2) with
    probability p, else both keep their values."""

    kind = "random-pairs"

    def __init__(
        self, n: int, p: float = 1.0, seed: int = 0, availability: Availability | None = None
    ) -> None:
        super().__init__(n, seed, availability)
        self.p = _probability(
            "topology.pair_prob",
            p,
            closed_low=False,
            closed_high=True,
            why=" (the chance that a matched pair averages, topology.dynamic 'random-pairs')",
        )

    def pairs(self, round: int) -> list[tuple[int, int]]:
        """The pairs that average in `round`, each as (i, j) with i < j."""
        ids = np.flatnonzero(self.live(round))
        rng = _rng(self.seed, _check_round(round), _PAIRS)
        order = rng.permutation(ids)
        matched = order[: 2 * (len(order) // 2)].reshape(-1, 2)
        on = rng.random(len(matched)) < self.p
        return sorted((int(min(i, j)), int(max(i, j))) for i, j in matched[on])

    def _build(self, round: int, live: np.ndarray) -> np.ndarray:
        W = np.eye(self.n)
        for i, j in self.pairs(round):
            W[i, i] = W[j, j] = W[i, j] = W[j, i] = 0.5
        return W


def make_schedule(
    kind: str,
    n: int,
    seed: int = 0,
    *,
    p: float | None = None,
    offline_prob: float = 0.0,
    straggler_prob: float = 0.0,
    base: Topology | None = None,
    mixing_rule: str = "metropolis",
) -> Schedule:
    """Build the schedule of `kind` (config key topology.dynamic) for n peers.

    `p` is the edge probability for 'er-each-round' (required, config topology.p) and the pair
    activation probability for 'random-pairs' (default 1, config topology.pair_prob); `base` is
    the fixed topology of 'static'; `mixing_rule` is used by 'er-each-round' (the other kinds
    fix their own weights)."""
    if kind not in DYNAMIC_KINDS:
        close = difflib.get_close_matches(str(kind), DYNAMIC_KINDS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise TopologyError(
            f"topology.dynamic {kind!r} is unknown{hint}; choose one of: {', '.join(DYNAMIC_KINDS)}"
        )
    n = _check_peers(n)
    availability = Availability(n, seed, offline_prob, straggler_prob)
    if kind == "static":
        if base is None:
            raise TopologyError("topology.dynamic 'static' needs a base topology")
        if base.n != n:
            raise TopologyError(f"the base topology has {base.n} peers; expected {n}")
        return StaticSchedule(base, seed, availability)
    if kind == "er-each-round":
        if p is None:
            raise TopologyError(
                "topology.dynamic 'er-each-round' needs an edge probability topology.p in (0, 1]"
            )
        return ErdosRenyiEachRound(n, p, seed, mixing_rule, availability)
    if kind == "one-peer-exponential":
        return OnePeerExponential(n, seed, availability)
    return RandomPairs(n, 1.0 if p is None else p, seed, availability)
