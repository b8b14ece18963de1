"""Mixed LoRA ranks (`lora.ranks`) on real peers: the transport's combine equals the
simulator's (spawned processes, no model: fast), and whole `declora launch` runs end equal to
the simulation of the same config (slow: `make test-slow`), each peer sending its factors at
its own rank."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from declora.network.hetero import HeteroGossip, values_per_peer
from declora.network.topology import build_topology
from tests.hetero_workers import RANKS as WORKER_RANKS
from tests.hetero_workers import RULES, hetero_worker, ranked_values
from tests.test_distributed_algorithms import (
    PEERS,
    assert_same_adapters,
    assert_same_products,
    peer_adapters,
    simulate_and_launch,
)
from tests.test_distributed_algorithms import job as job

RANKS = [1, 2, 4, 2]


@pytest.fixture(scope="module")
def gossiped(tmp_path_factory):
    """Four spawned peers of ranks 1, 3, 2, 3 on a ring, three rounds per rule."""
    d = tmp_path_factory.mktemp("hetero-gossip")
    mp.spawn(hetero_worker, args=(4, str(d / "store"), str(d)), nprocs=4, join=True)
    return [load_file(str(d / f"peer-{i}.safetensors")) for i in range(4)]


@pytest.mark.parametrize("rule", RULES)
def test_peer_gossip_of_mixed_ranks_equals_the_simulator(gossiped, rule):
    world = len(gossiped)
    topo = build_topology("ring", world, "laplacian")
    sim = HeteroGossip(topo.mixing, WORKER_RANKS, rule)
    for t in range(3):
        vals = ranked_values(WORKER_RANKS, t)
        expected = sim.mix(vals)
        sent = values_per_peer(vals, WORKER_RANKS) * 4 * 2  # fp32, two ring neighbours
        for i in range(world):
            got = {k: gossiped[i][f"{rule}.{t}.{k}"] for k in expected}
            want = {k: v[i] for k, v in expected.items()}
            if rule == "svd":  # SVD factors are fixed up to float rounding: compare B A
                got["m.lora_A"] = got.pop("m.lora_B") @ got["m.lora_A"]
                want["m.lora_A"] = want.pop("m.lora_B") @ want["m.lora_A"]
            for k in want:
                torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5)
            # each peer sent its own rank's factors, no more
            assert int(gossiped[i][f"{rule}.{t}.bytes"][0]) == int(sent[i])
    assert len(np.unique(sent)) == len(set(WORKER_RANKS))


@pytest.mark.slow
@pytest.mark.parametrize("rule", RULES)
def test_mixed_ranks_on_real_peers_equal_the_simulation(job, tmp_path, rule):
    sets = [f"lora.ranks=[{','.join(map(str, RANKS))}]", f"algorithm.hetero={rule}"]
    sim, dist = simulate_and_launch(job, tmp_path, sets)
    if rule == "svd":  # an SVD fixes factors up to rotations among equal singular values
        assert_same_products(sim, dist)
    else:
        assert_same_adapters(sim, dist)
    for i, adapters in enumerate(peer_adapters(dist)):
        a = [v for k, v in adapters.items() if k.endswith("lora_A.weight")]
        assert a and all(v.shape[0] == RANKS[i] for v in a)
        conf = json.loads((dist / "adapters" / f"peer-{i}" / "adapter_config.json").read_text())
        assert conf["r"] == RANKS[i]
    ms = [json.loads(x) for x in (sim / "metrics.jsonl").read_text().splitlines()]
    md = [json.loads(x) for x in (dist / "metrics.jsonl").read_text().splitlines()]
    for r1, r2 in zip(ms, md, strict=True):
        assert r2["bytes_sent"] == pytest.approx(r1["bytes_sent"])
        assert r2["train_loss"] == pytest.approx(r1["train_loss"], abs=1e-4)
    # what each peer put on the wire is what the simulation counts for it
    per_peer = ms[-1]["bytes_sent_per_peer"]
    wire = [
        json.loads((dist / "peers" / f"peer-{i}" / "wire.json").read_text())["bytes_on_wire"]
        for i in range(PEERS)
    ]
    assert wire == pytest.approx(per_peer)
    assert len(set(wire)) == len(set(RANKS))
    avg = json.loads((dist / "adapters" / "average" / "adapter_config.json").read_text())
    assert avg["r"] == max(RANKS)
