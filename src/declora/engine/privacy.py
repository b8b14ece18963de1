"""Differential privacy per peer: DP-SGD on each peer's adapter, calibrated and accounted by
Opacus (imported only when `privacy.mechanism=dp-sgd`).

Two objects, made from one calibration (`calibrate`):

* `DPSGD`, the mechanism the batched engine applies to the peers it holds: every example's
  gradient of the trainable adapter and head tensors is clipped to `max_grad_norm`, a peer's
  clipped gradients are summed, Gaussian noise of std `noise_multiplier * max_grad_norm` is
  added and the sum is divided by the expected batch size (Opacus' convention). Each peer draws
  its noise from its own generator seeded by (seed, peer), so a peer in its own process draws
  exactly the noise it draws in a simulation.
* `PrivacyLedger`, the accountant of every peer of the plan: a peer that took s steps at
  sample rate q = batch_size / N_i and noise multiplier sigma_i has spent
  epsilon_i(s) = accountant(sigma_i, q, s; delta_i). Steps come from the plan (offline peers
  and stragglers take fewer), so every process of a distributed run knows every peer's
  epsilon without a message, and a resumed run recomputes it.

Sampling is Poisson (each example of a peer joins a step independently with probability q,
`declora.data.sampling.PoissonSampler`), which is what Opacus' RDP and PRV accountants assume.
Gossip of the resulting adapters is post-processing: see docs/privacy.md for what the guarantee
covers.
"""

from __future__ import annotations

import contextlib
import secrets
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from declora.config.schema import PrivacyConfig
from declora.errors import ConfigError, DecloraError

#: RDP orders searched for the tightest conversion: Opacus' defaults plus larger orders, which
#: small sample rates and few steps need (Opacus warns when the best order is its largest).
RDP_ALPHAS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
RDP_ALPHAS += [80, 128, 256, 512, 1024, 4096]


class PrivacyBudgetExhausted(DecloraError):
    """The next round would take a peer past its target epsilon: the run stops before it."""


def require_opacus() -> None:
    """A clear ConfigError, before any work, when the privacy extra is not installed."""
    try:
        import opacus  # noqa: F401
    except ImportError:
        raise ConfigError(
            "privacy.mechanism=dp-sgd needs Opacus: pip install 'declora[privacy]' (opacus>=1.6,<2)"
        ) from None


def _accountant_kwargs(accountant: str) -> dict[str, Any]:
    return {"alphas": RDP_ALPHAS} if accountant == "rdp" else {}


@contextlib.contextmanager
def _quiet_prv_domain(accountant: str) -> Iterator[None]:
    """Silence Opacus' "Optimal order is the largest alpha" while the PRV accountant works: it
    comes from the RDP estimate, at Opacus' own orders, that only sizes the PRV's
    discretisation domain. The epsilon returned is the PRV's upper bound, so the warning
    says nothing about it and would mislead a user."""
    with warnings.catch_warnings():
        if accountant == "prv":
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        yield


def epsilon_spent(accountant: str, sigma: float, rate: float, steps: int, delta: float) -> float:
    """Epsilon of `steps` Poisson-subsampled Gaussian steps (Opacus' accountant)."""
    if steps <= 0:
        return 0.0
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = [(float(sigma), float(rate), int(steps))]
    with _quiet_prv_domain(accountant):
        eps = float(acc.get_epsilon(delta=delta, **_accountant_kwargs(accountant)))
    return max(0.0, eps)  # the RDP conversion can dip below 0 for a large delta


@dataclass(frozen=True)
class Calibration:
    """Every peer's DP-SGD parameters for one plan (rows: the plan's peers)."""

    noise_multipliers: np.ndarray
    sample_rates: np.ndarray
    deltas: np.ndarray
    max_grad_norm: float
    expected_batch: int
    target_epsilon: float | None
    accountant: str
    planned_steps: int
    seed: int


def calibrate(
    p: PrivacyConfig, sizes: Sequence[int], batch_size: int, steps: int, seed: int
) -> Calibration:
    """Noise multipliers of peers with `sizes` examples, sampled at batch_size / N_i, so that
    none spends more than `p.epsilon` in `steps` steps (Opacus' `get_noise_multiplier`), or
    `p.noise_multiplier` for all. Raises ConfigError when a target cannot be met."""
    sizes_a = np.asarray(sizes, dtype=np.int64)
    rates = np.minimum(1.0, batch_size / np.maximum(sizes_a, 1))
    deltas = np.array([p.delta if p.delta is not None else 1.0 / n for n in sizes_a])
    if p.noise_multiplier is not None:
        sigmas = np.full(len(sizes_a), float(p.noise_multiplier))
    else:
        from opacus.accountants.utils import get_noise_multiplier

        assert p.epsilon is not None  # the config check asks for one of the two
        found: dict[tuple[float, float], float] = {}
        sigmas = np.zeros(len(sizes_a))
        for i, (q, d) in enumerate(zip(rates, deltas, strict=True)):
            key = (float(q), float(d))
            if key not in found:
                with _quiet_prv_domain(p.accountant):
                    try:
                        found[key] = get_noise_multiplier(
                            target_epsilon=p.epsilon,
                            target_delta=float(d),
                            sample_rate=float(q),
                            steps=steps,
                            accountant=p.accountant,
                            **_accountant_kwargs(p.accountant),
                        )
                    except ValueError as exc:
                        raise ConfigError(
                            f"privacy.epsilon={p.epsilon} cannot be met by peer {i} ({sizes_a[i]} "
                            f"examples, {steps} steps of batch {batch_size}): {exc}"
                        ) from None
            sigmas[i] = found[key]
    return Calibration(
        sigmas, rates, deltas, p.max_grad_norm, batch_size, p.epsilon, p.accountant, steps, seed
    )


