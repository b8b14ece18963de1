"""The round loop: K local steps on every peer, one gossip step, evaluation every E rounds.

Baselines are the same loop with another plan: FedAvg is W = 11^T/n, local-only is W = I,
centralized is one peer holding the pooled data with the same total batch. The follow-ups are
the same loop too: the plan says which factors train in a round (FFA, ADF), the communicator how
received values combine (DeCAF), and the plan's schedule which matrix mixes in a round, which
peers are online and how many local steps each one takes (dynamic networks).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from declora.data.sampling import PeerSampler, PoissonSampler, make_sampler
from declora.engine import checkpoint as ckpt
from declora.engine import faults
from declora.engine.plan import Plan
from declora.engine.privacy import PrivacyLedger
from declora.network.health import check_losses, check_peers
from declora.network.hetero import values_per_peer as count_ranked
from declora.network.mixing import LORA_FACTORS
from declora.network.overlap import OverlappedGossip
from declora.network.simulated import BYTES_PER_VALUE, SimulatedGossip, consensus_distance
from declora.network.simulated import values_per_peer as count_values
from declora.tasks.evaluate import summarize_peers
from declora.tasks.task import Example


class Communicator(Protocol):
    """How the peers exchange and combine their values: the stacked simulator, or the
    transport of one peer in its own process. The whole contract the loop relies on."""

    #: Exact bytes each local peer sent in the last `mix`; None: uncompressed fp32 messages,
    #: counted by the loop from the plan (values x 4 bytes x copies sent).
    last_bytes: np.ndarray | None

    def mix(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...
    def set_mixing(self, mixing: np.ndarray) -> None: ...
    def state_dict(self) -> dict[str, torch.Tensor]: ...
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


class Engine(Protocol):
    n: int

    def train_step(
        self, peer_examples: Sequence[Sequence[Example]], active: np.ndarray | None = None
    ) -> torch.Tensor: ...
    def set_trainable(self, factors: frozenset[str]) -> None: ...
    def stacked(self) -> dict[str, torch.Tensor]: ...
    def load_stacked(self, values: dict[str, torch.Tensor]) -> None: ...
    def outputs_single(
        self, values: dict[str, torch.Tensor], examples: Sequence[Example]
    ) -> torch.Tensor: ...
    def outputs_all_peers(
        self, examples: Sequence[Example], peers: int | None = None
    ) -> torch.Tensor: ...
    def use_single(self, values: dict[str, torch.Tensor]) -> AbstractContextManager: ...
    def state_dict(self) -> dict[str, Any]: ...  # adapters, optimizers, schedulers
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def momentum(self, keys: Iterable[str]) -> dict[str, torch.Tensor]: ...
    def load_momentum(self, buffers: dict[str, torch.Tensor]) -> None: ...
    def reset_optimizer_state(
        self, factors: frozenset[str], peers: np.ndarray | None = None
    ) -> None: ...
    def remove(self) -> torch.nn.Module: ...  # the base model as it was before wrapping


class EvaluatorLike(Protocol):
    """What the round loop needs from an evaluator (classification or causal LM)."""

    primary: str  # the metric shown in progress bars and summaries
    columns: tuple[str, ...]  # the metrics of the summary table, in order
    higher_is_better: bool

    def average(self, engine: Engine, *, final: bool = False) -> dict[str, float]: ...
    def peers(self, engine: Engine) -> list[dict[str, float]]: ...
    def extras(self, engine: Engine) -> dict[str, Any]: ...


@dataclass(frozen=True)
class LoopSettings:
    """How long and how often: the round loop's numbers, taken from the config's sections."""

    rounds: int
    local_steps: int
    seed: int
    eval_every: int
    eval_peers: str = "final"  # evaluate each peer's own model: final, every, never
    lora_modules: tuple[str, ...] = ()  # for the consensus distance
    gossip_steps: int = 1  # exchanges per round
    final_gossip_steps: int = 0  # more exchanges after the last round's, no training between
    lora_scale: float = 1.0  # s in s B A, for the consensus distance
    poisson: bool = False  # Poisson sampling of each step's batch (DP-SGD)
    ranks: tuple[int, ...] | None = None  # lora.ranks of this process's peers (bytes per peer)
    mix_momentum: bool = False  # comm.mix_momentum: SGD momentum buffers travel with the values

    @classmethod
    def of(
        cls,
        cfg: Any,
        *,
        n_peers: int,
        lora_modules: tuple[str, ...] = (),
        gossip_steps: int = 1,
        lora_scale: float = 1.0,
        final_gossip_steps: int = 0,
    ) -> LoopSettings:
        """From a RunConfig's `train` and `eval` sections (one peer evaluates no peers)."""
        return cls(
            rounds=cfg.train.rounds,
            local_steps=cfg.train.local_steps,
            seed=cfg.seed,
            eval_every=cfg.eval.every,
            eval_peers=cfg.eval.peers if n_peers > 1 else "never",
            lora_modules=lora_modules,
            gossip_steps=gossip_steps,
            final_gossip_steps=final_gossip_steps,
            lora_scale=lora_scale,
            poisson=cfg.privacy.on,
            mix_momentum=cfg.comm.mix_momentum,
        )


