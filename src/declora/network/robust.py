"""Robust combine rules: how ONE peer combines its own value with what its neighbours sent when
some of them may be broken or hostile (`comm.robust`).

Plain gossip is linear, so `declora.network.mixing` writes it once over a block of rows. These
rules are not: each is a function of one peer's own values, its neighbours' received values and
their weights. The simulator (`RobustGossip`) calls it for every peer over its neighbourhood;
a peer process (`declora.network.distributed.PeerGossip`) calls it for itself, so both modes
compute the same numbers. Values are dicts name -> tensor (one peer's, no peer axis); the rules
treat everything a peer sent as ONE vector (all tensors concatenated), as the papers do.

* `clip`: self-centred clipping, ClippedGossip (He, Karimireddy and Jaggi 2022):
  x_i <- x_i + sum_j W_ij CLIP(x_j - x_i, tau). The radius tau is `comm.robust_radius`, or
  adaptive: the (k - b)-th smallest of the k neighbours' distances, so the b farthest
  neighbours (b = `comm.robust_trim`) are pulled in to the distance of the farthest one kept.
* `trimmed-mean`: per coordinate, drop the b largest and b smallest of [own, received...] and
  average the rest (unweighted, as in the coordinate-wise trimmed mean of Yin et al. 2018).
* `median`: per coordinate, the median of [own, received...] (the mean of the middle two when
  their count is even).

Each call also says which neighbours it flagged: clipped (clip), or with at least half of
their coordinates discarded (trimmed-mean, median), which is what a peer logs.

Exclusion (`comm.robust_exclude`, clip only): clipping bounds each message, but a neighbour
that pushes the SAME way at every exchange (sign-flip, stale) still pulls by its weight times
the radius every time, and that adds up. How often a neighbour is clipped does not tell it
apart: with the adaptive radius some neighbour is clipped at every exchange, and under label
skew it is often the same honest one. How MUCH is clipped does: a peer keeps, per neighbour,
the share of each message's pull that clipping removed (1 - radius / distance; 0 when not
clipped), averaged over about the last W = `comm.robust_exclude_window` messages (the plain
mean of the first W, then a moving average with weight 1 / W, so a neighbour that turns bad
late in a long run is seen too). Once that average reaches `comm.robust_exclude` (after at
least W messages), the peer stops mixing the neighbour for the rest of the run. The
neighbour's weight stays with the peer, and it counts as one of the b neighbours assumed bad
(b - excluded are clipped among the others). The decision uses only the peer's own counts, so
a simulated peer and a real one decide alike, and a resumed run decides as the uninterrupted
one.

Staleness (`comm.robust_stale`, any rule, plain gossip too): a neighbour whose message is
bit-identical to its previous one `robust_stale` exchanges in a row (its first message and then
repeats) is cut off the same way. An honest peer's values change at every exchange (it trains
and mixes), so a repeated message means a peer stuck at an old model, or one replaying an old
message; clipping alone sees it only once training has moved everyone far from it. A peer
compares a short digest (BLAKE2b, 8 bytes) of each decoded message with the neighbour's
previous one, so it keeps 16 bytes per neighbour, not the message. With `comm.robust=none` the
rule is plain gossip over the neighbours not cut off (`none` below: x_i + sum_j W_ij
(x_j - x_i) over the j kept). Messages that are encoded afresh each time (stochastic rounding,
error feedback) would never repeat: that combination is refused.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch

from declora.network.compress import Compressor

log = logging.getLogger("declora.network")

RobustName = Literal["clip", "trimmed-mean", "median"]
ROBUST_RULES: tuple[str, ...] = ("clip", "trimmed-mean", "median")


@dataclass(frozen=True)
class RobustRule:
    """A robust rule and its settings: `trim` (b) neighbours assumed bad, a fixed `radius`
    (clip only; None: adaptive)."""

    name: str
    trim: int = 1
    radius: float | None = None
    exclude: float | None = None  # mean clipped share at which a neighbour is cut off
    exclude_window: int = 10  # messages the removed share is averaged over (about)
    stale: int | None = None  # identical messages in a row at which a neighbour is cut off

    def min_neighbours(self) -> int:
        """The fewest neighbours a peer needs for this rule to do what it promises."""
        if self.name == "trimmed-mean":
            return 2 * self.trim
        if self.name == "median":
            return 2
        if self.name == "none":
            return 0
        return 1 if self.radius is not None else self.trim + 1


# --------------------------------------------------------------------------- one peer, flat


def clip_combine(
    own: torch.Tensor, received: torch.Tensor, weights: torch.Tensor, radius: float | None, b: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """ClippedGossip for one peer: own [d], received [k, d], weights [k] (W_ij). Returns the
    new value [d] and which neighbours were clipped ([k] bool)."""
    value, scale = _clip(own, received, weights, radius, b)
    return value, scale < 1.0


def _clip(
    own: torch.Tensor, received: torch.Tensor, weights: torch.Tensor, radius: float | None, b: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """ClippedGossip's value [d] and each neighbour's scale ([k], 1: not clipped)."""
    diff = received - own.unsqueeze(0)
    dist = torch.linalg.vector_norm(diff, dim=1)
    tau = adaptive_radius(dist, b) if radius is None else torch.tensor(float(radius))
    tau = tau.to(dist.dtype)
    clipped = dist > tau
    scale = torch.where(clipped, tau / dist.clamp_min(torch.finfo(dist.dtype).tiny), 1.0)
    return own + (weights.to(own.dtype) * scale) @ diff, scale


def adaptive_radius(dist: torch.Tensor, b: int) -> torch.Tensor:
    """The (k - b)-th smallest distance (the smallest when k <= b): the b farthest neighbours
    are clipped to the farthest of the others."""
    k = dist.shape[0]
    return torch.sort(dist).values[max(k - b, 1) - 1]


def trimmed_mean_combine(
    own: torch.Tensor, received: torch.Tensor, b: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinate-wise trimmed mean of [own, received...] dropping b values at each end (fewer
    when the neighbourhood is too small: at most (m - 1) // 2). Returns the value [d] and per
    neighbour the share of its coordinates that were dropped ([k])."""
    block = torch.cat([own.unsqueeze(0), received])
    m = block.shape[0]
    b = min(b, (m - 1) // 2)
    if b == 0:
        return block.mean(dim=0), torch.zeros(m - 1)
    order = torch.argsort(block, dim=0, stable=True)
    kept = order[b : m - b]
    value = torch.gather(block, 0, kept).mean(dim=0)
    dropped = torch.ones_like(block, dtype=torch.bool)
    dropped.scatter_(0, kept, False)
    return value, dropped[1:].float().mean(dim=1)


def median_combine(own: torch.Tensor, received: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinate-wise median of [own, received...]; the share of each neighbour's coordinates
    that are not among the middle value(s) ([k])."""
    block = torch.cat([own.unsqueeze(0), received])
    m = block.shape[0]
    order = torch.argsort(block, dim=0, stable=True)
    middle = order[(m - 1) // 2 : m // 2 + 1]
    value = torch.gather(block, 0, middle).mean(dim=0)
    dropped = torch.ones_like(block, dtype=torch.bool)
    dropped.scatter_(0, middle, False)
    return value, dropped[1:].float().mean(dim=1)


def combine_flat(
    rule: RobustRule, own: torch.Tensor, received: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One peer's robust combine over flat vectors; returns (value [d], flagged [k] bool,
    removed [k]: the share of each message that was discarded: 1 - scale for clip, the share
    of its coordinates dropped for trimmed-mean and median)."""
    if rule.name == "clip":
        value, scale = _clip(own, received, weights, rule.radius, rule.trim)
        return value, scale < 1.0, 1.0 - scale
    if rule.name == "none":  # plain gossip (comm.robust_stale without a robust rule)
        diff = received - own.unsqueeze(0)
        zeros = torch.zeros(received.shape[0])
        return own + weights.to(own.dtype) @ diff, zeros > 0, zeros
    if rule.name == "trimmed-mean":
        value, share = trimmed_mean_combine(own, received, rule.trim)
    elif rule.name == "median":
        value, share = median_combine(own, received)
    else:
        raise ValueError(f"comm.robust={rule.name!r} is unknown; choose {', '.join(ROBUST_RULES)}")
    return value, share >= 0.5, share


def robust_combine(
    rule: RobustRule,
    own: Mapping[str, torch.Tensor],
    received: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    excluded: Sequence[bool] | None = None,
) -> tuple[dict[str, torch.Tensor], list[bool], list[float]]:
    """One peer's robust combine over dicts of tensors (all tensors as one vector): what the
    simulator computes for each peer and a peer process for itself. Returns the new values,
    which neighbours were flagged, and the share of each message discarded (`combine_flat`).
    `excluded` (one per neighbour): neighbours cut off by `comm.robust_exclude`; they are left
    out (flagged, all discarded) and take their share of the b neighbours assumed bad."""
    keys = list(own)
    flat_own = torch.cat([own[k].reshape(-1).to(torch.float32) for k in keys])
    cut = [bool(e) for e in excluded] if excluded is not None else [False] * len(received)
    kept = [i for i, e in enumerate(cut) if not e]
    flagged, removed = list(cut), [float(e) for e in cut]
    if not kept:  # every neighbour cut off: the peer keeps its own values
        return {k: own[k].detach().to(torch.float32).clone() for k in keys}, flagged, removed
    rows = [torch.cat([received[i][k].reshape(-1).to(torch.float32) for k in keys]) for i in kept]
    w = torch.tensor([float(weights[i]) for i in kept], dtype=torch.float32)
    if len(kept) < len(cut):
        rule = replace(rule, trim=max(rule.trim - (len(cut) - len(kept)), 0))
    value, kept_flags, kept_removed = combine_flat(rule, flat_own, torch.stack(rows), w)
    for i, f, r in zip(kept, kept_flags.tolist(), kept_removed.tolist(), strict=True):
        flagged[i], removed[i] = bool(f), float(r)
    out, pos = {}, 0
    for k in keys:
        n = own[k].numel()
        out[k] = value[pos : pos + n].reshape(own[k].shape)
        pos += n
    return out, flagged, removed


def message_digest(message: Mapping[str, torch.Tensor]) -> int:
    """8 bytes of BLAKE2b over a message's tensors (by name, as float32), as a signed int64:
    what a peer keeps to see that a neighbour sent the very same message again."""
    h = hashlib.blake2b(digest_size=8)
    for name in sorted(message):
        h.update(name.encode())
        h.update(message[name].detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    return int.from_bytes(h.digest(), "little", signed=True)


# --------------------------------------------------------------------------- who was flagged


class FlagCounts:
    """How often each receiving peer flagged (clipped or trimmed) each neighbour, over the run:
    the numbers an operator reads to see who misbehaves. Kept as tensors (checkpointable)."""

    def __init__(self, n: int) -> None:
        self.flagged = torch.zeros(n, n, dtype=torch.float64)  # [receiver, sender]
        self.seen = torch.zeros(n, n, dtype=torch.float64)
        self.removed = torch.zeros(n, n, dtype=torch.float64)  # recent discarded share
        self.digest = torch.zeros(n, n, dtype=torch.int64)  # of the last message received
        self.repeats = torch.zeros(n, n, dtype=torch.float64)  # same message again, in a row

    def add(
        self,
        receiver: int,
        senders: Sequence[int],
        flagged: Sequence[bool],
        removed: Sequence[float] | None = None,
        window: int = 10,
    ) -> None:
        """Count one exchange; `removed` (share of each message discarded) enters a moving
        average over about the last `window` messages (the plain mean of the first ones)."""
        shares = [0.0] * len(senders) if removed is None else removed
        for j, f, r in zip(senders, flagged, shares, strict=True):
            self.seen[receiver, j] += 1
            self.flagged[receiver, j] += float(f)
            step = 1.0 / min(float(self.seen[receiver, j]), float(window))
            self.removed[receiver, j] += step * (float(r) - float(self.removed[receiver, j]))

    def observe(
        self,
        rule: RobustRule,
        receiver: int,
        senders: Sequence[int],
        digests: Sequence[int],
    ) -> None:
        """Before an exchange is combined (`comm.robust_stale`): count, per neighbour, how
        many times in a row its message (`message_digest`) repeated the previous one. Once a
        neighbour reaches the limit the count no longer resets: it stays cut off, as under
        `robust_exclude`."""
        if rule.stale is None:
            return
        for j, digest in zip(senders, digests, strict=True):
            if self.repeats[receiver, j] >= rule.stale - 1:
                continue
            again = self.seen[receiver, j] > 0 and int(self.digest[receiver, j]) == digest
            self.repeats[receiver, j] = self.repeats[receiver, j] + 1 if again else 0
            self.digest[receiver, j] = digest

    def stale(self, rule: RobustRule, receiver: int, senders: Sequence[int]) -> list[bool]:
        """Which of `senders` repeated one message `comm.robust_stale` times in a row."""
        if rule.stale is None:
            return [False] * len(senders)
        return [float(self.repeats[receiver, j]) >= rule.stale - 1 for j in senders]

    def excluded(self, rule: RobustRule, receiver: int, senders: Sequence[int]) -> list[bool]:
        """Which of `senders` `receiver` has cut off: clipping removed at least
        `comm.robust_exclude` of their recent messages on average, after at least
        `exclude_window` of them, or they are stale (`comm.robust_stale`). A neighbour cut off
        counts as wholly removed from then on, so its average only grows: it stays cut off."""
        stale = self.stale(rule, receiver, senders)
        if rule.exclude is None:
            return stale
        return [
            s
            or (
                float(self.seen[receiver, j]) >= rule.exclude_window
                and float(self.removed[receiver, j]) >= rule.exclude - 1e-12
            )
            for j, s in zip(senders, stale, strict=True)
        ]

    def metrics(
        self, receivers: Sequence[int], rule: RobustRule | None = None
    ) -> dict[str, object]:
        """metrics.jsonl keys: `robust_flagged_share` (flagged / received messages, these
        receivers), `robust_flags` {"sender->receiver": times flagged} for pairs flagged,
        `robust_removed` {"sender->receiver": recent share of its messages discarded} and, with
        exclusion or the staleness check on, `robust_excluded` ["sender->receiver", ...] for
        pairs cut off, and with the staleness check `robust_stale`: those cut off for it."""
        rows = list(receivers)
        seen, flagged = self.seen[rows], self.flagged[rows]
        total = float(seen.sum())
        flags = {
            f"{int(j)}->{rows[int(r)]}": int(flagged[r, j])
            for r, j in torch.nonzero(flagged > 0).tolist()
        }
        out: dict[str, object] = {
            "robust_flagged_share": float(flagged.sum()) / total if total else 0.0,
            "robust_flags": flags,
        }
        recent = self.removed[rows]
        out["robust_removed"] = {
            f"{int(j)}->{rows[int(r)]}": round(float(recent[r, j]), 4)
            for r, j in torch.nonzero(recent > 0).tolist()
        }
        n = self.seen.shape[1]

        def pairs(which) -> list[str]:
            return [
                f"{j}->{i}"
                for i in rows
                for j, cut in zip(range(n), which(rule, i, range(n)), strict=True)
                if cut
            ]

        if rule is not None and (rule.exclude is not None or rule.stale is not None):
            out["robust_excluded"] = pairs(self.excluded)
        if rule is not None and rule.stale is not None:
            out["robust_stale"] = pairs(self.stale)
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "flags.flagged": self.flagged.clone(),
            "flags.seen": self.seen.clone(),
            "flags.removed": self.removed.clone(),
            "flags.digest": self.digest.clone(),
            "flags.repeats": self.repeats.clone(),
        }

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        # checkpoints from before exclusion / the staleness check lack the later counts
        self.removed, self.repeats = torch.zeros_like(self.seen), torch.zeros_like(self.seen)
        self.digest = torch.zeros(self.seen.shape, dtype=torch.int64)
        for name in ("flagged", "seen", "removed", "digest", "repeats"):
            if f"flags.{name}" not in state and name in ("removed", "digest", "repeats"):
                continue
            value = state[f"flags.{name}"]
            if value.shape != self.flagged.shape:
                raise ValueError(f"flag counts of shape {tuple(value.shape)} for {self.seen.shape}")
            kind = torch.int64 if name == "digest" else torch.float64
            setattr(self, name, value.to(kind).clone())


# --------------------------------------------------------------------------- the simulator


class RobustGossip:
    """Simulated gossip with faults and/or a robust rule: attackers replace what they send
    (`declora.network.attacks`), messages are (optionally) compressed and decoded, and every
    peer combines its own exact value with what it decoded from its neighbours, with the
    robust rule or, without one, plain `mix_with_own_exact`. Same contract as the other
    simulators (`mix`, `set_mixing`, `last_bytes`, state)."""

    def __init__(
        self,
        mixing: np.ndarray,
        rule: RobustRule | None,
        attack: object | None = None,
        *,
        compressed: object | None = None,
    ) -> None:
        """`compressed`: a `CompressedGossip` whose encode/decode (and error feedback) the
        messages go through; None: exact fp32 messages."""
        self.n = np.asarray(mixing).shape[0]
        self.rule, self.attack, self.compressed = rule, attack, compressed
        self.flags = FlagCounts(self.n)
        self.last_bytes: np.ndarray | None = None
        self.set_mixing(mixing)

    def set_mixing(self, mixing: np.ndarray) -> None:
        W = np.asarray(mixing, dtype=np.float64)
        if W.shape != (self.n, self.n):
            raise ValueError(f"expected a {self.n} x {self.n} mixing matrix, got {W.shape}")
        self.mixing = W
        self.W = torch.tensor(W, dtype=torch.float32)
        self.sources = [[j for j in np.flatnonzero(W[i]) if j != i] for i in range(self.n)]
        off = (W != 0) & ~np.eye(self.n, dtype=bool)
        self.senders = [i for i in range(self.n) if off[:, i].any()]
        if self.compressed is not None:
            self.compressed.set_mixing(W)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = dict(self.flags.state_dict())
        if self.attack is not None:
            state.update({f"attack.{k}": v for k, v in self.attack.state_dict().items()})
        if self.compressed is not None:
            state.update({f"comp.{k}": v for k, v in self.compressed.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.flags.load_state_dict(state)
        for prefix, part in (("attack.", self.attack), ("comp.", self.compressed)):
            if part is not None:
                part.load_state_dict(
                    {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
                )

    def round_metrics(self) -> dict[str, object]:
        return self.flags.metrics(range(self.n), self.rule) if self.rule is not None else {}

    def mix(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from declora.network.health import nonfinite_rows, refusal
        from declora.network.mixing import mix_with_own_exact

        x = {k: v.detach().to(torch.float32) for k, v in values.items()}
        bad = nonfinite_rows(x)
        if bad:  # what real peers refuse (comm.on_peer_failure=skip is for real peers)
            raise refusal(self.mixing, sorted(bad)[0], ["non-finite values"])
        sent = dict(x)
        if self.attack is not None:
            sent = self.attack.poison_stacked(x, self.senders)
        if self.compressed is not None:
            decoded = self.compressed.decode_all(sent)
            self.last_bytes = self.compressed.last_bytes
        else:
            decoded = sent
        if self.attack is not None:
            self.attack.remember_stacked(decoded, self.sources)
        out = {}
        if self.rule is None:
            own = torch.diagonal(self.W).clone()
            index = torch.arange(self.n)
            out = {k: mix_with_own_exact(self.W, own, x[k], decoded[k], index) for k in x}
        else:
            out = {k: v.clone() for k, v in x.items()}
            digests = (  # once per sender: every receiver decodes the same message here
                {j: message_digest({k: v[j] for k, v in decoded.items()}) for j in self.senders}
                if self.rule.stale is not None
                else {}
            )
            for i in range(self.n):
                src = self.sources[i]
                if not src:
                    continue
                own_i = {k: v[i] for k, v in x.items()}
                recv = [{k: v[j] for k, v in decoded.items()} for j in src]
                if digests:
                    self.flags.observe(self.rule, i, src, [digests[j] for j in src])
                mixed, flagged, removed = robust_combine(
                    self.rule,
                    own_i,
                    recv,
                    [float(self.mixing[i, j]) for j in src],
                    self.flags.excluded(self.rule, i, src),
                )
                self.flags.add(i, src, flagged, removed, self.rule.exclude_window)
                for k in out:
                    out[k][i] = mixed[k]
        for i in range(self.n):
            if not self.sources[i]:
                for k in out:
                    out[k][i] = x[k][i]
        return {k: out[k].to(values[k].dtype) for k in values}


def compressed_for(compressor: Compressor, mixing: np.ndarray, **kwargs: object) -> object:
    """The `CompressedGossip` whose encode/decode a `RobustGossip` reuses."""
    from declora.network.compressed import CompressedGossip

    return CompressedGossip(mixing, compressor, **kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- settings


def rule_of(cfg: object) -> RobustRule | None:
    """The robust rule `comm.*` asks for, or None (plain gossip). Plain gossip with the
    staleness check is the rule `none`: the same average, over the neighbours not cut off."""
    c = cfg.comm  # type: ignore[attr-defined]
    if c.robust == "none" and c.robust_stale is None:
        return None
    return RobustRule(
        c.robust,
        trim=c.robust_trim,
        radius=c.robust_radius,
        exclude=c.robust_exclude,
        exclude_window=c.robust_exclude_window,
        stale=c.robust_stale,
    )


def check_graph(cfg: object, degrees: Sequence[int]) -> None:
    """A robust rule needs enough neighbours at every peer for its trimming (ConfigError).
    Warns where exclusion can split the graph: with the adaptive radius a peer clips b of
    its neighbours at every exchange, a peer of b + 1 neighbours keeps one after cutting off
    b, and under label skew the neighbours cut off are often honest ones."""
    from declora.errors import ConfigError

    rule = rule_of(cfg)
    if rule is None:
        return
    need = rule.min_neighbours()
    short = [i for i, d in enumerate(degrees) if d < need]
    if short:
        c = cfg.comm  # type: ignore[attr-defined]
        raise ConfigError(
            f"comm.robust={rule.name} with comm.robust_trim={c.robust_trim} needs at least {need} "
            f"neighbours per peer; peer(s) {short[:8]} have {min(degrees[i] for i in short)} "
            "(use a denser topology, a smaller comm.robust_trim"
            + (", or comm.robust_radius)" if rule.name == "clip" else ")")
        )
    few = [i for i, d in enumerate(degrees) if d <= rule.trim + 1]
    if rule.exclude is not None and rule.radius is None and few:
        log.warning(
            "warning: comm.robust_exclude with the adaptive radius on a sparse graph: %d of "
            "%d peers (such as %s) have %d neighbours, clip %d of them at every exchange and "
            "may cut them off for good, which can split the graph (on the robust study's "
            "ring, without any attacker, it cut 6 to 9 of the 20 directed links; "
            "docs/robustness.md). Prefer comm.robust=clip without exclusion, a denser "
            "topology, or a fixed comm.robust_radius",
            len(few),
            len(degrees),
            few[:4],
            min(degrees[i] for i in few),
            rule.trim,
        )
