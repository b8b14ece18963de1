"""Worker for tests/test_distributed_hetero.py: a peer of a mixed-rank network (`lora.ranks`)
gossiping over torch.distributed, spawned as its own process (imports torch and declora only).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from declora.network.compress import make_compressor
from declora.network.distributed import PeerGossip
from declora.network.topology import build_topology

RANKS = (1, 3, 2, 3)
RULES = ("pad-truncate", "svd")


def ranked_values(ranks: tuple[int, ...], seed: int) -> dict[str, torch.Tensor]:
    """Stacked values at the largest rank, zero beyond each peer's own rank."""
    g = torch.Generator().manual_seed(seed)
    R = max(ranks)
    A = torch.randn(len(ranks), R, 24, generator=g)
    B = torch.randn(len(ranks), 20, R, generator=g)
    for i, r in enumerate(ranks):
        A[i, r:], B[i, :, r:] = 0, 0
    return {"m.lora_A": A, "m.lora_B": B, "head.bias": torch.randn(len(ranks), 3, generator=g)}


def hetero_worker(rank: int, world: int, store: str, out: str) -> None:
    """Peer `rank` mixes its row of three rounds of values, once per combine rule."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    topo = build_topology("ring", world, "laplacian")
    result = {}
    for rule in RULES:
        g = PeerGossip(
            rank,
            topo.mixing,
            make_compressor(32),
            timeout_s=60,
            rule="product-svd" if rule == "svd" else "average",
            ranks=RANKS,
            hetero=rule,
        )
        for t in range(3):
            vals = {k: v[rank : rank + 1] for k, v in ranked_values(RANKS, t).items()}
            mixed = g.mix(vals)
            result.update({f"{rule}.{t}.{k}": v[0].contiguous() for k, v in mixed.items()})
            result[f"{rule}.{t}.bytes"] = torch.tensor(g.last_bytes)
    save_file(result, f"{out}/peer-{rank}.safetensors")
    dist.destroy_process_group()