@dataclass
class LoopHooks:
    """What the caller hears from the loop: each evaluated round, the metrics restored from a
    checkpoint, and a progress bar."""

    on_record: Callable[[dict[str, Any]], None] | None = None
    on_restore: Callable[[list[dict[str, Any]]], None] | None = None
    progress: bool = True


@dataclass
class Result:
    """What one algorithm's run produced."""

    algorithm: str
    records: list[dict[str, Any]] = field(default_factory=list)
    peer_metrics: list[dict[str, float]] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)
    final: dict[str, torch.Tensor] = field(default_factory=dict)
    wall_seconds: float = 0.0
    cpu_seconds: float | None = None  # None: resumed from a checkpoint that did not count it

    def last(self, key: str) -> float | None:
        for rec in reversed(self.records):
            if key in rec:
                return rec[key]
        return None

    def best(self, key: str, higher_is_better: bool = True) -> float | None:
        vals = [r[key] for r in self.records if key in r]
        if not vals:
            return None
        return max(vals) if higher_is_better else min(vals)


@dataclass
class Checkpointing:
    """Where and how often the round loop saves itself, and whether it starts from a save."""

    root: Path
    every: int
    fingerprint: str
    keep: int = 1
    resume: bool = False
    at: int | None = None  # resume from this round (0: from scratch); None: the newest save
    also_accepted: tuple[str, ...] = ()  # the same run as older versions fingerprinted it

    def saved(self) -> ckpt.Checkpoint | None:
        if not self.resume or self.at == 0:
            return None
        fp, also = self.fingerprint, self.also_accepted
        if self.at is None:
            return ckpt.latest(self.root, fingerprint=fp, also=also)
        return ckpt.load(ckpt.round_dir(self.root, self.at), fingerprint=fp, also=also)


class NetworkView(Protocol):
    """Network-wide quantities of the round loop: trivial in simulation (every peer is here),
    collective operations in distributed mode (each process holds one peer)."""

    def mean(self, total: float, count: int) -> float: ...  # sum over peers / count
    def bytes_sent(self, local: np.ndarray) -> tuple[float, float]: ...  # (mean, total)
    def consensus(
        self, values: dict[str, torch.Tensor], lora_modules: tuple[str, ...], scale: float
    ) -> float | None: ...
    def annotate(self, rec: dict[str, Any], local_loss: float, local_bytes: np.ndarray) -> None: ...


class LocalNetwork:
    """All peers live in this process."""

    def mean(self, total: float, count: int) -> float:
        return total / count if count else float("nan")

    def bytes_sent(self, local: np.ndarray) -> tuple[float, float]:
        return float(local.mean()), float(local.sum())

    def consensus(
        self, values: dict[str, torch.Tensor], lora_modules: tuple[str, ...], scale: float
    ) -> float:
        return consensus_distance(values, lora_modules, scale)

    def annotate(self, rec: dict[str, Any], local_loss: float, local_bytes: np.ndarray) -> None:
        return None