def noise_seed(seed: int, peer: int) -> int:
    """The seed of a peer's noise generator: a pure function of (run seed, peer)."""
    return int(np.random.SeedSequence([seed, peer, 0xD9]).generate_state(1, np.uint64)[0] >> 1)


class DPSGD:
    """The DP-SGD step's arithmetic for the peers one engine holds (`peers`: their ids in the
    plan, which seed their noise)."""

    def __init__(self, cal: Calibration, peers: Sequence[int], *, secure: bool = False) -> None:
        """`secure`: seed each peer's generator from the OS's entropy instead of (seed, peer),
        so that nobody who knows the config can recompute the noise (not reproducible)."""
        self.peers = list(peers)
        self.max_grad_norm = cal.max_grad_norm
        self.expected_batch = cal.expected_batch
        self.noise_multipliers = [float(cal.noise_multipliers[i]) for i in self.peers]
        self.secure = secure
        self.generators = [
            torch.Generator().manual_seed(
                secrets.randbits(63) if secure else noise_seed(cal.seed, i)
            )
            for i in self.peers
        ]

    def clip_factors(self, norms: torch.Tensor) -> torch.Tensor:
        """Opacus' per-example clip factor min(1, C / (norm + 1e-6))."""
        return (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)

    def noise(self, row: int, shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
        """Gaussian noise of std sigma_i * C for the engine's peer `row`, from its generator."""
        std = self.noise_multipliers[row] * self.max_grad_norm
        z = torch.normal(0.0, std, size=tuple(shape), generator=self.generators[row])
        return z.to(device=like.device, dtype=like.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": [g.get_state() for g in self.generators]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for g, s in zip(self.generators, state["rng"], strict=True):
            g.set_state(s.to(torch.uint8))


class PrivacyLedger:
    """Every peer's spent epsilon, from the steps the plan gives it; refuses a round that
    would take a peer past the target."""

    def __init__(self, cal: Calibration) -> None:
        self.cal = cal
        self.steps = np.zeros(len(cal.noise_multipliers), dtype=np.int64)

    def _epsilon(self, i: int, steps: int) -> float:
        c = self.cal
        return epsilon_spent(
            c.accountant,
            float(c.noise_multipliers[i]),
            float(c.sample_rates[i]),
            steps,
            float(c.deltas[i]),
        )

    def check(self, round_: int, steps: np.ndarray) -> None:
        """Raise `PrivacyBudgetExhausted` when taking `steps` more (per peer) in `round_`
        would spend more than the target epsilon for some peer."""
        target = self.cal.target_epsilon
        if target is None:
            return
        after = self.steps + np.asarray(steps, dtype=np.int64)
        for i in np.flatnonzero(after > self.cal.planned_steps):  # calibrated up to planned
            eps = self._epsilon(int(i), int(after[i]))
            if eps > target:
                raise PrivacyBudgetExhausted(
                    f"round {round_}: peer {i} would spend epsilon {eps:.3f} > "
                    f"privacy.epsilon={target:g} (delta {self.cal.deltas[i]:.3g}, "
                    f"{after[i]} DP-SGD steps); the run stops before that round (the last "
                    "checkpoint and metrics hold what was trained within the budget)"
                )

    def add(self, steps: np.ndarray) -> None:
        self.steps += np.asarray(steps, dtype=np.int64)

    def spent(self) -> list[float]:
        return [self._epsilon(i, int(s)) for i, s in enumerate(self.steps)]

    def metrics(self) -> dict[str, Any]:
        """What each evaluated round records: the largest epsilon any peer spent so far and
        every peer's."""
        eps = self.spent()
        return {"epsilon": round(max(eps), 4), "epsilon_peers": [round(e, 4) for e in eps]}

    def summary(self) -> dict[str, Any]:
        """The calibration, for the report."""
        c = self.cal
        return {
            "accountant": c.accountant,
            "target_epsilon": c.target_epsilon,
            "max_grad_norm": c.max_grad_norm,
            "noise_multipliers": [round(float(s), 4) for s in c.noise_multipliers],
            "sample_rates": [float(q) for q in c.sample_rates],
            "deltas": [float(d) for d in c.deltas],
        }
