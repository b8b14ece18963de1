"""`declora launch`: one process per peer through torch.distributed's launcher (torchrun).

On one machine every socket of the run listens on the loopback interface only: torchrun's
`--standalone` would host its rendezvous store and the workers' store on all interfaces, open
to anyone on the network for the whole run. Here the rendezvous goes through a file store in a
private temporary folder, the workers' store is hosted by peer 0 on a socket bound to
127.0.0.1 (`declora.network.distributed`), and gloo / NCCL talk over the loopback interface.
Several machines (`--rdzv-endpoint`) need a reachable address and keep torchrun's defaults.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from declora.errors import DecloraError

LOOPBACK = "127.0.0.1"


def loopback_interface() -> str | None:
    """The loopback interface's name (lo on Linux, lo0 on macOS and BSD), None if unknown."""
    try:
        names = {name for _, name in socket.if_nameindex()}
    except OSError:  # pragma: no cover
        return None
    return next((n for n in ("lo", "lo0") if n in names), None)


def torchrun_args(
    peers: int,
    nnodes: str,
    node_rank: int,
    rdzv_endpoint: str | None,
    max_restarts: int,
    rdzv_dir: str | None,
) -> list[str]:
    """torchrun's options (before the module) for this launch; `rdzv_dir` holds the file
    store of a single-machine rendezvous."""
    args = [f"--nproc-per-node={peers}", f"--nnodes={nnodes}", f"--max-restarts={max_restarts}"]
    if rdzv_endpoint:
        remote = ["--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}"]
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
    saved = {k: os.environ.get(k) for k in loopback_env()}
    os.environ.update(loopback_env())
    try:
        yield folder
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(folder, ignore_errors=True)


def run(
    module_args: list[str],
    *,
    peers: int,
    nnodes: str = "1",
    node_rank: int = 0,
    rdzv_endpoint: str | None = None,
    max_restarts: int = 0,
) -> None:
    """Start `python -m MODULE_ARGS...` once per peer under torchrun and wait for all of them;
    torch's ChildFailedError propagates when a peer failed."""
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import run as torchrun

    def go(rdzv_dir: str | None) -> None:
        opts = torchrun_args(peers, nnodes, node_rank, rdzv_endpoint, max_restarts, rdzv_dir)
        torchrun(get_args_parser().parse_args([*opts, "-m", *module_args]))

    if rdzv_endpoint:
        go(None)
        return
    if nnodes != "1":
        raise DecloraError("--nnodes above 1 needs --rdzv-endpoint HOST:PORT")
    with single_machine() as folder:
        go(folder)