@dataclass
class LoopParts:
    """One algorithm's parts for the round loop (built by `declora.runners.build`)."""

    engine: Engine
    plan: Plan
    evaluator: EvaluatorLike
    communicator: Communicator | None = None  # None: exact fp32 mixing with the plan's W
    mix_keys: set[str] | None = None  # what is sent; None: every tensor
    checkpoints: Checkpointing | None = None
    peers: Sequence[int] | None = None  # held in this process; None: all of them
    network: NetworkView | None = None  # None: every peer is here
    privacy: PrivacyLedger | None = None  # DP-SGD: every peer's spent epsilon


def _loop_state(
    t: int,
    engine: Engine,
    samplers: list[PeerSampler | PoissonSampler],
    gossip: Communicator,
    result: Result,
    bytes_sent: np.ndarray,
    steps_done: np.ndarray,
    losses: list[torch.Tensor],
    elapsed: float,
    cpu_elapsed: float | None,
) -> dict[str, Any]:
    """Everything that decides what the next round does (and what was measured so far)."""
    cpu = {} if cpu_elapsed is None else {"cpu_elapsed": cpu_elapsed}
    return {
        "round": t,
        "engine": engine.state_dict(),
        "samplers": [s.state_dict() for s in samplers],
        "gossip": dict(gossip.state_dict()),
        "torch_rng": torch.get_rng_state(),
        "bytes_sent": torch.from_numpy(bytes_sent.astype(np.float64)),
        "steps_done": torch.from_numpy(steps_done.astype(np.int64)),
        "losses": [x.clone() for x in losses],
        "records": result.records,
        "peer_metrics": result.peer_metrics,
        "extras": result.extras,
        "elapsed": elapsed,
        **cpu,
    }


