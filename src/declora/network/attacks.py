"""Fault injection for robustness studies: chosen peers send poisoned values (`faults.*`).

A Byzantine peer trains and combines like any other, but what it SENDS (factors and head) is
replaced. The same `Attack` serves the simulator (`poison_stacked`, every peer's rows) and a
peer process (`poison`, its own values), and every attacker draws its noise from its own
generator seeded by (seed, peer), in tensor order, so both modes send the same numbers.

* `sign-flip`: -strength * x (strength 1 by default).
* `scaled`: strength * x (10 by default): a peer that blows its values up.
* `gaussian`: x + strength * N(0, 1) per coordinate (strength 1 by default).
* `alie` ("a little is enough", Baruah et al. 2019): mean - strength * std, per coordinate,
  of the attacker's own value and what it received in the previous exchange (strength 1 by
  default): close enough to the honest values to pass simple filters, consistently biased.
* `stale`: the values it sent the first time, forever (a peer stuck at an old model).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch

ATTACKS: tuple[str, ...] = ("sign-flip", "scaled", "gaussian", "alie", "stale")
DEFAULT_STRENGTH = {"sign-flip": 1.0, "scaled": 10.0, "gaussian": 1.0, "alie": 1.0, "stale": 0.0}


def attack_generator(seed: int, peer: int) -> torch.Generator:
    """Attacker `peer`'s noise generator: independent of the compression generators (another
    stream of the same seed) and the same in simulation and in its own process."""
    seq = np.random.SeedSequence([int(seed), int(peer), 0xBAD])
    return torch.Generator().manual_seed(int(seq.generate_state(1, np.uint64)[0]) & (2**63 - 1))


class Attack:
    """What the peers in `byzantine` send instead of their values."""

    def __init__(
        self, kind: str, byzantine: Iterable[int], seed: int, strength: float | None = None
    ) -> None:
        if kind not in ATTACKS:
            raise ValueError(f"faults.attack={kind!r} is unknown; choose {', '.join(ATTACKS)}")
        self.kind = kind
        self.byzantine = sorted(set(int(p) for p in byzantine))
        self.strength = DEFAULT_STRENGTH[kind] if strength is None else float(strength)
        self.generators = {p: attack_generator(seed, p) for p in self.byzantine}
        self.frozen: dict[int, dict[str, torch.Tensor]] = {}  # stale: the first message
        self.previous: dict[int, dict[str, torch.Tensor]] = {}  # alie: last exchange, [k, ...]

    def poison(self, peer: int, values: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What peer `peer` sends in place of `values` (its own, no peer axis)."""
        if peer not in self.generators:
            return dict(values)
        x = {k: v.detach().to(torch.float32) for k, v in values.items()}
        if self.kind == "sign-flip":
            return {k: -self.strength * v for k, v in x.items()}
        if self.kind == "scaled":
            return {k: self.strength * v for k, v in x.items()}
        if self.kind == "gaussian":
            g = self.generators[peer]
            return {k: v + self.strength * torch.randn(v.shape, generator=g) for k, v in x.items()}
        if self.kind == "stale":
            if peer not in self.frozen:
                self.frozen[peer] = {k: v.clone() for k, v in x.items()}
            return {k: v.clone() for k, v in self.frozen[peer].items()}
        seen = self.previous.get(peer)
        out = {}
        for k, v in x.items():
            block = v.unsqueeze(0) if seen is None else torch.cat([v.unsqueeze(0), seen[k]])
            std = block.std(dim=0, unbiased=False)
            out[k] = block.mean(dim=0) - self.strength * std
        return out

    def remember(self, peer: int, received: Sequence[Mapping[str, torch.Tensor]]) -> None:
        """What attacker `peer` received this exchange (ALIE builds its next message on it)."""
        if self.kind != "alie" or peer not in self.generators or not received:
            return
        keys = list(received[0])
        self.previous[peer] = {
            k: torch.stack([r[k].to(torch.float32) for r in received]) for k in keys
        }

    def poison_stacked(
        self, values: Mapping[str, torch.Tensor], senders: Sequence[int]
    ) -> dict[str, torch.Tensor]:
        """The simulator's block of sent values: attacker rows replaced (only for attackers
        that send this exchange, as a real peer with no one to send to draws nothing)."""
        out = {k: v.clone() for k, v in values.items()}
        for p in self.byzantine:
            if p in senders:
                for k, v in self.poison(p, {k: v[p] for k, v in values.items()}).items():
                    out[k][p] = v
        return out

    def remember_stacked(
        self, decoded: Mapping[str, torch.Tensor], sources: Sequence[Sequence[int]]
    ) -> None:
        for p in self.byzantine:
            self.remember(p, [{k: v[j] for k, v in decoded.items()} for j in sources[p]])

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"generator.{p}": g.get_state() for p, g in self.generators.items()}
        for p, vals in self.frozen.items():
            state.update({f"frozen.{p}.{k}": v.clone() for k, v in vals.items()})
        for p, vals in self.previous.items():
            state.update({f"previous.{p}.{k}": v.clone() for k, v in vals.items()})
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.frozen, self.previous = {}, {}
        for key, value in state.items():
            part, _, rest = key.partition(".")
            peer_s, _, name = rest.partition(".")
            peer = int(peer_s)
            if peer not in self.generators:
                raise ValueError(f"attack state for peer {peer}, which is not an attacker")
            if part == "generator":
                self.generators[peer].set_state(value.to(torch.uint8).cpu())
            elif part in ("frozen", "previous"):
                getattr(self, part).setdefault(peer, {})[name] = value.to(torch.float32).clone()
            else:
                raise ValueError(f"unexpected key {key!r} in an attack state")
