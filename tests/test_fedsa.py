"""FedSA-LoRA: peers gossip A only and keep their own B; the personalized score is reported."""

from __future__ import annotations

import json

import torch

from declora.algorithms import make_algorithm, names
from declora.config.schema import load_config
from tests.conftest import run_in_process, write_tiny_job

KEYS = {"enc.q.lora_A", "enc.q.lora_B", "head.weight", "head.bias"}


def test_fedsa_is_registered_and_sends_everything_but_b():
    assert "fedsa" in names()
    cfg = load_config(None, ["algorithm.name=fedsa"])
    algorithm = make_algorithm("fedsa", cfg)
    assert algorithm.sent_keys(KEYS) == {"enc.q.lora_A", "head.weight", "head.bias"}
    assert algorithm.trainable(3) == {"lora_A", "lora_B"}


def test_fedsa_run_shares_a_keeps_b_personal_and_scores_each_peer(tmp_path, tokenizer):
    """On a complete graph with W = 11^T/n every peer's A is the same after each round, while
    each B stays the peer's own; each peer's own model gets a personalized score."""
    model, data = write_tiny_job(tmp_path, tokenizer)
    out = tmp_path / "run"
    args = ["run", "--quiet", "--out", str(out)]
    for kv in (
        f"model.name={model}",
        "data.name=file",
        f"data.path={data}",
        "data.max_length=16",
        "data.min_size=4",
        "topology.peers=4",
        "topology.kind=complete",
        "topology.mixing=fedavg",
        "algorithm.name=fedsa",
        "train.rounds=3",
        "train.batch_size=4",
        "train.threads=1",
        "eval.every=3",
        "baselines=[]",
    ):
        args += ["--set", kv]
    proc = run_in_process(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from safetensors.torch import load_file

    peers = [load_file(str(out / f"adapters/peer-{i}/adapter_model.safetensors")) for i in range(4)]
    a_keys = [k for k in peers[0] if "lora_A" in k]
    b_keys = [k for k in peers[0] if "lora_B" in k]
    assert a_keys and b_keys
    for k in a_keys:
        for p in peers[1:]:
            torch.testing.assert_close(p[k], peers[0][k], atol=1e-6, rtol=1e-6)
    for k in b_keys:
        assert any(not torch.allclose(p[k], peers[0][k]) for p in peers[1:]), k
    peer_metrics = json.loads((out / "peer_metrics.json").read_text())
    assert len(peer_metrics) == 4
    assert all(0.0 <= m["personal_accuracy"] <= 1.0 for m in peer_metrics)
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert "peers_personal_accuracy" in last
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"][0]["label"].startswith("FedSA-LoRA")
