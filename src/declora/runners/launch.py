"""`declora launch`: one process per peer through torch.distributed's launcher (torchrun).

On one machine every socket of the run listens on the loopback interface only: torchrun's
`--standalone` would host its rendezvous store and the workers' store on all interfaces, open
to anyone on the network for the whole run. Here the rendezvous goes through a file store in a
private temporary folder, the workers' store is hosted by peer 0 on a socket bound to
127.0.0.1 (`declora.network.distributed`), and gloo / NCCL talk over the loopback interface.
Several machines (`--rdzv-endpoint`, `multi_host`): every process uses this machine's address
towards the endpoint (`--local-addr`, found from the routing table when not given) for the
workers' master address and gloo's interface; node 0 must own the endpoint and hosts the
rendezvous store there (torchrun's own guess goes by the hostname, which often resolves to
another interface); a roll call on that store stops every machine with one message when a rank
is claimed twice or a machine does not come.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from declora.errors import DecloraError
from declora.runners.signals import Stopped

LOOPBACK = "127.0.0.1"
LAUNCH_ENV = "DECLORA_LAUNCH"  # how the peers were launched, for run.json (JSON)


def loopback_interface() -> str | None:
    """The loopback interface's name (lo on Linux, lo0 on macOS and BSD), None if unknown."""
    try:
        names = {name for _, name in socket.if_nameindex()}
    except OSError:  # pragma: no cover
        return None
    return next((n for n in ("lo", "lo0") if n in names), None)


# ------------------------------------------------------------------ several machines


@dataclass(frozen=True)
class MultiHost:
    """How this machine takes part in a multi-machine launch."""

    host: str  # the endpoint's address (resolved)
    port: int
    local_addr: str  # this machine's address towards the endpoint
    is_host: bool  # this machine hosts the rendezvous store (node 0)
    interface: str | None  # the interface holding local_addr (gloo / NCCL talk over it)
    timeout_s: float

    @property
    def endpoint(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _split_endpoint(endpoint: str) -> tuple[str, int]:
    host, sep, port = endpoint.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DecloraError(f"--rdzv-endpoint {endpoint!r} is not HOST:PORT (e.g. 10.0.0.1:29400)")
    return host, int(port)


def _resolve(host: str, port: int) -> str:
    try:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][4][0]
    except (socket.gaierror, IndexError) as exc:
        raise DecloraError(f"--rdzv-endpoint host {host!r} does not resolve ({exc})") from None


def address_towards(host: str, port: int) -> str:
    """The local address the routing table uses to reach `host` (a UDP connect: no packet
    is sent)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, port))
        except OSError as exc:
            raise DecloraError(
                f"this machine has no route to the rendezvous endpoint {host} "
                f"({exc.strerror or exc}); check the address, or give --local-addr"
            ) from None
        return str(s.getsockname()[0])


def is_local_address(addr: str) -> bool:
    """True when `addr` belongs to this machine (binding to it succeeds; nothing is sent)."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((addr, 0))
        except OSError:
            return False
    return True


def interface_of(addr: str) -> str | None:
    """The name of the interface holding the IPv4 address `addr` (Linux), else None."""
    try:
        import fcntl
        import struct

        names = [name for _, name in socket.if_nameindex()]
    except (ImportError, OSError):  # pragma: no cover
        return None
    if ipaddress.ip_address(addr).is_loopback:
        return loopback_interface()
    siocgifaddr = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for name in names:
            try:
                raw = fcntl.ioctl(s.fileno(), siocgifaddr, struct.pack("256s", name[:15].encode()))
            except OSError:
                continue
            if socket.inet_ntoa(raw[20:24]) == addr:
                return name
    return None


