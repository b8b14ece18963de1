"""Worker processes for tests/test_integrity.py (spawned or started by torchrun).

Kept apart from the test module so a peer imports only torch and declora, not transformers.
`python -m tests.integrity_workers OUT` is a torchrun worker: it joins the group the way a
declora peer does and records every TCP socket its process and its launcher listen on.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


def listening(pid: int) -> list[str]:
    """Addresses of the TCP sockets process `pid` listens on ("127.0.0.1:port", "[::]:port")."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    out = []
    for table, width in (("tcp", 8), ("tcp6", 32)):
        lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        for line in lines:
            parts = line.split()
            local, state, inode = parts[1], parts[3], parts[9]
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            addr_hex, port_hex = local.split(":")
            raw = bytes.fromhex(addr_hex)
            if width == 8:
                host = ".".join(str(b) for b in raw[::-1])
            else:  # four little-endian 32-bit words
                words = [raw[i : i + 4][::-1] for i in range(0, 16, 4)]
                host = "[" + b"".join(words).hex() + "]"
            out.append(f"{host}:{int(port_hex, 16)}")
    return out


def _launched_peer(out: str) -> None:
    """A torchrun worker: join like a peer, sum once, record the listening sockets."""
    from declora.network import distributed as dd

    proc = dd.start("gloo", 30)
    t = torch.ones(1)
    dist.all_reduce(t)
    dist.barrier()  # every peer is connected: all listeners exist now
    record = {
        "rank": proc.rank,
        "sum": float(t[0]),
        "worker": listening(os.getpid()),
        "launcher": listening(os.getppid()),
        "master_addr": os.environ["MASTER_ADDR"],
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    Path(out, f"peer-{proc.rank}.json").write_text(json.dumps(record))
    dist.barrier()
    dd.stop()


def _init(rank: int, world: int, store: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)


def oversized_announcement(rank: int, world: int, store: str, out: str) -> None:
    """Peer 1 announces a 1 TB start-up message; peer 0 must refuse it without allocating."""
    from declora.network.distributed import PeerProcess, SetupMismatch, gather_json

    torch.set_num_threads(1)
    _init(rank, world, store)
    proc = PeerProcess(rank, world, torch.device("cpu"))
    if rank == 1:
        head = torch.tensor([1 << 40, 1 << 41], dtype=torch.int64)
        heads = [torch.zeros_like(head) for _ in range(world)]
        dist.all_gather(heads, head)
        # stay until peer 0 has its answer, then leave without tearing down the group: gloo's
        # teardown against a peer that is itself leaving can abort the process (a race)
        deadline = time.monotonic() + 60
        while not Path(out, "peer-0.json").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os._exit(0)
    try:
        gather_json({"fingerprint": {"x": 1}}, proc, seconds=30)
        result = {"error": None}
    except SetupMismatch as exc:
        result = {"error": str(exc)}
    Path(out, "peer-0.json").write_text(json.dumps(result))
    os._exit(0)  # no gloo teardown against a peer that has left (it can abort the process)


if __name__ == "__main__":
    _launched_peer(sys.argv[1])


def nan_neighbour(rank: int, world: int, store: str, out: str) -> None:
    """Peer 2 of 3 (all linked) holds NaN; two exchanges with comm.on_peer_failure=skip."""
    from safetensors.torch import save_file

    from declora.network.compress import make_compressor
    from declora.network.distributed import PeerGossip

    torch.set_num_threads(1)
    _init(rank, world, store)
    W = np.full((world, world), 1.0 / world)
    g = PeerGossip(rank, W, make_compressor(32), timeout_s=1.5, on_failure="skip")
    x = {"w": nan_values(world)[rank : rank + 1]}
    first = g.mix(x)
    second = g.mix(first)
    save_file(
        {"first": first["w"][0].clone(), "second": second["w"][0].clone()},
        f"{out}/peer-{rank}.safetensors",
    )
    os._exit(0)  # receives given up on are still pending: skip the teardown that waits on them


def gone_neighbour(rank: int, world: int, store: str, out: str) -> None:
    """3 peers, all linked: after one exchange, peer 2's process ends (its connections close);
    peers 0 and 1 exchange again with comm.on_peer_failure=skip and record what they hold."""
    from safetensors.torch import save_file

    from declora.network.compress import make_compressor
    from declora.network.distributed import PeerGossip

    torch.set_num_threads(1)
    _init(rank, world, store)
    W = np.full((world, world), 1.0 / world)
    g = PeerGossip(rank, W, make_compressor(32), timeout_s=5.0, on_failure="skip")
    x = {"w": torch.arange(world * 4, dtype=torch.float32).reshape(world, 4)[rank : rank + 1]}
    first = g.mix(x)
    if rank == world - 1:
        os._exit(0)
    time.sleep(2.0)  # the neighbour's sockets are closed by now
    second = g.mix(first)
    save_file(
        {"first": first["w"][0].clone(), "second": second["w"][0].clone()},
        f"{out}/peer-{rank}.safetensors",
    )
    Path(out, f"peer-{rank}.json").write_text(json.dumps({"failed": sorted(g.failed)}))
    os._exit(0)


def nan_values(world: int) -> torch.Tensor:
    x = torch.arange(world * 4, dtype=torch.float32).reshape(world, 4)
    x[world - 1, 1] = float("nan")
    return x
