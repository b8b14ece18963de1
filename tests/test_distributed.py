"""Distributed Dec-LoRA on loopback (gloo): one process per peer gives the simulation's result.

The gossip step is tested on its own in spawned processes (fast, no model); whole runs go
through `declora launch` (torchrun) with a tiny model, as a user would start them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from declora.network.compress import make_compressor
from declora.network.compressed import ChocoGossip, CompressedGossip
from declora.network.distributed import (
    PeerFailure,
    PeerGossip,
    failure_reason,
    missing_checkpoints,
    pack_wire,
    wire_layout,
)
from declora.network.topology import build_topology
from tests.conftest import (
    assert_equal_up_to_a_level,
    gossip_bits,
    run_in_process,
    write_ring_job,
)
from tests.dist_workers import SETTINGS, _gossip_worker, _silent_worker, _values


@pytest.fixture(scope="module")
def gossiped(tmp_path_factory):
    """Four spawned peers, each running every setting of SETTINGS for three rounds."""
    d = tmp_path_factory.mktemp("gossip")
    mp.spawn(_gossip_worker, args=(4, str(d / "store"), str(d)), nprocs=4, join=True)
    return [load_file(str(d / f"peer-{i}.safetensors")) for i in range(4)]


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_peer_gossip_equals_the_simulated_gossip(setting, gossiped):
    world = len(gossiped)
    s = SETTINGS[setting]
    topo = build_topology("ring", world, "laplacian")
    comp = make_compressor(s["bits"], s.get("rounding", "stochastic"), "block", 64)
    if s["scheme"] == "choco":
        sim = ChocoGossip(topo.mixing, comp, seed=5)
    else:
        sim = CompressedGossip(topo.mixing, comp, error_feedback=s["ef"], seed=5)
    for t in range(3):
        expected = sim.mix(_values(world, t))
        for i in range(world):
            for k, v in expected.items():
                got = gossiped[i][f"{setting}.{t}.{k}"]
                torch.testing.assert_close(got, v[i], rtol=0, atol=1e-5)
            # what really went out equals the simulation's exact byte accounting
            assert int(gossiped[i][f"{setting}.{t}.bytes"][0]) == int(sim.last_bytes[i])


def test_a_silent_neighbour_times_out_with_its_name(tmp_path):
    mp.spawn(_silent_worker, args=(2, str(tmp_path / "store"), str(tmp_path), "error"), nprocs=2)
    res = json.loads((tmp_path / "peer-0.json").read_text())
    assert "neighbour 1 did not answer" in res["error"]
    assert "comm.timeout_s=1.5" in res["error"] and "on_peer_failure=skip" in res["error"]
    assert res["seconds"] < 6  # the timeout, not the silent peer's 8 s


def test_a_transfer_failure_is_said_in_whole_sentences():
    """gloo's words for a lost neighbour, without its source location and torch's generic
    advice, which the old 160-character cut left as "... Check the logs of the r"."""
    gloo = (
        "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Read error [198.18.0.1]:42400: "
        "Connection reset by peer. This is typically caused by a remote worker hanging or bugs "
        "in the application. Check the logs of the remote worker"
    )
    said = "Read error [198.18.0.1]:42400: Connection reset by peer."
    assert failure_reason(RuntimeError(gloo)) == said
    long = "First it says this. " + "and then it goes on " * 20
    assert failure_reason(RuntimeError(long)) == "First it says this."
    words = failure_reason(RuntimeError("word " * 60))
    assert words.endswith("word ...") and len(words) <= 164
    assert failure_reason(TimeoutError()) == "TimeoutError"


def test_skip_mixes_with_the_neighbours_that_answered(tmp_path):
    mp.spawn(_silent_worker, args=(3, str(tmp_path / "store"), str(tmp_path), "skip"), nprocs=3)
    for rank in (0, 1):
        res = json.loads((tmp_path / f"peer-{rank}.json").read_text())
        # weights 1/3, 1/3 (and 1/3 for the silent peer) renormalised to 1/2, 1/2
        assert res["first"] == pytest.approx([0.5] * 3)
        assert res["second"] == pytest.approx([0.5] * 3)
        assert res["seconds"] < 6


def test_received_buffers_are_checked_before_use():
    w = np.full((2, 2), 0.5)
    g = PeerGossip(0, w, make_compressor(32))
    packets = {"w": make_compressor(32).encode(torch.ones(4))}
    layout = wire_layout(packets)
    bad = pack_wire({"w": make_compressor(32).encode(torch.tensor([1.0, float("nan"), 0, 0]))})
    with pytest.raises(PeerFailure, match="neighbour 1 sent non-finite values"):
        g.decode_message(1, bad, layout)
    with pytest.raises(PeerFailure, match="neighbour 1 sent a malformed buffer"):
        g.decode_message(1, torch.zeros(9, dtype=torch.uint8), layout)


# ----------------------------------------------------------------- whole runs via torchrun


@pytest.fixture(scope="module")
def job(tmp_path_factory, tokenizer):
    return write_ring_job(tmp_path_factory.mktemp("distjob"), tokenizer, seed=2)


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "declora", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=400,
    )


def _peer_adapters(run: Path, n: int = 4) -> list[dict[str, torch.Tensor]]:
    return [
        load_file(str(run / "adapters" / f"peer-{i}" / "adapter_model.safetensors"))
        for i in range(n)
    ]


def _launch(job: Path, out: Path, *sets: str, env: dict | None = None, restarts: int = 0):
    args = ["launch", "--peers", "4", "--max-restarts", str(restarts), "--"]
    args += ["--quiet", "--config", str(job / "job.yaml"), "--out", str(out)]
    for s in sets:
        args += ["--set", s]
    return _cli(*args, env=env)


Q4 = ["comm.bits=4", "comm.error_feedback=true"]
RUN_SETTINGS = {  # 4-bit synchronous runs with the momentum buffers gossiped too
    "fp32": [],
    # and 3 exchanges after the last round (comm.final_gossip)
    "q4-momentum-final": [*Q4, "comm.mix_momentum=true", "comm.final_gossip=3"],
    "q4-overlap": [*Q4, "comm.overlap=true"],
    # a bfloat16 base (float32 adapters): each process runs its own rows through the base, the
    # simulation all peers' at once, so the base's bfloat16 products may round apart
    "bf16-base": ["model.dtype=bfloat16"],
}
TOLERANCE = {"bf16-base": 1e-4}  # else 1e-5


@pytest.fixture(scope="module")
def runs(job, tmp_path_factory):
    """Simulation and 4-process runs of the same job: fp32; 4-bit with error feedback,
    synchronous with the momentum buffers mixed too (comm.mix_momentum) and 3 exchanges after
    the last round (comm.final_gossip), and overlapped
    (comm.overlap: the exchange runs in a thread during compute); fp32 over a bfloat16 base."""
    base = tmp_path_factory.mktemp("distruns")
    out = {}
    for name, sets in RUN_SETTINGS.items():
        sim = base / f"sim-{name}"
        args = ["run", "--quiet", "--config", str(job / "job.yaml"), "--out", str(sim)]
        for s in sets:
            args += ["--set", s]
        res = run_in_process(*args, threads=1)
        assert res.returncode == 0, res.stderr
        res = _launch(job, base / f"dist-{name}", *sets)
        assert res.returncode == 0, res.stderr[-3000:]
        out[name] = (sim, base / f"dist-{name}")
    return out


@pytest.mark.parametrize("name", list(RUN_SETTINGS))
def test_four_processes_give_the_simulations_adapters(runs, name):
    sim, distributed = runs[name]
    for a, b in zip(_peer_adapters(sim), _peer_adapters(distributed), strict=True):
        assert a.keys() == b.keys()
        for k in a:
            bits = gossip_bits(RUN_SETTINGS[name])
            if bits is not None:  # a value on a level boundary may land a level apart
                assert_equal_up_to_a_level(a[k], b[k], bits=bits, msg=k)
            else:
                torch.testing.assert_close(a[k], b[k], rtol=0, atol=TOLERANCE.get(name, 1e-5))
    ms = [json.loads(x) for x in (sim / "metrics.jsonl").read_text().splitlines()]
    md = [json.loads(x) for x in (distributed / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in ms] == [r["round"] for r in md] == [2, 4, 6]
    for r1, r2 in zip(ms, md, strict=True):
        assert r2["train_loss"] == pytest.approx(r1["train_loss"], abs=TOLERANCE.get(name, 1e-5))
        assert r2["accuracy"] == pytest.approx(r1["accuracy"])
        assert r2["bytes_sent"] == r1["bytes_sent"]
    # bytes that really went through torch.distributed equal the accounting
    summary = json.loads((distributed / "summary.json").read_text())
    wire = summary["distributed"]["bytes_on_wire_per_peer"]
    per_peer = [
        json.loads(
            (distributed / "peers" / f"peer-{i}" / "metrics.jsonl").read_text().split("\n")[-2]
        )
        for i in range(4)
    ]
    assert wire == [int(p["peer_bytes_sent"]) for p in per_peer]
    assert json.loads((distributed / "run.json").read_text())["status"] == "complete"


def test_a_killed_peer_restarts_the_group_and_it_ends_identical(runs, job, tmp_path):
    _, uninterrupted = runs["fp32"]
    out = tmp_path / "killed"
    res = _launch(job, out, env={"DECLORA_KILL_AT": "1:3"}, restarts=1)
    assert res.returncode == 0, res.stderr[-3000:]
    # the first attempt failed because peer 1 vanished: either a neighbour noticed the closed
    # connection first and named it, or torchrun's monitor saw the SIGKILL first and stopped the
    # group (a race between the two; the silent-neighbour test checks the message itself)
    assert "neighbour 1 did not answer" in res.stderr or "exitcode: -9" in res.stderr
    for a, b in zip(_peer_adapters(uninterrupted), _peer_adapters(out), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical on CPU
    status = json.loads((out / "run.json").read_text())
    assert status["status"] == "complete" and status["resumed"] == 1


def test_a_resume_whose_peers_lack_their_checkpoints_stops_and_keeps_the_others(runs, tmp_path):
    """Peers 1 and 3 find no checkpoint of theirs (a machine whose address changed runs other
    peers than before: ranks follow the addresses). The resume used to start every peer over
    from round 1, overwriting the checkpoints peers 0 and 2 had; now every peer stops, says
    which peers lack them, and the folder keeps what it had."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(runs["fp32"][1], run)
    status = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**status, "status": "failed", "error": "lost"}))
    for i in (1, 3):
        shutil.rmtree(run / "checkpoints" / f"peer-{i}")
    kept = {p: p.read_bytes() for p in (run / "checkpoints").rglob("*") if p.is_file()}
    res = _cli("launch", "--peers", "4", "--", "--quiet", "--resume", str(run))
    assert res.returncode == 2, res.stderr[-3000:]
    assert "peer(s) 1, 3 find no checkpoint of their own (rounds peer 0: 4, 6; peer 2: 4, 6)" in (
        res.stderr
    )
    assert {p: p.read_bytes() for p in (run / "checkpoints").rglob("*") if p.is_file()} == kept
    recorded = json.loads((run / "run.json").read_text())
    assert recorded["status"] == "failed" and "find no checkpoint" in recorded["error"]
    # peers that all have checkpoints, but no round in common, are refused alike
    assert "no round is checkpointed by every peer (rounds peer 0: 4, 6; peer 1: 8)" in (
        missing_checkpoints([[4, 6], [8]])
    )