def multi_host(
    nnodes: str,
    node_rank: int,
    rdzv_endpoint: str,
    local_addr: str | None = None,
    timeout_s: float = 300.0,
) -> MultiHost:
    """Check this machine's part in a multi-machine launch before anything starts."""
    host, port = _split_endpoint(rdzv_endpoint)
    ip = _resolve(host, port)
    if ":" not in nnodes:
        n = int(nnodes)
        if not 0 <= node_rank < n:
            raise DecloraError(
                f"--node-rank {node_rank} is out of range for --nnodes {n} (0 to {n - 1})"
            )
    if local_addr is None:
        local_addr = address_towards(ip, port)
    elif not is_local_address(local_addr):
        raise DecloraError(f"--local-addr {local_addr} is not an address of this machine")
    own = is_local_address(ip)
    loopback = ipaddress.ip_address(ip).is_loopback
    if node_rank == 0 and not own:
        raise DecloraError(
            f"--node-rank 0 hosts the rendezvous, but {host} is not an address of this machine "
            f"(it reaches {host} from {local_addr}): start node 0 on the machine at {host}, "
            "or give this machine another --node-rank"
        )
    if own and node_rank != 0 and not loopback and local_addr == ip:
        raise DecloraError(
            f"this machine owns the rendezvous endpoint {host}: it is node 0 (--node-rank 0), "
            f"not {node_rank}"
        )
    return MultiHost(ip, port, local_addr, node_rank == 0, interface_of(local_addr), timeout_s)


_ROLL = "declora/launch"


def _store(plan: MultiHost) -> Any:
    from torch.distributed import TCPStore

    try:
        # multi_tenant: torchrun's own store on this port (is_host=1) reuses this server
        return TCPStore(
            plan.host,
            plan.port,
            is_master=plan.is_host,
            multi_tenant=True,
            timeout=timedelta(seconds=max(1.0, plan.timeout_s)),
        )
    except (RuntimeError, ValueError, TimeoutError) as exc:
        reason = str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else repr(exc)
        if plan.is_host:
            raise DecloraError(
                f"cannot host the rendezvous at {plan.endpoint} ({reason}); is another node 0 "
                "or another program using that port?"
            ) from None
        raise DecloraError(
            f"cannot reach the rendezvous at {plan.endpoint} from {plan.local_addr} within "
            f"{plan.timeout_s:g} s ({reason}): start node 0 on {plan.host} first, and check "
            "that the address and port are right and open"
        ) from None


def roll_call(plan: MultiHost, nnodes: int, node_rank: int, peers: int) -> Any:
    """Every machine claims its --node-rank on node 0's store and waits for the others; a rank
    claimed twice, or a machine missing after the timeout, stops them all with one message.
    Returns the store, which must live (on node 0) until torchrun has its own."""
    store = _store(plan)
    me = json.dumps({"addr": plan.local_addr, "host": socket.gethostname(), "peers": peers})
    error = f"{_ROLL}/error"
    try:
        held = store.compare_set(f"{_ROLL}/node-{node_rank}", "", me).decode()
        if held != me:
            other = json.loads(held).get("addr", "?")
            msg = (
                f"two machines claim --node-rank {node_rank}: {other} and {plan.local_addr}; "
                f"give each machine its own rank from 0 to {nnodes - 1}"
            )
            store.set(error, msg)
            raise DecloraError(msg)
        store.set(f"{_ROLL}/nnodes-{node_rank}", str(nnodes))
        keys = [f"{_ROLL}/node-{r}" for r in range(nnodes)]
        deadline = time.monotonic() + plan.timeout_s
        while not store.check(keys):
            if store.check([error]):
                raise DecloraError(store.get(error).decode())
            if time.monotonic() > deadline:
                missing = [r for r in range(nnodes) if not store.check([keys[r]])]
                raise DecloraError(
                    f"waited {plan.timeout_s:g} s at the rendezvous {plan.endpoint} for the "
                    f"machine(s) with --node-rank {', '.join(map(str, missing))}; start them "
                    "with the same --nnodes and --rdzv-endpoint"
                )
            time.sleep(0.1)
        if store.check([error]):
            raise DecloraError(store.get(error).decode())
        counts = {r: store.get(f"{_ROLL}/nnodes-{r}").decode() for r in range(nnodes)}
        odd = {r: c for r, c in counts.items() if c != str(nnodes)}
        if odd:
            shown = ", ".join(f"node {r} says {c}" for r, c in odd.items())
            raise DecloraError(f"machines disagree on --nnodes: this one says {nnodes}, {shown}")
    except (RuntimeError, TimeoutError) as exc:  # the store went away: node 0 stopped
        raise DecloraError(
            f"lost the rendezvous at {plan.endpoint} ({str(exc).strip()[:160]}); did node 0 stop?"
        ) from None
    return store