def train(
    parts: LoopParts,
    train_examples: Sequence[Example],
    settings: LoopSettings,
    hooks: LoopHooks | None = None,
) -> Result:
    """Run the Dec-LoRA round loop for one plan and return its metrics and final adapters.

    The communicator defaults to exact fp32 mixing with W; a compressed one reports the exact
    bytes of the buffers each peer sent (`last_bytes`); with a plan schedule it takes each
    round's matrix (`set_mixing`). `parts.peers` are the peers this process holds (all of them
    in simulation, one in distributed mode). With `parts.checkpoints`, the loop saves itself
    every `every` rounds and at the end, and with `resume` continues from the newest save
    exactly as if it had never stopped (`hooks.on_restore` gets the metrics recorded so far)."""
    engine, plan, evaluator = parts.engine, parts.plan, parts.evaluator
    hooks = hooks or LoopHooks()
    rounds, local_steps, seed = settings.rounds, settings.local_steps, settings.seed
    eval_every, eval_peers = settings.eval_every, settings.eval_peers
    mix_keys, checkpoints, peers = parts.mix_keys, parts.checkpoints, parts.peers
    on_record, on_restore = hooks.on_record, hooks.on_restore
    local = list(range(plan.n)) if peers is None else list(peers)
    samplers = [
        make_sampler(plan.parts[i], plan.batch_size, seed, i, poisson=settings.poisson)
        for i in local
    ]
    gossip = parts.communicator or SimulatedGossip(plan.mixing)
    overlapped = isinstance(gossip, OverlappedGossip)  # comm.overlap: round t sends x^{t-1}
    network = parts.network or LocalNetwork()
    result = Result(plan.algorithm)
    values_sent: int | np.ndarray | None = None  # numbers in one copy of what a peer sends
    bytes_sent = np.zeros(len(local))
    steps_done = np.zeros(len(local), dtype=np.int64)
    losses: list[torch.Tensor] = []
    trainable = LORA_FACTORS  # engines start with both factors trainable
    first, elapsed = 1, 0.0
    cpu_elapsed: float | None = 0.0  # None: a checkpoint from before CPU time was recorded
    saved = checkpoints.saved() if checkpoints else None
    if saved is not None:
        try:
            first = _restore(saved.state, engine, samplers, gossip, result) + 1
            elapsed = float(saved.state["elapsed"])
            cpu = saved.state.get("cpu_elapsed")
            cpu_elapsed = None if cpu is None else float(cpu)
            bytes_sent = saved.state["bytes_sent"].numpy().astype(np.float64)
            steps_done = saved.state["steps_done"].numpy().astype(np.int64)
            losses = list(saved.state["losses"])
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
            raise ckpt.unusable(saved.path, e) from None
        if on_restore:
            on_restore(result.records)
        if parts.privacy is not None:  # the steps each peer took are the plan's
            for r in range(1, first):
                parts.privacy.add(plan.local_steps(r, local_steps))
    elif checkpoints is not None and checkpoints.resume and on_restore:
        on_restore([])  # nothing saved yet: start over, without the last attempt's metrics
    start = time.perf_counter() - elapsed
    cpu_start = None if cpu_elapsed is None else time.process_time() - cpu_elapsed
    bar = tqdm(
        range(first, rounds + 1),
        desc=plan.algorithm,
        unit="round",
        disable=not hooks.progress,
        initial=first - 1,
        total=rounds,
    )
    for t in bar:
        if plan.factors(t) != trainable:  # FFA freezes A, ADF alternates
            trainable = plan.factors(t)
            engine.set_trainable(trainable)
        stale = plan.policy.stale_optimizer_state(t)  # ADF: the factor that resumes training
        if stale and not plan.policy.stale_after_mixing:
            engine.reset_optimizer_state(stale, plan.stale_peers(t)[local])
        if overlapped:  # send what this round starts from, then train while it travels
            if plan.schedule is not None:
                gossip.set_mixing(plan.mixing_at(t))
            gossip.start(_sent(engine.stacked(), mix_keys))
        # offline peers take 0 steps, stragglers fewer than K; a peer's data order only
        # advances for the steps it takes. The LR schedule counts every step of the round.
        every_peer = plan.local_steps(t, local_steps)
        steps = every_peer[local]
        if parts.privacy is not None:  # stop before any peer would exceed its target epsilon
            parts.privacy.check(t, every_peer)
            parts.privacy.add(every_peer)
        steps_done += steps
        for k in range(local_steps):
            active = steps > k
            batches = [
                [train_examples[j] for j in s.next()] if on else []
                for s, on in zip(samplers, active, strict=True)
            ]
            losses.append(engine.train_step(batches, active=None if active.all() else active))
            fed = active & np.array([len(b) > 0 for b in batches])  # a Poisson batch may be empty
            check_losses(t, losses[-1], local, fed)
        faults.maybe_kill(t, local)
        values = engine.stacked()
        check_peers(t, values, local, "after its local steps")  # before anything is sent
        shared = _sent(values, mix_keys)
        if settings.mix_momentum:  # each sent tensor's momentum buffer goes with it
            buffers = engine.momentum(list(shared))
            shared.update({k + MOMENTUM: v for k, v in buffers.items()})
        if values_sent is None:  # with lora.ranks, each peer sends its own rank's factors
            ranks = settings.ranks
            values_sent = count_values(shared) if ranks is None else count_ranked(shared, ranks)
        if plan.schedule is not None and not overlapped:  # this round's graph, online peers
            gossip.set_mixing(plan.mixing_at(t))
        sent_per_round = plan.messages_at(t)[local] * values_sent * BYTES_PER_VALUE
        exchanges = settings.gossip_steps + (settings.final_gossip_steps if t == rounds else 0)
        for _ in range(exchanges):  # after the last round, comm.final_gossip more
            shared = gossip.mix(shared)
            measured = gossip.last_bytes
            bytes_sent += sent_per_round if measured is None else measured
        check_peers(t, shared, local, "after gossip")
        if settings.mix_momentum:
            moved = [k for k in shared if k.endswith(MOMENTUM)]
            engine.load_momentum({k.removesuffix(MOMENTUM): shared.pop(k) for k in moved})
        engine.load_stacked(shared)
        if stale and plan.policy.stale_after_mixing:  # DeCAF: the mixing changed the basis
            engine.reset_optimizer_state(stale, plan.stale_peers(t)[local])
        if t % eval_every == 0 or t == rounds:
            stacked = torch.stack(losses)  # NaN where a peer sat a step out
            taken = ~torch.isnan(stacked)
            local_loss = float(torch.nanmean(stacked))
            rec = {
                "round": t,
                "examples_per_peer": _examples(steps_done, plan.batch_size),
                # the mean over every step any peer took, however the peers are spread
                "train_loss": (
                    network.mean(float(stacked[taken].sum()), int(taken.sum()))
                    if parts.privacy is None  # with DP a peer's training loss stays with it
                    else local_loss
                ),
            }
            rec.update(evaluator.average(engine, final=t == rounds))
            if eval_peers == "every" or (eval_peers == "final" and t == rounds):
                result.peer_metrics = evaluator.peers(engine)
                rec.update(summarize_peers(result.peer_metrics))
            losses = []
            rec["consensus_distance"] = network.consensus(
                engine.stacked(), settings.lora_modules, settings.lora_scale
            )
            rec["bytes_sent"], rec["bytes_sent_total"] = network.bytes_sent(bytes_sent)
            if settings.ranks is not None and parts.network is None:  # peers differ: each one
                rec["bytes_sent_per_peer"] = bytes_sent.tolist()
            rec["wall_seconds"] = round(time.perf_counter() - start, 3)
            if cpu_start is not None:  # this process's CPU time: pauses and other load aside
                rec["cpu_seconds"] = round(time.process_time() - cpu_start, 3)
            rec.update(getattr(gossip, "round_metrics", dict)())  # robust rules' flags
            if parts.privacy is not None:
                rec.update(parts.privacy.metrics())  # epsilon spent so far, every peer's
            network.annotate(rec, local_loss, bytes_sent)
            result.records.append(rec)
            key = evaluator.primary
            shown = {"loss": f"{rec['train_loss']:.3f}"}
            if key in rec:
                shown[key[:4]] = f"{rec[key]:.3f}"
            if "epsilon" in rec:
                shown["eps"] = f"{rec['epsilon']:.2f}"
            bar.set_postfix(shown)
            if on_record:
                on_record(rec)
        if t == rounds:
            result.extras = evaluator.extras(engine)
        if checkpoints and (t % checkpoints.every == 0 or t == rounds):
            state = _loop_state(
                t,
                engine,
                samplers,
                gossip,
                result,
                bytes_sent,
                steps_done,
                losses,
                time.perf_counter() - start,
                None if cpu_start is None else time.process_time() - cpu_start,
            )
            ckpt.save(
                checkpoints.root,
                t,
                state,
                fingerprint=checkpoints.fingerprint,
                keep=checkpoints.keep,
            )
    result.final = {k: v.clone() for k, v in engine.stacked().items()}
    result.wall_seconds = time.perf_counter() - start
    result.cpu_seconds = None if cpu_start is None else time.process_time() - cpu_start
    return result


