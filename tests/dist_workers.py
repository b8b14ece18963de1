"""Worker functions for tests/test_distributed.py, spawned as separate processes.

Kept apart from the test module so a spawned peer imports only torch and declora (fast), not
transformers and the test fixtures.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from declora.network.compress import make_compressor
from declora.network.distributed import PeerFailure, PeerGossip
from declora.network.topology import build_topology

SETTINGS = {
    "fp32": dict(bits=32, scheme="plain", ef=False),
    "q4+ef": dict(bits=4, scheme="plain", ef=True),
    "q2-choco": dict(bits=2, scheme="choco", ef=False),
    "q3-nearest": dict(bits=3, scheme="plain", ef=False, rounding="nearest"),
}


def _values(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "m.lora_A": torch.randn(n, 4, 24, generator=g),
        "m.lora_B": torch.randn(n, 24, 4, generator=g),
        "head.bias": torch.randn(n, 3, generator=g),
    }


def _init(rank: int, world: int, store: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)


def _gossip_worker(rank: int, world: int, store: str, out: str) -> None:
    """Peer `rank` mixes its slice of three rounds of values with its neighbours, once per
    setting (each setting with its own PeerGossip, as in its own run)."""
    torch.set_num_threads(1)
    _init(rank, world, store)
    topo = build_topology("ring", world, "laplacian")
    result = {}
    for name, s in SETTINGS.items():
        comp = make_compressor(s["bits"], s.get("rounding", "stochastic"), "block", 64)
        g = PeerGossip(
            rank,
            topo.mixing,
            comp,
            scheme=s["scheme"],
            error_feedback=s["ef"],
            seed=5,
            timeout_s=60,
        )
        for t in range(3):
            vals = {k: v[rank : rank + 1] for k, v in _values(world, t).items()}
            mixed = g.mix(vals)
            result.update({f"{name}.{t}.{k}": v[0].contiguous() for k, v in mixed.items()})
            result[f"{name}.{t}.bytes"] = torch.tensor(g.last_bytes)
    save_file(result, f"{out}/peer-{rank}.safetensors")
    dist.destroy_process_group()


def _silent_worker(rank: int, world: int, store: str, out: str, policy: str) -> None:
    """The last peer never sends; the others see it as a failed neighbour."""
    torch.set_num_threads(1)
    _init(rank, world, store)
    if rank == world - 1:
        time.sleep(5)  # alive but silent: a hang, not a crash
        return
    w = np.full((world, world), 1.0 / world)
    g = PeerGossip(rank, w, make_compressor(32), timeout_s=1.5, on_failure=policy)
    start = time.perf_counter()
    x = {"w": torch.full((1, 3), float(rank))}
    try:
        first = g.mix(x)
        second = g.mix(x)  # the failed neighbour is not waited for again
        res = {"first": first["w"][0].tolist(), "second": second["w"][0].tolist()}
    except PeerFailure as exc:
        res = {"error": str(exc)}
    res["seconds"] = time.perf_counter() - start
    Path(out, f"peer-{rank}.json").write_text(json.dumps(res))