@contextmanager
def _restored_env(keys: Iterable[str]) -> Iterator[None]:
    """Put these environment variables back as they were (set or unset) on leaving."""
    saved = {k: os.environ.get(k) for k in keys}
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def multi_host_env(plan: MultiHost) -> Iterator[None]:
    """gloo / NCCL on the interface of this machine's address (unless already chosen), and
    the peers' own store rather than one shared from the launcher: torch's agent keeps the
    shared store's address from its first rendezvous and does not publish it again, so a
    machine started again after a crash (`--max-restarts`) waited for it until the rendezvous
    timed out (DistStoreError)."""
    env = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    if plan.interface:
        env.update(GLOO_SOCKET_IFNAME=plan.interface, NCCL_SOCKET_IFNAME=plan.interface)
    with _restored_env(env):
        for k, v in env.items():
            os.environ.setdefault(k, v)
        yield


def torchrun_args(
    peers: int,
    nnodes: str,
    node_rank: int,
    rdzv_endpoint: str | None,
    max_restarts: int,
    rdzv_dir: str | None,
    plan: MultiHost | None = None,
) -> list[str]:
    """torchrun's options (before the module) for this launch; `rdzv_dir` holds the file
    store of a single-machine rendezvous, `plan` this machine's part in a multi-machine one."""
    args = [f"--nproc-per-node={peers}", f"--nnodes={nnodes}", f"--max-restarts={max_restarts}"]
    if rdzv_endpoint:
        remote = ["--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}"]
        if plan is not None:
            secs = max(1, round(plan.timeout_s))
            conf = f"is_host={int(plan.is_host)},join_timeout={secs},read_timeout={secs}"
            remote = [
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint={plan.endpoint}",
                f"--rdzv-conf={conf}",
                f"--local-addr={plan.local_addr}",
            ]
        return [*args, *remote, f"--node-rank={node_rank}"]
    if nnodes != "1":
        raise DecloraError("--nnodes above 1 needs --rdzv-endpoint HOST:PORT")
    assert rdzv_dir is not None
    return [
        *args,
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={os.path.join(rdzv_dir, 'rendezvous')}",
        "--rdzv-conf=store_type=file",
        f"--rdzv-id={uuid.uuid4()}",
        f"--local-addr={LOOPBACK}",
    ]


def loopback_env() -> dict[str, str]:
    """Environment of a single-machine launch: no store shared from the launcher (peer 0
    hosts it on loopback), collectives over the loopback interface."""
    env = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    lo = loopback_interface()
    if lo:
        env.update(GLOO_SOCKET_IFNAME=lo, NCCL_SOCKET_IFNAME=lo)
    return env


@contextmanager
def single_machine() -> Iterator[str]:
    """A private folder for the rendezvous file store, and the loopback environment, for the
    duration of a launch (both undone afterwards)."""
    folder = tempfile.mkdtemp(prefix="declora-rdzv-")
    try:
        with _restored_env(loopback_env()):
            os.environ.update(loopback_env())
            yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class _Missed(logging.Filter):
    """Drops torch's "Error waiting on exit barrier" record (with its traceback), noting it."""

    seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith("Error waiting on exit barrier"):
            self.seen = True
            return False
        return True