def test_a_failed_group_names_the_peer_that_ended_and_never_stays_running(job, tmp_path):
    """Without restarts, a peer killed mid-run fails the launch. Races decide who speaks:
    peers notice their silent neighbour and stop with that error (exit 2), or the launcher
    sees the kill first and stops every peer with SIGTERM, before or after peer 0 recorded
    its neighbour's silence. The launcher then names the peer and how it ended, and says how
    to continue; run.json says "failed" in every case (it said "running" for good when the
    launcher stopped peer 0 first), with peer 0's own words when it had recorded them."""
    out = tmp_path / "failed"
    res = _launch(job, out, env={"DECLORA_KILL_AT": "1:3"})
    status = json.loads((out / "run.json").read_text())
    assert status["status"] == "failed", res.stderr[-3000:]
    said = "the distributed run failed: peer 1 ended by SIGKILL"
    assert "neighbour 1 did not answer" in status["error"] or said in status["error"]
    if res.returncode == 2:
        assert "neighbour 1 did not answer" in res.stderr
    else:
        assert res.returncode == 1, res.stderr[-3000:]
        assert said in res.stderr, res.stderr[-3000:]
        assert f"continue it with: declora launch --peers 4 -- --resume {out}" in res.stderr


def test_ctrl_c_on_a_launch_stops_every_peer_records_it_and_says_how_to_continue(job, tmp_path):
    """Ctrl-C reaches the launcher and every peer (one process group). The peers end at once
    (before, each unwound a KeyboardInterrupt through gloo's threads: "terminate called
    recursively", and peer 0 could record its neighbours' going as the cause); the launcher
    records the interruption, says how to continue and exits 130."""
    import signal
    import time

    out = tmp_path / "interrupted"
    args = [sys.executable, "-m", "declora", "launch", "--peers", "4", "--", "--quiet"]
    args += ["--config", str(job / "job.yaml"), "--out", str(out), "--set", "train.rounds=400"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(
        args, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    deadline = time.monotonic() + 240
    while not list(out.glob("checkpoints/peer-*/round-*")):
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()
        time.sleep(0.2)
    os.killpg(launcher.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 130, err[-3000:]
    assert f"interrupted; continue it with: declora launch --peers 4 -- --resume {out}" in err
    assert "terminate called" not in err and "Traceback" not in err, err[-3000:]
    status = json.loads((out / "run.json").read_text())
    assert status["status"] == "failed"
    assert status["error"] == "KeyboardInterrupt: interrupted (Ctrl-C)"
    assert status["launch"] == {"peers": 4, "nnodes": "1", "rdzv_endpoint": None}


def test_a_peers_failure_tells_the_cause_from_the_peers_the_launcher_stopped():
    from declora.runners.launch import PeersFailed

    assert str(PeersFailed({2: -15, 1: -9, 0: -15})) == (
        "peer 1 ended by SIGKILL (then peer(s) 0, 2 got SIGTERM: the launcher stops the rest)"
    )
    assert str(PeersFailed({3: 1})) == "peer 3 ended with exit code 1"
    assert str(PeersFailed({0: -15, 1: -15})) == "peer 0 ended by SIGTERM; peer 1 ended by SIGTERM"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_setup_mismatch_stops_every_peer_naming_the_difference(job, tmp_path):
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        args = [sys.executable, "-m", "declora", "run", "--quiet", "--config"]
        args += [str(job / "job.yaml"), "--out", str(tmp_path / "mismatch")]
        args += ["--set", "topology.peers=2", "--set", f"lora.r={8 if rank == 0 else 4}"]
        procs.append(subprocess.Popen(args, env=env, stderr=subprocess.PIPE, text=True))
    errors = [p.communicate(timeout=300)[1] for p in procs]
    for p, err in zip(procs, errors, strict=True):
        assert p.returncode == 2, err
        assert "peer 1 has config.lora.r=4 where peer 0 has 8" in err
        assert "Traceback" not in err


def test_distributed_runs_need_one_process_per_peer(job, tmp_path):
    res = _launch(job, tmp_path / "x", "topology.peers=3")
    assert res.returncode == 2  # refused by the launcher, before any peer process starts
    assert "topology.peers=3 but 4 processes were started" in res.stderr
    assert not (tmp_path / "x").exists()


def test_report_computes_the_averaged_model_from_the_peers_adapters(runs, tmp_path):
    import shutil

    _, distributed = runs["fp32"]
    copy = tmp_path / "copy"
    shutil.copytree(distributed, copy)
    monitored = json.loads((copy / "summary.json").read_text())["rows"][0]
    shutil.rmtree(copy / "adapters" / "average")
    res = _cli("report", str(copy), "--evaluate")
    assert res.returncode == 0, res.stderr
    after = json.loads((copy / "average_metrics.json").read_text())
    assert after["accuracy"] == pytest.approx(monitored["accuracy"])
    assert (copy / "adapters" / "average" / "adapter_model.safetensors").is_file()
    shutil.rmtree(copy / "adapters" / "peer-2")
    res = _cli("report", str(copy), "--evaluate")
    assert res.returncode == 2 and "lacks peer 2's adapter" in res.stderr


@pytest.mark.parametrize(
    "sets, what",
    [
        ({"algorithm": {"name": "centralized"}}, "algorithm.name=centralized needs no network"),
        ({"algorithm": {"name": "local-only"}}, "algorithm.name=local-only needs no network"),
        ({"algorithm": {"name": "ffa"}}, ""),
        ({"topology": {"dynamic": "random-pairs"}}, ""),
        ({"topology": {"offline_prob": 0.1}}, ""),
        ({"train": {"straggler_prob": 0.5}}, ""),
        ({"lora": {"method": "ia3"}}, ""),
    ],
)
def test_only_baselines_without_a_network_are_simulation_only(sets, what):
    from declora.config.schema import RunConfig
    from declora.runners.placement import simulation_only

    assert simulation_only(RunConfig()) == ""
    assert simulation_only(RunConfig(**sets)).startswith(what)