#: suffix of a momentum buffer's key in what is sent (`comm.mix_momentum`): not a LoRA factor's
#: name, so every combine rule treats it as one more tensor to average
MOMENTUM = ".momentum"


def _sent(values: dict[str, torch.Tensor], keys: set[str] | None) -> dict[str, torch.Tensor]:
    """The tensors a peer sends (`LoopParts.mix_keys`; None: all of them)."""
    return {k: v for k, v in values.items() if keys is None or k in keys}


def _examples(steps_done: np.ndarray, batch_size: int) -> int | float:
    """Training examples per peer so far (mean over this process's peers): an integer when
    every peer took every step, as without stragglers and offline peers."""
    total = int(steps_done.sum()) * batch_size
    return total // len(steps_done) if total % len(steps_done) == 0 else total / len(steps_done)


def _restore(
    state: dict[str, Any],
    engine: Engine,
    samplers: list[PeerSampler | PoissonSampler],
    gossip: Communicator,
    result: Result,
) -> int:
    """Put a saved loop state back; returns the round it was saved after."""
    if len(state["samplers"]) != len(samplers):
        raise ckpt.CheckpointError(
            f"checkpoint holds {len(state['samplers'])} peers' data positions, this run has "
            f"{len(samplers)}"
        )
    engine.load_state_dict(state["engine"])
    for s, saved in zip(samplers, state["samplers"], strict=True):
        s.load_state_dict(saved)
    gossip.load_state_dict(state["gossip"])
    torch.set_rng_state(state["torch_rng"].to(torch.uint8))
    result.records = list(state["records"])
    result.peer_metrics = list(state["peer_metrics"])
    result.extras = dict(state["extras"])
    return int(state["round"])
