"""What makes one member of the Dec-LoRA family what it is, as one object.

An `Algorithm` answers every question the rest of the code used to answer by comparing
`algorithm.name` with strings: which LoRA factors train in a round, which tensors a peer sends,
how the received tensors combine (the communicator it asks for), who talks to whom (its plan),
whether it gossips at all, its label in reports, and which settings it supports (capabilities
that the config check reads). The round loop is the template method; an algorithm fills in its
steps. Adding an algorithm is one file that subclasses `Algorithm` and registers itself
(`declora.algorithms.registry.register`), plus its line in `declora/algorithms/__init__.py`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, ClassVar

import networkx as nx
import numpy as np

from declora.algorithms.registry import algorithm_class, names
from declora.config.schema import robustness_key
from declora.engine.plan import Plan, peer_weights
from declora.errors import ConfigError
from declora.network.mixing import LORA_FACTORS
from declora.network.schedules import Schedule, StaticSchedule
from declora.network.topology import Topology

if TYPE_CHECKING:
    from declora.config.schema import RunConfig


class Algorithm:
    """Base class: Dec-LoRA's answers (both factors train, everything is sent and averaged
    factor by factor with W on the graph). Subclasses override what differs."""

    #: `algorithm.name` in the config.
    name: ClassVar[str] = ""
    #: How reports and plots call it.
    label: ClassVar[str] = ""
    #: Exchanges values with graph neighbours each round (the others are its baselines).
    gossips: ClassVar[bool] = True
    #: A server averages: every online peer uploads one copy per round (the broadcast back is
    #: not counted), and a distributed run averages with an all-reduce.
    server_average: ClassVar[bool] = False
    #: Mixes something other than factor averages, so it takes exact messages only.
    exact_messages_only: ClassVar[bool] = False
    #: Works on LoRA's two factors, so PEFT methods without them (IA3, prompt tuning) are out.
    needs_lora_factors: ClassVar[bool] = False
    #: Needs no network at all (one model, or peers that never talk): in a distributed run it
    #: would only waste processes, so `declora launch` refuses it.
    single_process: ClassVar[bool] = False
    #: The peers' own models are the product (personalization): each is scored on held-out
    #: examples drawn with that peer's own label mix as well.
    personalized: ClassVar[bool] = False
    #: How a peer combines what it received: "average" (W times each tensor, exact or
    #: compressed, plain or CHOCO) or "product-svd" (DeCAF: mix B_j A_j, truncated SVD).
    mixing_rule: ClassVar[str] = "average"
    #: `stale_optimizer_state` is cleared right after the round's mixing, only for the peers
    #: it changed (instead of for every peer at the round's start).
    stale_after_mixing: ClassVar[bool] = False
    #: Trains with per-peer DP-SGD (`privacy.mechanism=dp-sgd`): each peer's steps are
    #: DP-SGD steps on its own data, and whatever it sends or mixes is post-processing.
    dp_sgd: ClassVar[bool] = True

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        if self.gossips and cfg.lora.ranks is not None:
            from declora.config.schema import hetero_rule

            #: algorithm.hetero=svd: mixed ranks combine by products and truncated SVD, which
            #: re-factors like DeCAF, so the same stale optimizer state is cleared after it
            if hetero_rule(cfg) == "svd":
                self.mixing_rule = "product-svd"  # type: ignore[misc]
                self.stale_after_mixing = True  # type: ignore[misc]

    # ---------------------------------------------------------------- what trains, what is sent

    def trainable(self, round: int) -> frozenset[str]:
        """The LoRA factors that get gradients in `round` (a head, if any, always trains)."""
        return LORA_FACTORS

    def stale_optimizer_state(self, round: int) -> frozenset[str]:
        """LoRA factors whose optimizer state (momentum, Adam moments) no longer fits them in
        `round` and is cleared (before its local steps, or after its mixing with
        `stale_after_mixing`); none by default, both factors after a product-SVD mixing."""
        return LORA_FACTORS if self.mixing_rule == "product-svd" else frozenset()

    def sent_keys(self, keys: Iterable[str]) -> set[str]:
        """The tensors a peer sends and mixes each round; the others stay as they are."""
        return set(keys)

    # ---------------------------------------------------------------- who talks to whom

    def plan(
        self,
        topology: Topology,
        parts: list[np.ndarray],
        batch_size: int,
        schedule: Schedule | None = None,
    ) -> Plan:
        """Gossip on the graph: each peer sends one copy to each neighbour; `schedule`
        (dynamic graphs, offline peers, stragglers) changes the matrix and the steps."""
        w = peer_weights(parts, self.cfg.train.peer_weighting)
        deg = np.array(topology.degrees)
        return Plan(self, parts, topology.mixing, batch_size, deg, w, schedule)

    # ---------------------------------------------------------------- the settings it takes

    def check(self, cfg: RunConfig) -> None:
        """Refuse settings this algorithm cannot honour, before any work (ConfigError)."""
        if self.needs_lora_factors and cfg.lora.method in ("ia3", "prompt-tuning"):
            raise ConfigError(
                f"algorithm {self.name} works on LoRA's two factors; lora.method="
                f"{cfg.lora.method} has none (use algorithm.name=dec-lora, which mixes any "
                "adapter)"
            )
        if self.exact_messages_only and not cfg.comm.exact:
            raise ConfigError(
                f"algorithm {self.name} sends exact factors; comm.bits={cfg.comm.bits}, "
                f"comm.scheme={cfg.comm.scheme} is not supported with it (use comm.bits=32 and "
                "comm.scheme=plain)"
            )
        if cfg.privacy.on and not self.dp_sgd:
            supported = ", ".join(n for n in names() if algorithm_class(n).dp_sgd)
            key = "algorithm.name" if name_is_main(cfg, self.name) else "baselines"
            raise ConfigError(
                f"privacy.mechanism=dp-sgd is not supported with {key} {self.name} yet "
                f"(accepted: {supported})"
            )
        c = cfg.comm
        what = robustness_key(cfg)
        if (
            what is not None
            and (not self.gossips or self.mixing_rule != "average")
            and name_is_main(cfg, self.name)
        ):
            raise ConfigError(
                f"{what} needs a gossip algorithm that averages factors (dec-lora, ffa, fedsa, "
                f"adf); algorithm.name={self.name} is not one"
            )
        if c.overlap:
            self._check_overlap(cfg)
        if c.final_gossip and not self.gossips and name_is_main(cfg, self.name):
            gossiping = ", ".join(n for n in names() if algorithm_class(n).gossips)
            raise ConfigError(
                f"comm.final_gossip is for gossip algorithms ({gossiping}); "
                f"algorithm.name={self.name} does not gossip (its peers already hold "
                f"{'one average' if self.server_average else 'their own models'}); use "
                "comm.final_gossip=0"
            )
        if c.mix_momentum and self.gossips and self.mixing_rule != "average":
            raise ConfigError(
                f"comm.mix_momentum needs a combine rule that averages factors; algorithm "
                f"{self.name} mixes by {self.mixing_rule} and clears the momentum after it "
                "(use comm.mix_momentum=false with it)"
            )
        t = cfg.topology
        changing = t.dynamic != "static" or t.offline_prob > 0
        if self.gossips and cfg.comm.scheme == "choco" and changing:
            raise ConfigError(
                "comm.scheme=choco needs a fixed graph with every peer online (its copies of the "
                "neighbours' values would go stale); use comm.scheme=plain with topology.dynamic="
                f"{t.dynamic}, topology.offline_prob={t.offline_prob}"
            )

    def _check_overlap(self, cfg: RunConfig) -> None:
        """comm.overlap corrects a peer's value by the mix of the previous values, which
        needs a linear combine of factors and one exchange a round."""
        if self.gossips and self.mixing_rule != "average":
            raise ConfigError(
                f"comm.overlap needs a combine rule that averages factors; algorithm {self.name} "
                f"mixes by {self.mixing_rule} (use comm.overlap=false with it)"
            )
        if not self.gossips and name_is_main(cfg, self.name):
            raise ConfigError(
                f"comm.overlap is for gossip algorithms (dec-lora, ffa, fedsa, adf); "
                f"algorithm.name={self.name} does not gossip"
            )
        if self.gossips and cfg.comm.gossip_steps != 1:
            raise ConfigError(
                f"comm.overlap makes one exchange a round; comm.gossip_steps="
                f"{cfg.comm.gossip_steps} is not supported with it (use 1)"
            )
        if self.gossips and cfg.comm.final_gossip:
            raise ConfigError(
                f"comm.overlap makes one exchange a round; comm.final_gossip="
                f"{cfg.comm.final_gossip} is not supported with it (use 0)"
            )

    def gossip_steps(self) -> int:
        """Exchanges per round: `comm.gossip_steps` for gossip, one server average otherwise."""
        return self.cfg.comm.gossip_steps if self.gossips else 1

    def final_gossip_steps(self) -> int:
        """Exchanges after the last round's, with no training (`comm.final_gossip`): they
        bring each peer's own model towards the average; none for algorithms that do not
        gossip."""
        return self.cfg.comm.final_gossip if self.gossips else 0

    def __repr__(self) -> str:
        return f"<algorithm {self.name}>"


def name_is_main(cfg: RunConfig, name: str) -> bool:
    """Whether `name` is the run's main algorithm (faults and robust rules apply to it; the
    baselines run without them)."""
    return cfg.algorithm.name == name


def availability_only(schedule: Schedule | None, mixing: np.ndarray, rule: str) -> Schedule | None:
    """A baseline's schedule: its own fixed matrix (rebuilt on the online peers) with the same
    offline peers and stragglers as the gossip schedule; None when everyone is always there."""
    if schedule is None:
        return None
    a = schedule.availability
    if a.offline_prob == 0 and a.straggler_prob == 0:
        return None
    n = mixing.shape[0]
    base = Topology(graph=nx.empty_graph(n), mixing=mixing, kind=rule, rule=rule)
    return StaticSchedule(base, schedule.seed, a)