class _Misleading(logging.Filter):
    """Drops torchrun's "node_rank is only used for static rdzv_backend" warning: declora
    uses `--node-rank` itself (the roll call checks that each machine has its own, and rank 0
    hosts the rendezvous)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("node_rank is only used for static")


def quiet_cpp_warnings() -> None:
    """Hide torch's C++ warnings (its `TORCH_CPP_LOG_LEVEL`, unless the user set one) in this
    process and the peers it starts: a lost store connection prints a C++ stack trace per
    retry, and each machine "cannot retrieve the hostname of the client socket", while the
    launcher and the peers say what happened in one line each. Read when torch is first
    imported, so called before that."""
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")


def _running(pid: int) -> bool:
    """Whether process `pid` still runs (a zombie, exited but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@contextmanager
def machine_agent(exit_wait_s: float, endpoint: str) -> Iterator[None]:
    """torch's agent for one machine of a multi-machine launch, with two limits torchrun has
    no option for (set on the agent class the launcher builds, for this launch only):

    - its "exit barrier", the wait once its own peers finished for the other machines'
      agents (300 s in torch): `exit_wait_s`, so a machine that survived a dead one
      (comm.on_peer_failure=skip) does not sit out the whole wait; a timeout is one line,
      not torch's traceback;
    - a watchdog: when every local peer has stopped and the agent is still stuck `exit_wait_s`
      + 30 s later (a store call to an endpoint behind a cut link blocks for as long as TCP
      retries, many minutes), the launcher says so and exits 2."""
    from torch.distributed.launcher import api

    base = api.LocalElasticAgent
    grace = exit_wait_s + 30.0

    class Agent(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._exit_barrier_timeout = float(exit_wait_s)
            self._finished = threading.Event()

        def run(self, *args: Any, **kwargs: Any) -> Any:
            threading.Thread(target=self._watch, daemon=True, name="declora-watchdog").start()
            try:
                return super().run(*args, **kwargs)
            finally:
                self._finished.set()

        def _watch(self) -> None:
            stopped_at = None
            while not self._finished.wait(1.0):
                pids = [w.id for w in self._worker_group.workers if isinstance(w.id, int)]
                if not pids or any(_running(p) for p in pids):
                    stopped_at = None
                    continue
                stopped_at = stopped_at or time.monotonic()
                if time.monotonic() - stopped_at > grace:
                    print(
                        f"error: this machine's peers stopped {grace:g} s ago (see their "
                        f"messages above), but the rendezvous at {endpoint} cannot be reached "
                        "to end the run: is the link to it down, or node 0 gone?",
                        file=sys.stderr,
                        flush=True,
                    )
                    os._exit(2)

        def _exit_barrier(self) -> None:
            """torch's wait, with its traceback on a timeout replaced by one line."""
            missed = _Missed()
            log = logging.getLogger("torch.distributed.elastic.agent.server.api")
            log.addFilter(missed)
            try:
                super()._exit_barrier()
            finally:
                log.removeFilter(missed)
            if missed.seen:
                print(
                    f"declora launch: this machine's peers finished; the other machines did not "
                    f"finish within --exit-wait {exit_wait_s:g} s (one may be gone)",
                    file=sys.stderr,
                    flush=True,
                )

    api.LocalElasticAgent = Agent
    try:
        yield
    finally:
        api.LocalElasticAgent = base


class PeersFailed(Exception):
    """Peers of a distributed run ended without a declora error of their own (a crash, a
    signal): which, and how, from the launcher's view. Not a user mistake: exit code 1."""

    def __init__(self, codes: dict[int, int]) -> None:
        self.codes = dict(sorted(codes.items()))
        # the launcher stops the other peers with SIGTERM once one fails: those are not causes
        causes = {r: c for r, c in self.codes.items() if c != -signal.SIGTERM} or self.codes
        text = "; ".join(f"peer {r} ended {ended_how(c)}" for r, c in causes.items())
        if stopped := [str(r) for r in self.codes if r not in causes]:
            text += f" (then peer(s) {', '.join(stopped)} got SIGTERM: the launcher stops the rest)"
        super().__init__(text)


def ended_how(code: int) -> str:
    """A process's exit status in words: "by SIGKILL" for -9, "with exit code 1" for 1."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"by {signal.Signals(-code).name}"
    return f"with exit code {code}"


def run(
    module_args: list[str],
    *,
    peers: int,
    nnodes: str = "1",
    node_rank: int = 0,
    rdzv_endpoint: str | None = None,
    max_restarts: int = 0,
    local_addr: str | None = None,
    rdzv_timeout_s: float = 300.0,
    exit_wait_s: float = 300.0,
) -> None:
    """Start `python -m MODULE_ARGS...` once per peer under torchrun and wait for all of them.
    When peers failed: DecloraError when every failed peer stopped with a declora error (exit
    2, its message already printed), else `PeersFailed`, naming each and how it ended."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import (
        RendezvousConnectionError,
        RendezvousError,
    )
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import run as torchrun

    def go(rdzv_dir: str | None, plan: MultiHost | None = None) -> None:
        opts = torchrun_args(peers, nnodes, node_rank, rdzv_endpoint, max_restarts, rdzv_dir, plan)
        agent = machine_agent(exit_wait_s, plan.endpoint) if plan else contextlib.nullcontext()
        misleading, log = _Misleading(), logging.getLogger("torch.distributed.run")
        log.addFilter(misleading)
        try:
            with agent, _restored_env(["OMP_NUM_THREADS"]):
                # torchrun's own default for several peers on a machine, set here so that it
                # prints no banner asking to tune it (a peer's threads are train.threads)
                if peers > 1:
                    os.environ.setdefault("OMP_NUM_THREADS", "1")
                torchrun(get_args_parser().parse_args([*opts, "-m", *module_args]))
        except ChildFailedError as exc:
            codes = {r: f.exitcode for r, f in exc.failures.items()}
            # a peer the agent stopped (SIGTERM, SIGKILL) after its sibling's declora error is
            # not a cause of the failure
            stopped = (-signal.SIGTERM, -signal.SIGKILL)
            causes = {r: c for r, c in codes.items() if c not in stopped}
            if causes and all(c == 2 for c in causes.values()):
                ranks = ", ".join(map(str, sorted(causes)))
                raise DecloraError(f"peer(s) {ranks} stopped with the error above") from None
            raise PeersFailed(codes) from None
        except SignalException as exc:  # the launcher got a stop signal and stopped its peers
            if exc.sigval == signal.SIGINT:
                raise KeyboardInterrupt from None
            raise Stopped(int(exc.sigval)) from None
        except RendezvousConnectionError as exc:  # torch: "See inner exception for details"
            if plan is None:
                raise DecloraError(f"the rendezvous failed: {exc}") from None
            cause = str(exc.__cause__ or exc).strip().splitlines()[0][:160]
            raise DecloraError(
                f"lost the rendezvous at {plan.endpoint}: the machine with --node-rank 0, which "
                f"hosts it, stopped or cannot be reached ({cause})"
            ) from None
        except RendezvousError as exc:
            where = f" at {plan.endpoint}" if plan else ""
            raise DecloraError(f"the rendezvous{where} failed: {exc}") from None
        finally:
            log.removeFilter(misleading)

    record = {"peers": peers, "nnodes": nnodes, "rdzv_endpoint": rdzv_endpoint}
    if rdzv_endpoint:
        plan = multi_host(nnodes, node_rank, rdzv_endpoint, local_addr, rdzv_timeout_s)
        store = None
        if ":" not in nnodes:
            store = roll_call(plan, int(nnodes), node_rank, peers)
        with multi_host_env(plan), launch_record(record):
            go(None, plan)
        del store
        return
    if local_addr is not None:
        raise DecloraError("--local-addr is for multi-machine launches (with --rdzv-endpoint)")
    if nnodes != "1":
        raise DecloraError("--nnodes above 1 needs --rdzv-endpoint HOST:PORT")
    with single_machine() as folder, launch_record(record):
        go(folder)


@contextmanager
def launch_record(record: dict[str, Any]) -> Iterator[None]:
    """Tell the peers how they were launched (`LAUNCH_ENV`, JSON), for run.json: what
    continues the run is then known where the run is read (`declora report`), not only to
    this launcher."""
    with _restored_env([LAUNCH_ENV]):
        os.environ[LAUNCH_ENV] = json.dumps(record)
        yield


def launched_as() -> dict[str, Any] | None:
    """How this peer process's launch was started (peers on the machine of peer 0, machines,
    rendezvous endpoint), as `launch_record` passed it on; None outside `declora launch` or
    when the variable is not that launcher's JSON."""
    try:
        record = json.loads(os.environ.get(LAUNCH_ENV, ""))
    except json.JSONDecodeError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("peers"), int):
        return None
    return {k: record.get(k) for k in ("peers", "nnodes", "rdzv_endpoint")}
