"""Real peers: one peer per process on torch.distributed (gloo on CPU, NCCL on GPU).

Each process holds one peer's adapter and runs the same round loop as the simulation
(`declora.engine.round_loop.train`) with three pieces swapped in:

* `PeerGossip` sends this peer's packed buffers (the compressor's bytes, exactly what the byte
  accounting counts) to its out-neighbours and receives its in-neighbours' buffers with
  point-to-point sends and receives (`post_ops`), checks them, decodes them and mixes with its
  row of W. No rank gathers the model. A neighbour that does not answer within
  `comm.timeout_s` (or whose connection is gone) raises `PeerFailure` naming it, or with
  `comm.on_peer_failure=skip` is dropped (the remaining weights are renormalised).
* `PeerNetwork` turns the loop's network-wide numbers (mean loss, bytes, consensus) into small
  all-reduces; `MonitoredEvaluator` evaluates the averaged model on rank 0 as an optional
  monitoring step (`eval.monitor`).
* `handshake` makes every peer compare a fingerprint of its config, model, data and adapter
  shapes with everyone else's before any training; a mismatch (or a peer that failed to start)
  stops every peer with one message naming the peers and the difference.

Only tensors travel: JSON text is sent as uint8 tensors, nothing is pickled.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from declora.errors import ConfigError, DecloraError
from declora.model.adapters import PLAIN_LEAVES, at_rank, padded
from declora.network.attacks import Attack
from declora.network.compress import Compressor, Packet
from declora.network.compressed import peer_generator
from declora.network.mixing import (
    choco_step,
    decaf_combine,
    hetero_combine,
    mix_with_own_exact,
)
from declora.network.robust import FlagCounts, RobustRule, message_digest, robust_combine

log = logging.getLogger("declora.network.distributed")


class PeerFailure(DecloraError):
    """A neighbour did not answer in time, or sent something unusable."""


class SetupMismatch(DecloraError):
    """Peers disagree on what they are running, or one of them could not start."""


_ABANDONED: list[Any] = []  # ops given up on; kept alive so nothing writes into freed memory


def failure_reason(exc: BaseException, limit: int = 160) -> str:
    """What a failed transfer's exception says, in at most `limit` characters of whole
    sentences (or words): gloo's source location and torch's generic advice ("This is
    typically caused by ...", cut off mid-word before) left out."""
    text = str(exc).strip()
    # gloo prefixes its messages with a source location: keep what it says, not where
    last = text.splitlines()[-1] if text else ""
    said = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", last)
    said = re.sub(r"\s*This is typically caused by .*$", "", said).strip()
    if len(said) > limit:
        cut = said[:limit]
        end = cut.rfind(". ")
        said = cut[: end + 1] if end > 0 else cut.rsplit(" ", 1)[0] + " ..."
    return said or type(exc).__name__


def _wait_all(works: list[Any], deadline: float) -> list[str | None]:
    """Wait for asynchronous ops until `deadline` (time.monotonic); per op None when it
    completed, else why not. Each wait runs in a helper thread without a deadline of its own
    (all at once, so one silent peer does not eat the others' time), because a gloo timeout
    closes every connection of the process, not just the silent neighbour's."""
    failures: list[list[BaseException]] = [[] for _ in works]

    def run(work: Any, failure: list[BaseException]) -> None:
        try:
            work.wait()
        except Exception as exc:  # reported to the caller, who names the peer
            failure.append(exc)

    threads = [
        threading.Thread(target=run, args=(w, f), daemon=True)
        for w, f in zip(works, failures, strict=True)
    ]
    for t in threads:
        t.start()
    out: list[str | None] = []
    for work, thread, failure in zip(works, threads, failures, strict=True):
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            _ABANDONED.append(work)
            out.append("no answer in time")
        else:
            out.append(failure_reason(failure[0]) if failure else None)
    return out


def post_ops(ops: list[Any]) -> tuple[list[Any], list[str | None]]:
    """Start an exchange's receives and sends: (works, per op None or why it could not
    start). On gloo each op starts on its own, so a connection that a dead neighbour closed
    fails that neighbour's op alone; `batch_isend_irecv` posts them one by one there too, but
    raises from the middle of the batch, with the earlier ops posted and lost to the caller.
    NCCL keeps the batch: it groups the ops so that their order cannot deadlock."""
    if dist.get_backend() == "nccl":
        return dist.batch_isend_irecv(ops), [None] * len(ops)
    works: list[Any] = []
    problems: list[str | None] = []
    for op in ops:
        try:
            works.append(op.op(op.tensor, op.peer, tag=op.tag))
            problems.append(None)
        except RuntimeError as exc:  # the connection is gone: this neighbour's op fails
            works.append(None)
            problems.append(failure_reason(exc))
    return works, problems


def _collective(work: Any, what: str, seconds: float) -> None:
    problem = _wait_all([work], time.monotonic() + seconds)[0]
    if problem:
        raise PeerFailure(
            f"{what} did not complete within {seconds:g} s ({problem}): a peer stopped or hangs"
        )


def barrier(what: str, seconds: float) -> None:
    _collective(dist.barrier(async_op=True), what, seconds)


def launched() -> bool:
    """True inside a process started by torchrun (or with the same environment by hand)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


@dataclass(frozen=True)
class PeerProcess:
    """This process's place in the group: it holds peer `rank` of `world` peers."""

    rank: int
    world: int
    device: torch.device

    @property
    def leader(self) -> bool:
        return self.rank == 0


def start(backend: str = "auto", timeout_s: float = 60.0) -> PeerProcess:
    """Join the process group torchrun describes in the environment."""
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError("comm.backend=nccl needs CUDA GPUs; use gloo (or auto) on CPU")
    if not dist.is_initialized():
        dist.init_process_group(
            backend,
            store=_store(),
            rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
            timeout=timedelta(days=7),  # deadlines are ours (`_wait`), never gloo's
        )
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu")
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    return PeerProcess(rank, world, device)


def _store() -> dist.Store:
    """The group's store. `declora launch` has rank 0 host a new one on each attempt; a store
    shared from torchrun's agent outlives attempts, so there the keys go under a prefix per
    attempt: after a restart the group must not read the previous attempt's addresses (with
    torch 2.13 and gloo it otherwise tries to reach the dead processes and fails). The attempt
    number is each agent's own count, so a machine started again (whose count begins at 0)
    only meets the others in a store of its attempt's own: hence no prefix there."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    hosting = not agent and rank == 0
    listener = _loopback_listener(host, port) if hosting else None
    store = dist.TCPStore(
        host,
        port,
        world,
        is_master=hosting,
        timeout=timedelta(seconds=300),
        master_listen_fd=None if listener is None else listener.fileno(),
    )
    if listener is not None:
        _LISTENERS.append(listener)  # the store serves on it for the life of the process
    if not agent:
        return dist.PrefixStore("declora", store)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"declora/attempt-{attempt}", store)


_LISTENERS: list[socket.socket] = []


def _loopback_listener(host: str, port: int) -> socket.socket | None:
    """A listening socket on the loopback address `host`, for a store that must not be
    reachable from the network (TCPStore itself listens on every interface); None when `host`
    is not a loopback address."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return None
    if not infos or not all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos):
        return None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(max(128, int(os.environ.get("WORLD_SIZE", "1")) * 2))
    except OSError:
        sock.close()
        raise
    return sock


def ops_abandoned() -> bool:
    """Whether some operation was given up on (a silent peer): the process cannot tear its
    group down cleanly and should exit without waiting for it."""
    return bool(_ABANDONED)


def stop() -> None:
    """Leave the group; with ops still pending on a silent peer, just let the process end
    (tearing the group down would wait for them)."""
    if dist.is_initialized() and not _ABANDONED:
        dist.destroy_process_group()


# ------------------------------------------------------------------ JSON over tensors


STARTUP_S = 900.0  # how long peers wait for each other at start-up (model loading differs)


#: The least every peer accepts as another peer's start-up message, whatever its own size.
MIN_STARTUP_MESSAGE = 1 << 20


def startup_limit(own_bytes: int) -> int:
    """The largest start-up message this peer accepts: what its own configuration implies
    (peers running the same job send nearly the same fingerprint), with room for the
    differences the handshake is there to report."""
    return max(MIN_STARTUP_MESSAGE, 4 * own_bytes)


def gather_json(
    obj: Any, proc: PeerProcess, seconds: float = STARTUP_S, limit: int | None = None
) -> list[Any]:
    """Every peer's JSON-able `obj`, in rank order (two all-gathers of plain tensors).

    The first all-gather shares each peer's message size and the most it accepts (`limit`,
    default `startup_limit` of its own message); every peer then holds the same numbers and
    refuses, together, a size above the smallest limit before allocating anything for it."""
    raw = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)
    cap = startup_limit(raw.numel()) if limit is None else int(limit)
    head = torch.tensor([raw.numel(), cap], dtype=torch.int64, device=proc.device)
    heads = [torch.zeros_like(head) for _ in range(proc.world)]
    _collective(dist.all_gather(heads, head, async_op=True), "the start-up exchange", seconds)
    sizes = [int(h[0]) for h in heads]
    allowed = min(int(h[1]) for h in heads)
    bad = [(i, s) for i, s in enumerate(sizes) if not 0 <= s <= allowed]
    if bad:
        shown = "; ".join(f"peer {i} announced {s:,} bytes" for i, s in bad[:5])
        raise SetupMismatch(
            f"start-up messages are at most {allowed:,} bytes for this configuration: {shown} "
            "(is it running another job or another declora version?)"
        )
    buf = torch.zeros(max(sizes), dtype=torch.uint8, device=proc.device)
    buf[: raw.numel()] = raw.to(proc.device)
    bufs = [torch.zeros_like(buf) for _ in range(proc.world)]
    _collective(dist.all_gather(bufs, buf, async_op=True), "the start-up exchange", seconds)
    out = []
    for i, (b, s) in enumerate(zip(bufs, sizes, strict=True)):
        try:
            out.append(json.loads(bytes(b[:s].cpu().tolist()).decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise SetupMismatch(
                f"peer {i} sent a start-up message that is not JSON text; is it a declora peer "
                "of the same version?"
            ) from None
    return out


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def prove_membership(key: bytes | None, proc: PeerProcess, failed: bool = False) -> None:
    """With a shared secret on any peer, every peer proves it holds it before anything else is
    exchanged or written (`declora.network.auth`); raises `AuthRefused` on every peer if not."""
    from declora.network.auth import authenticate

    authenticate(key, proc.rank, proc.world, lambda o: gather_json(o, proc), failed)


def handshake(fingerprint: dict[str, Any] | None, proc: PeerProcess, error: str = "") -> None:
    """Compare every peer's setup; raise `SetupMismatch` on all peers if any differs or failed.

    A peer that could not prepare passes `error` instead of a fingerprint, so the others stop
    with its message instead of waiting for it forever."""
    mine = {"error": error[:2000]} if error else {"fingerprint": fingerprint}
    everyone = gather_json(mine, proc)
    for i, e in enumerate(everyone):
        ok = isinstance(e, dict) and (
            isinstance(e.get("error"), str) or isinstance(e.get("fingerprint"), dict)
        )
        if not ok:
            raise SetupMismatch(
                f"peer {i} sent a start-up message without a fingerprint; is it a declora peer "
                "of the same version?"
            )
    failed = [(i, e["error"]) for i, e in enumerate(everyone) if "error" in e]
    if failed:
        lines = "; ".join(f"peer {i}: {msg}" for i, msg in failed)
        raise SetupMismatch(f"{len(failed)} peer(s) could not start: {lines}")
    ref = _flat(everyone[0]["fingerprint"])
    order = {k: i for i, k in enumerate(ref)}  # config first, then model, data, adapter shapes
    problems = []
    for i, e in enumerate(everyone[1:], start=1):
        other = _flat(e["fingerprint"])
        diff = [k for k in set(ref) | set(other) if ref.get(k) != other.get(k)]
        diff.sort(key=lambda k: (order.get(k, len(order)), k))
        for k in diff[:5]:
            problems.append(
                f"peer {i} has {k}={_short(other.get(k))} where peer 0 has {_short(ref.get(k))}"
            )
        if len(diff) > 5:
            problems.append(f"peer {i}: {len(diff) - 5} more differences")
    if problems:
        raise SetupMismatch("peers disagree on their setup: " + "; ".join(problems))


def agree_to_resume(mine: bool, proc: PeerProcess) -> bool:
    """The group resumes when any peer does. A machine started again by hand after it died
    runs a fresh agent (restart count 0) that joins a group whose other agents restarted
    their workers: its peers must resume with them, from the newest common checkpoint."""
    return any(bool(x) for x in gather_json(bool(mine), proc))


def agree_on_resume(available: list[int], proc: PeerProcess, *, strict: bool = False) -> int:
    """The newest round every peer has a complete checkpoint of (0: start from scratch).

    `strict` (a `--resume` asked for, not an agent's restart): when some peers have
    checkpoints and others none, or no round is common to all, every peer stops with
    `DecloraError` instead of starting over, which would overwrite the checkpoints there are.
    Across machines a peer's rank follows the machines' addresses, so a machine whose address
    changed runs other peers than the ones whose checkpoints it holds."""
    sent = gather_json({"rounds": sorted(available), "strict": bool(strict)}, proc)
    everyone = []
    for i, e in enumerate(sent):
        rounds = e.get("rounds") if isinstance(e, dict) else None
        if not isinstance(rounds, list) or not all(isinstance(r, int) for r in rounds):
            raise SetupMismatch(f"peer {i} sent no list of checkpoint rounds at resume")
        everyone.append(rounds)
    common = set(everyone[0]).intersection(*map(set, everyone[1:]))
    # every peer decides alike: strict only when no peer was restarted by its agent
    if all(e.get("strict") is True for e in sent) and not common and any(everyone):
        raise DecloraError(missing_checkpoints(everyone))
    return max(common) if common else 0


def missing_checkpoints(everyone: list[list[int]]) -> str:
    """Why peers with these checkpoint rounds (in rank order) cannot resume together."""
    lacking = [i for i, e in enumerate(everyone) if not e]
    have = "; ".join(f"peer {i}: {', '.join(map(str, e))}" for i, e in enumerate(everyone) if e)
    which = (
        f"peer(s) {', '.join(map(str, lacking))} find no checkpoint of their own"
        if lacking
        else "no round is checkpointed by every peer"
    )
    return (
        f"--resume: {which} (rounds {have}); starting over would overwrite the checkpoints "
        "there are. A peer's checkpoints are checkpoints/peer-<i> on the machine that ran it, and "
        "across machines a peer's rank follows the machines' addresses: put each peer's folder "
        "on the machine that runs it now, or start the run over without --resume (--overwrite)"
    )


# ------------------------------------------------------------------ packed buffers


@dataclass(frozen=True)
class _Slot:
    """Where one tensor's packet sits in the flat wire buffer."""

    name: str
    shape: tuple[int, ...]
    kind: str
    payload: int  # bytes
    scales: int  # float32 values
    offsets: int  # float32 values
    has_meta: bool


def wire_layout(packets: dict[str, Packet]) -> list[_Slot]:
    out = []
    for name, p in packets.items():
        has_meta = p.scales is not None
        out.append(
            _Slot(
                name,
                p.shape,
                p.kind,
                int(p.payload.numel()),
                int(p.scales.numel()) if p.scales is not None else 0,
                int(p.offsets.numel()) if p.offsets is not None else 0,
                has_meta,
            )
        )
    return out


def _wire_size(layout: list[_Slot]) -> int:
    """Bytes of a packed message with this layout (what `pack_wire` produces)."""
    return sum(s.payload + 4 * (s.scales + s.offsets) for s in layout)


def pack_wire(packets: dict[str, Packet]) -> torch.Tensor:
    """All packets of one message as one uint8 buffer: payload, scales, offsets per tensor."""
    parts = []
    for p in packets.values():
        parts.append(p.payload.reshape(-1).to(torch.uint8))
        for meta in (p.scales, p.offsets):
            if meta is not None:
                parts.append(meta.detach().to(torch.float32).contiguous().view(torch.uint8))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.uint8)


def unpack_wire(buf: torch.Tensor, layout: list[_Slot]) -> dict[str, Packet]:
    out, pos = {}, 0
    for s in layout:
        payload = buf[pos : pos + s.payload].clone()
        pos += s.payload
        scales = offsets = None
        if s.has_meta:
            scales = buf[pos : pos + 4 * s.scales].clone().view(torch.float32)
            pos += 4 * s.scales
            offsets = buf[pos : pos + 4 * s.offsets].clone().view(torch.float32)
            pos += 4 * s.offsets
        out[s.name] = Packet(payload, scales, offsets, s.shape, s.kind)
    if pos != buf.numel():
        raise ValueError(f"buffer has {buf.numel()} bytes, the message layout needs {pos}")
    return out


# ------------------------------------------------------------------ the gossip step


class PeerGossip:
    """Peer `rank`'s side of (compressed) gossip over torch.distributed point-to-point ops.

    Same arithmetic as the simulated `CompressedGossip` / `ChocoGossip`, one row at a time:
    plain: x_i <- W_ii x_i + sum_j W_ij dec(enc(x_j)) (own value exact; with error feedback
    the residual is carried); CHOCO: public copies xhat, x_i <- x_i + gamma (sum_j W_ij xhat_j -
    xhat_i). `mix` takes and returns tensors with a leading peer axis of size 1, like the
    batched engine with one peer. Peer i receives from j where W_ij > 0 and sends to j where
    W_ji > 0, so directed (non-symmetric) doubly stochastic matrices work too."""

    def __init__(
        self,
        rank: int,
        mixing: np.ndarray,
        compressor: Compressor,
        *,
        scheme: str = "plain",
        error_feedback: bool = False,
        gamma: float = 0.5,
        seed: int = 0,
        timeout_s: float = 60.0,
        on_failure: str = "error",
        device: torch.device | None = None,
        rule: str = "average",
        rank_r: int | None = None,
        ranks: tuple[int, ...] | None = None,
        hetero: str | None = None,
    ) -> None:
        """`ranks` (every peer's `lora.ranks`) and `hetero` (its combine rule): this peer
        sends its factors at its own rank, reads each neighbour's at that neighbour's rank,
        zero-pads them and combines with `hetero_combine`, the simulator's function."""
        if on_failure not in ("error", "skip"):
            raise ConfigError(
                f"comm.on_peer_failure={on_failure!r} is unknown; choose error or skip"
            )
        if scheme not in ("plain", "choco"):
            raise ConfigError(f"comm.scheme={scheme!r} is unknown; choose plain or choco")
        if rule not in ("average", "product-svd"):
            raise ConfigError(f"mixing rule {rule!r} is unknown; choose average or product-svd")
        if rule == "product-svd" and (scheme != "plain" or error_feedback):
            raise ConfigError("the product-svd rule (DeCAF) mixes exact factors only")
        self.rank, self.n = rank, np.asarray(mixing).shape[0]
        self.rule, self.rank_r = rule, rank_r
        if ranks is not None and (hetero is None or scheme != "plain" or error_feedback):
            raise ConfigError("mixed ranks (lora.ranks) mix exact factors with a hetero rule only")
        self.ranks, self.hetero = ranks, hetero
        self.set_mixing(mixing)
        self.compressor, self.scheme = compressor, scheme
        self.error_feedback, self.gamma = error_feedback, float(gamma)
        self.generator = peer_generator(seed, rank)
        self.timeout_s = float(timeout_s)
        self.on_failure = on_failure
        self.device = device or torch.device("cpu")
        self.failed: set[int] = set()
        self.memory: dict[str, torch.Tensor] = {}  # residual of self, or xhat of self and sources
        self.exchanges = 0
        self.last_bytes = np.zeros(1, dtype=np.int64)
        self.bytes_on_wire = 0  # buffers handed to send ops that completed, over the whole run
        self.seconds = 0.0  # time in the gossip step: encode, exchange, decode, mix
        self.wait_seconds = 0.0  # of which waiting for the exchange (transfer + slower peers)
        self.attack: Attack | None = None  # faults.*: this peer may send poisoned values
        self.robust: RobustRule | None = None  # comm.robust: combine rule against bad peers
        self.flags = FlagCounts(self.n)  # which neighbour the robust rule flagged, how often

    def set_mixing(self, mixing: np.ndarray) -> None:
        """Use this matrix from the next exchange on (dynamic graphs, offline peers): every
        process computes the same per-round matrix from the seed, so no one announces it."""
        w = np.asarray(mixing, dtype=np.float64)
        if w.shape != (self.n, self.n):
            raise ValueError(f"expected a {self.n} x {self.n} mixing matrix, got {w.shape}")
        self.row = w[self.rank]
        # the largest neighbourhood (self included) of this round: DeCAF pads to it, as the
        # simulator does for all peers at once
        self.widest = int(((w != 0) | np.eye(self.n, dtype=bool)).sum(axis=1).max())
        self.sources = [j for j in range(self.n) if j != self.rank and w[self.rank, j] != 0]
        self.targets = [j for j in range(self.n) if j != self.rank and w[j, self.rank] != 0]

    # -- state for checkpoints (tensors only)
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"generator": self.generator.get_state()}
        state.update({f"memory.{k}": v.clone() for k, v in self.memory.items()})
        state["exchanges"] = torch.tensor([self.exchanges], dtype=torch.int64)
        state.update(self.flags.state_dict())
        if self.attack is not None:
            state.update({f"attack.{k}": v for k, v in self.attack.state_dict().items()})
        return state

    def round_metrics(self) -> dict[str, Any]:
        """This peer's robust-rule flags (metrics.jsonl keys)."""
        return self.flags.metrics([self.rank], self.robust) if self.robust is not None else {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"].to(torch.uint8))
        self.memory = {
            k[len("memory.") :]: v.to(torch.float32).clone()
            for k, v in state.items()
            if k.startswith("memory.")
        }
        self.exchanges = int(state["exchanges"][0])
        if "flags.seen" in state:
            self.flags.load_state_dict(state)
        if self.attack is not None:
            self.attack.load_state_dict(
                {k[len("attack.") :]: v for k, v in state.items() if k.startswith("attack.")}
            )

    def _mem(self, key: str, like: torch.Tensor) -> torch.Tensor:
        if key not in self.memory:
            self.memory[key] = torch.zeros_like(like)
        return self.memory[key]

    def _fail(self, peer: int, what: str, reason: str) -> None:
        msg = (
            f"peer {self.rank}: neighbour {peer} {what} (exchange {self.exchanges}, "
            f"comm.timeout_s={self.timeout_s:g}): {reason}"
        )
        if self.on_failure == "error":
            raise PeerFailure(msg + "; set comm.on_peer_failure=skip to continue without it")
        log.warning("%s; continuing without it (comm.on_peer_failure=skip)", msg)
        self.failed.add(peer)

    def _exchange(
        self, buf: torch.Tensor, sizes: dict[int, int] | None = None
    ) -> dict[int, torch.Tensor]:
        """Send `buf` to every live target, receive one buffer per live source (of the same
        size, or of `sizes[j]` bytes when peers send different sizes). Waits with the timeout;
        returns what arrived."""
        tag = self.exchanges % (1 << 20)
        targets = [j for j in self.targets if j not in self.failed]
        sources = [j for j in self.sources if j not in self.failed]
        inbox = {
            j: torch.empty_like(buf) if sizes is None else buf.new_empty(sizes[j]) for j in sources
        }
        ops = [dist.P2POp(dist.irecv, inbox[j], j, tag=tag) for j in sources]
        ops += [dist.P2POp(dist.isend, buf, j, tag=tag) for j in targets]
        peers = sources + targets
        start = time.perf_counter()
        works, posted = post_ops(ops) if ops else ([], [])
        arrived: dict[int, torch.Tensor] = {}
        sent = 0
        waited = iter(
            _wait_all([w for w in works if w is not None], time.monotonic() + self.timeout_s)
        )
        problems = [p if p is not None else next(waited) for p in posted]
        self.wait_seconds += time.perf_counter() - start
        for k, (peer, problem) in enumerate(zip(peers, problems, strict=True)):
            receiving = k < len(sources)
            if peer in self.failed:
                continue
            if problem:
                what = "did not answer" if receiving else "did not take our message"
                self._fail(peer, what, problem)
                continue
            if receiving:
                arrived[peer] = inbox[peer]
            else:
                sent += buf.numel()
        self.bytes_on_wire += sent
        self.last_bytes = np.array([sent], dtype=np.int64)
        return {j: b for j, b in arrived.items() if j not in self.failed}

    def decode_message(self, peer: int, buf: torch.Tensor, layout: list[_Slot]) -> dict | None:
        """A neighbour's buffer checked and decoded, or None when it is unusable (and skipped)."""
        try:
            packets = unpack_wire(buf.cpu(), layout)
            values = {k: self.compressor.decode(p) for k, p in packets.items()}
        except (ValueError, RuntimeError) as exc:
            self._fail(peer, "sent a malformed buffer", failure_reason(exc))
            return None
        bad = [k for k, v in values.items() if not bool(torch.isfinite(v).all())]
        if bad:
            self._fail(peer, "sent non-finite values", f"in {', '.join(bad[:3])}")
            return None
        return values

    def _weights(self, arrived: dict[int, Any]) -> tuple[float, dict[int, float]]:
        """This peer's weight and its live sources' weights, renormalised after failures."""
        own = float(self.row[self.rank])
        others = {j: float(self.row[j]) for j in self.sources if j in arrived}
        if self.failed:
            total = own + sum(others.values())
            own, others = own / total, {j: w / total for j, w in others.items()}
        return own, others

    def mix(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        start = time.perf_counter()
        try:
            return self._mix(values)
        finally:
            self.seconds += time.perf_counter() - start

    def _mix(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.exchanges += 1
        x = {k: v[0].detach().to(torch.float32).cpu() for k, v in values.items()}
        if not self.sources and not self.targets:
            self.last_bytes = np.zeros(1, dtype=np.int64)
            return values
        mixed = self._mix_choco(x) if self.scheme == "choco" else self._mix_plain(x)
        return {k: mixed[k].to(values[k].dtype).to(values[k].device).unsqueeze(0) for k in x}

    def _encode(self, messages: dict[str, torch.Tensor]) -> dict[str, Packet]:
        return {k: self.compressor.encode(m, self.generator) for k, m in messages.items()}

    def _layout_of(self, x: dict[str, torch.Tensor]) -> list[_Slot]:
        """The wire layout of a message of these tensors (it depends on shapes only): what a
        peer that sends nothing this round still needs to read its neighbours' buffers."""
        scratch = torch.Generator().manual_seed(0)
        return wire_layout(
            {k: self.compressor.encode(torch.zeros_like(v), scratch) for k, v in x.items()}
        )

    def _mix_ranked(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Mixed ranks: send the own rank's factors, read each neighbour's at its rank (its
        own layout and size), zero-pad them to the held rank, combine like the simulator."""
        assert self.ranks is not None and self.hetero is not None
        mine = self.ranks[self.rank]
        held = max(self.ranks)
        packets = self._encode(at_rank(x, mine))
        buf = self._to_device(pack_wire(packets))
        layouts = {j: self._layout_of(at_rank(x, self.ranks[j])) for j in self.sources}
        arrived = self._exchange(buf, {j: _wire_size(lay) for j, lay in layouts.items()})
        decoded = {
            j: padded(d, held)
            for j, b in arrived.items()
            if (d := self.decode_message(j, b, layouts[j]))
        }
        own, others = self._weights(decoded)
        if not others:
            return dict(x)
        ranks = {j: self.ranks[j] for j in others}
        return hetero_combine(
            x, decoded, others, ranks, mine, self.hetero, self_weight=own, pad_to=self.widest
        )

    def _mix_plain(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Encode (only when someone receives it, as in the simulation), exchange, check,
        decode, and combine with the algorithm's rule."""
        if self.ranks is not None:
            return self._mix_ranked(x)
        sending = any(j not in self.failed for j in self.targets)
        if sending:
            messages = dict(x)
            if self.attack is not None:  # faults.*: what a byzantine peer sends instead
                messages = self.attack.poison(self.rank, x)
            if self.error_feedback:
                messages = {k: v + self._mem(k, v) for k, v in messages.items()}
            packets = self._encode(messages)
            own_decoded = {k: self.compressor.decode(p) for k, p in packets.items()}
            if self.error_feedback:
                for k in packets:
                    self.memory[k] = messages[k] - own_decoded[k]
            layout = wire_layout(packets)
            buf = self._to_device(pack_wire(packets))
        else:
            own_decoded, layout = dict(x), self._layout_of(x)
            buf = self._to_device(torch.zeros(_wire_size(layout), dtype=torch.uint8))
        arrived = self._exchange(buf)
        decoded = {j: d for j, b in arrived.items() if (d := self.decode_message(j, b, layout))}
        if self.attack is not None:
            self.attack.remember(self.rank, list(decoded.values()))
        own, others = self._weights(decoded)
        if not others:
            return dict(x)  # nothing arrived: the peer keeps its exact values, as when alone
        if self.robust is not None:  # the same per-peer rule the simulator applies
            ids = list(others)
            if self.robust.stale is not None:
                digests = [message_digest(decoded[j]) for j in ids]
                self.flags.observe(self.robust, self.rank, ids, digests)
            mixed, flagged, removed = robust_combine(
                self.robust,
                x,
                [decoded[j] for j in ids],
                [others[j] for j in ids],
                self.flags.excluded(self.robust, self.rank, ids),
            )
            self.flags.add(self.rank, ids, flagged, removed, self.robust.exclude_window)
            return mixed
        if self.rule == "product-svd":
            return decaf_combine(
                x, decoded, others, self.rank_r, self_weight=own, pad_to=self.widest
            )
        W = torch.tensor([[own, *others.values()]], dtype=torch.float32)
        own_w, own_index = W[:, 0], torch.zeros(1, dtype=torch.long)
        out = {}
        for k, v in x.items():
            block = torch.stack([own_decoded[k], *(decoded[j][k] for j in others)])
            out[k] = mix_with_own_exact(W, own_w, v.unsqueeze(0), block, own_index)[0]
        return out

    def _mix_choco(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        diffs = {k: v - self._mem(f"{k}@{self.rank}", v) for k, v in x.items()}
        packets = self._encode(diffs)
        for k, p in packets.items():
            self.memory[f"{k}@{self.rank}"] = self.memory[f"{k}@{self.rank}"] + (
                self.compressor.decode(p)
            )
        layout = wire_layout(packets)
        arrived = self._exchange(self._to_device(pack_wire(packets)))
        decoded = {j: d for j, b in arrived.items() if (d := self.decode_message(j, b, layout))}
        for j, d in decoded.items():
            for k, v in d.items():
                key = f"{k}@{j}"
                self.memory[key] = self._mem(key, v) + v
        own, others = self._weights(decoded)
        W = torch.tensor([[own, *others.values()]], dtype=torch.float32)
        own_index = torch.zeros(1, dtype=torch.long)
        out = {}
        for k, v in x.items():
            block = torch.stack([self.memory[f"{k}@{j}"] for j in (self.rank, *others)])
            out[k] = choco_step(W, v.unsqueeze(0), block, own_index, self.gamma)[0]
        return out

    def _to_device(self, buf: torch.Tensor) -> torch.Tensor:
        return buf.to(self.device)


class AllReduceAverage:
    """FedAvg between real peers: one all-reduce of every online peer's values, divided by
    their count, instead of a server. An offline peer (its row of this round's matrix is the
    identity's) still takes part in the collective, with zeros, and keeps its own values.
    Bytes are counted as in the simulation: one upload of the values per online peer."""

    def __init__(self, proc: PeerProcess, mixing: np.ndarray, *, timeout_s: float) -> None:
        self.proc, self.timeout_s = proc, float(timeout_s)
        self.n = np.asarray(mixing).shape[0]
        self.set_mixing(mixing)
        self.last_bytes = np.zeros(1, dtype=np.int64)
        self.bytes_on_wire = 0
        self.seconds = 0.0
        self.wait_seconds = 0.0

    def set_mixing(self, mixing: np.ndarray) -> None:
        w = np.asarray(mixing, dtype=np.float64)
        if w.shape != (self.n, self.n):
            raise ValueError(f"expected a {self.n} x {self.n} mixing matrix, got {w.shape}")
        off = (w != 0) & ~np.eye(self.n, dtype=bool)
        self.online = off.any(axis=1)  # a lone online peer would average with itself only

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"unexpected keys {sorted(state)[:3]} in an all-reduce state")

    def mix(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        start = time.perf_counter()
        try:
            return self._mix(values)
        finally:
            self.seconds += time.perf_counter() - start

    def _mix(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        mine = bool(self.online[self.proc.rank])
        flat = torch.cat([v.detach().reshape(-1).to(torch.float32) for v in values.values()])
        contribution = (flat if mine else torch.zeros_like(flat)).to(self.proc.device)
        begin = time.perf_counter()
        work = dist.all_reduce(contribution, op=dist.ReduceOp.SUM, async_op=True)
        _collective(work, f"peer {self.proc.rank}: the FedAvg all-reduce", self.timeout_s)
        self.wait_seconds += time.perf_counter() - begin
        sent = 4 * flat.numel() if mine else 0
        self.last_bytes = np.array([sent], dtype=np.int64)
        self.bytes_on_wire += sent
        if not mine:
            return values
        mean = contribution.cpu() / float(self.online.sum())
        out, pos = {}, 0
        for k, v in values.items():
            size = v.numel()
            out[k] = mean[pos : pos + size].reshape(v.shape).to(v.dtype).to(v.device)
            pos += size
        return out


# ------------------------------------------------------------------ network-wide numbers


class PeerNetwork:
    """The round loop's network-wide numbers as all-reduces over the group (cheap scalars,
    plus the adapters' products for the consensus distance when monitoring)."""

    def __init__(
        self, proc: PeerProcess, *, monitor: bool, timeout_s: float = 60.0, local: bool = False
    ) -> None:
        """`local`: no collective at all (each peer reports only itself), for runs that must
        go on when peers fail (`comm.on_peer_failure=skip`): a collective needs every peer."""
        self.proc, self.timeout_s, self.local = proc, timeout_s, local
        self.monitor = monitor and not local
        self.clocks: dict[str, Any] = {}  # name -> callable giving seconds so far (per peer)

    def _sum(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(self.proc.device)
        work = dist.all_reduce(t, op=dist.ReduceOp.SUM, async_op=True)
        _collective(work, f"peer {self.proc.rank}: a network-wide sum (monitoring)", self.timeout_s)
        return t.cpu()

    def mean(self, total: float, count: int) -> float:
        """The network's mean of a per-step quantity: sums and counts over every peer."""
        if not self.local:
            both = self._sum(torch.tensor([total, float(count)], dtype=torch.float64))
            total, count = float(both[0]), int(both[1])
        return total / count if count else float("nan")

    def bytes_sent(self, local: np.ndarray) -> tuple[float, float]:
        if self.local:
            return float(local.sum()), float(local.sum())
        total = float(self._sum(torch.tensor([float(local.sum())], dtype=torch.float64))[0])
        return total / self.proc.world, total

    def consensus(
        self, values: dict[str, torch.Tensor], lora_modules: tuple[str, ...], scale: float = 1.0
    ) -> float | None:
        """The simulation's `consensus_distance` from network sums: sqrt(mean_i sum ||P_i -
        mean P||^2) over the LoRA products P_i = B_i A_i and the other methods' plain tensors
        (DoRA magnitudes, IA3 vectors, prompt embeddings)."""
        if not self.monitor:
            return None
        parts = [
            scale * (values[f"{name}.lora_B"][0].double() @ values[f"{name}.lora_A"][0].double())
            for name in lora_modules
        ]
        parts += [v[0].double() for k, v in values.items() if k.rpartition(".")[2] in PLAIN_LEAVES]
        n, total = self.proc.world, 0.0
        for p in parts:
            sq = self._sum(torch.tensor([float(p.pow(2).sum())], dtype=torch.float64))
            s = self._sum(p)
            total += (float(sq[0]) - float(s.pow(2).sum()) / n) / n
        return math.sqrt(max(total, 0.0))

    def annotate(self, rec: dict[str, Any], local_loss: float, local_bytes: np.ndarray) -> None:
        rec["peer"] = self.proc.rank
        rec["peer_train_loss"] = local_loss
        rec["peer_bytes_sent"] = float(local_bytes.sum())
        for name, clock in self.clocks.items():
            rec[f"peer_{name}_seconds"] = round(clock(), 4)

    def average(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The network average of every tensor (a collective: every peer must call it)."""
        return {
            k: self._sum(v.detach().clone().float()) / self.proc.world for k, v in values.items()
        }


class TimedEngine:
    """An engine whose local steps are timed (the compute half of a round)."""

    def __init__(self, engine: Any) -> None:
        self._engine, self.seconds = engine, 0.0

    def train_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        start = time.perf_counter()
        try:
            return self._engine.train_step(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


class _Averaged:
    """An engine stand-in whose adapters are the network average (leading axis of size 1)."""

    def __init__(self, engine: Any, values: dict[str, torch.Tensor]) -> None:
        self._engine, self._values = engine, values

    def stacked(self) -> dict[str, torch.Tensor]:
        return self._values

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


class MonitoredEvaluator:
    """Wraps an evaluator for one-peer-per-process runs: the averaged model is evaluated on
    rank 0 only when monitoring is on; each peer evaluates its own model and the per-peer
    metrics are shared with an all-gather of plain floats."""

    def __init__(self, inner: Any, network: PeerNetwork) -> None:
        self.inner, self.network = inner, network
        self.primary = inner.primary
        self.columns = inner.columns
        self.higher_is_better = inner.higher_is_better

    def _averaged(self, engine: Any) -> Iterator[_Averaged]:
        values = self.network.average(engine.stacked())
        if self.network.proc.leader:
            yield _Averaged(engine, values)  # keeps the leading peer axis of size 1

    def average(self, engine: Any, *, final: bool = False) -> dict[str, float]:
        if not self.network.monitor:
            return {}
        for avg in self._averaged(engine):
            return self.inner.average(avg, final=final)
        return {}

    def peers(self, engine: Any) -> list[dict[str, float]]:
        own = self.inner.peers(engine)[0]
        if self.network.local:
            return [own]
        keys = sorted(own)
        vec = torch.tensor([float(own[k]) for k in keys], dtype=torch.float64)
        proc = self.network.proc
        rows = [torch.zeros_like(vec).to(proc.device) for _ in range(proc.world)]
        work = dist.all_gather(rows, vec.to(proc.device), async_op=True)
        _collective(work, f"peer {proc.rank}: sharing the peers' metrics", self.network.timeout_s)
        return [dict(zip(keys, (float(x) for x in r.cpu()), strict=True)) for r in rows]

    def extras(self, engine: Any) -> dict[str, Any]:
        if not self.network.monitor:
            return {}
        for avg in self._averaged(engine):
            return self.inner.extras(avg)
        return {}
