"""`declora launch` across machines, with network namespaces as the machines.

Each host is a namespace with its own address in 198.18.0.0/24 on one bridge and no other route
(`benchmarks/hosts.py`); node 0 runs on host 0, which owns the rendezvous endpoint. The hosts
share this machine's files, so every node writes into the same run directory, as on a shared
file system.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import (
    assert_equal_up_to_a_level,
    gossip_bits,
    run_in_process,
    write_ring_job,
)

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SETTINGS = {"fp32": [], "q4": ["comm.bits=4", "comm.error_feedback=true"]}


@pytest.fixture(scope="module")
def job(tmp_path_factory, tokenizer) -> Path:
    return write_ring_job(tmp_path_factory.mktemp("multihost"), tokenizer, seed=2)


@pytest.fixture(scope="module")
def hosts(netns_hosts):
    return netns_hosts(3)


_PORTS = iter(range(29400, 29500))


def _endpoint(hosts) -> str:
    """Host 0's address and a fresh port (no TIME_WAIT surprises between launches)."""
    return f"{hosts.address(0)}:{next(_PORTS)}"


def _node(hosts, i: int, rank: int, endpoint: str, job: Path, out: Path, *extra: str):
    """`declora launch` of node `rank` (2 peers) on host i."""
    argv = [sys.executable, "-m", "declora", "launch", "--peers", "2", "--nnodes", "2"]
    argv += ["--node-rank", str(rank), "--rdzv-endpoint", endpoint, *extra, "--"]
    argv += ["--quiet", "--config", str(job / "job.yaml"), "--out", str(out)]
    return hosts.popen(i, argv, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(procs, timeout: float = 300) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
        out.append((p.returncode, err))
    return out


def _sets(*sets: str) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


def _not_complete(run: Path) -> bool:
    status = run / "run.json"
    return not status.exists() or json.loads(status.read_text())["status"] != "complete"


@pytest.fixture(scope="module")
def runs(job, hosts, tmp_path_factory):
    """The simulation and the 2 hosts x 2 peers run of the same job, by setting, made when a
    test first asks for them."""
    base = tmp_path_factory.mktemp("multihost-runs")
    out: dict[str, tuple[Path, Path]] = {}

    def get(name: str) -> tuple[Path, Path]:
        if name not in out:
            sets = SETTINGS[name]
            sim = base / f"sim-{name}"
            res = run_in_process("run", "--quiet", "--config", str(job / "job.yaml"),
                                 "--out", str(sim), *_sets(*sets), threads=1)  # fmt: skip
            assert res.returncode == 0, res.stderr[-3000:]
            dist = base / f"dist-{name}"
            at = _endpoint(hosts)
            procs = [_node(hosts, i, i, at, job, dist, "--rdzv-timeout", "60", *_sets(*sets))
                     for i in (0, 1)]  # fmt: skip
            for code, err in _finish(procs):
                assert code == 0, err[-3000:]
            out[name] = (sim, dist)
        return out[name]

    return get


#: 4-bit gossip with error feedback across hosts runs with `make test-slow` (~35 s of process
#: start-up): the same exchange is held equal on one machine in test_distributed, and the fp32
#: case holds the two-host transport equal here.
@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n == "q4" else n for n in SETTINGS]
)
def test_two_hosts_give_the_simulations_adapters(runs, name):
    sim, dist = runs(name)
    for i in range(4):
        a = load_file(str(sim / "adapters" / f"peer-{i}" / "adapter_model.safetensors"))
        b = load_file(str(dist / "adapters" / f"peer-{i}" / "adapter_model.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            bits = gossip_bits(SETTINGS[name])
            if bits is not None:  # a value on a level boundary may land a level apart
                assert_equal_up_to_a_level(a[k], b[k], bits=bits, msg=f"peer {i} {k}")
            else:
                torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)
    assert json.loads((dist / "run.json").read_text())["status"] == "complete"


def test_an_unreachable_endpoint_is_named(job, hosts, tmp_path):
    # nothing listens at host 0: host 1 gives up after --rdzv-timeout
    at = _endpoint(hosts)
    (res,) = _finish([_node(hosts, 1, 1, at, job, tmp_path / "x", "--rdzv-timeout", "2")])
    assert res[0] == 2, res[1]
    assert f"cannot reach the rendezvous at {at}" in res[1]
    assert f"from {hosts.address(1)} within 2 s" in res[1]
    assert "Traceback" not in res[1] and _not_complete(tmp_path / "x")
    # an address no route leads to (in the benchmark range, off this link): said at once
    (res,) = _finish([_node(hosts, 1, 1, "198.19.0.1:29400", job, tmp_path / "y")])
    assert res[0] == 2 and "no route to the rendezvous endpoint 198.19.0.1" in res[1], res[1]


@pytest.mark.parametrize(
    "host, rank, says",
    [
        (0, 2, "--node-rank 2 is out of range for --nnodes 2 (0 to 1)"),
        (1, 0, "--node-rank 0 hosts the rendezvous, but 198.18.0.1 is not an address of this"),
        (0, 1, "this machine owns the rendezvous endpoint 198.18.0.1: it is node 0"),
    ],
)
def test_a_wrong_node_rank_is_refused_before_anything_starts(
    job, hosts, tmp_path, host, rank, says
):
    at = _endpoint(hosts)
    (res,) = _finish([_node(hosts, host, rank, at, job, tmp_path / "x", "--rdzv-timeout", "5")])
    assert res[0] == 2 and says in res[1], res[1]
    assert "Traceback" not in res[1] and not (tmp_path / "x").exists()


def test_two_machines_claiming_one_rank_are_named(job, hosts, tmp_path):
    at, timeout = _endpoint(hosts), ["--rdzv-timeout", "20"]
    procs = [_node(hosts, i, r, at, job, tmp_path / "x", *timeout) for i, r in ((1, 1), (2, 1))]
    procs.append(_node(hosts, 0, 0, at, job, tmp_path / "x", *timeout))
    # whichever of hosts 1 and 2 claims rank 1 second is refused, naming both addresses; node 0
    # and the first claimant make a complete set and may start the job, so stop them then
    deadline = time.monotonic() + 60
    while all(p.poll() is None for p in procs[:2]) and time.monotonic() < deadline:
        time.sleep(0.2)
    for i in range(3):
        hosts.kill(i)
    results = _finish(procs)
    refused = [err for code, err in results[:2] if code == 2 and "two machines claim" in err]
    assert refused, results
    a, b = hosts.address(1), hosts.address(2)
    assert f"claim --node-rank 1: {a} and {b}" in refused[0] or f"{b} and {a}" in refused[0]
    assert "Traceback" not in refused[0]


def test_a_host_with_another_config_stops_both_naming_the_key(job, hosts, tmp_path):
    at, out = _endpoint(hosts), tmp_path / "x"
    procs = [
        _node(hosts, 0, 0, at, job, out, "--rdzv-timeout", "60"),
        _node(hosts, 1, 1, at, job, out, "--rdzv-timeout", "60", *_sets("lora.r=4")),
    ]
    for code, err in _finish(procs):
        assert code == 2, err[-3000:]
        assert "has config.lora.r=4 where peer 0 has 8" in err
        assert "Traceback" not in err
    assert _not_complete(out)


def test_the_launch_plan_takes_the_address_towards_the_endpoint():
    """Without namespaces: the checks and torchrun options of a multi-machine launch."""
    from declora.errors import DecloraError
    from declora.runners.launch import multi_host, torchrun_args

    plan = multi_host("2", 0, "127.0.0.1:29400", timeout_s=30)
    assert plan.is_host and plan.local_addr == "127.0.0.1" and plan.interface == "lo"
    opts = torchrun_args(2, "2", 0, "127.0.0.1:29400", 0, None, plan)
    assert "--rdzv-conf=is_host=1,join_timeout=30,read_timeout=30" in opts
    assert "--local-addr=127.0.0.1" in opts and "--rdzv-endpoint=127.0.0.1:29400" in opts
    assert not multi_host("2", 1, "127.0.0.1:29400").is_host
    with pytest.raises(DecloraError, match="out of range for --nnodes 2"):
        multi_host("2", 2, "127.0.0.1:29400")
    with pytest.raises(DecloraError, match="is not HOST:PORT"):
        multi_host("2", 0, "127.0.0.1")
    with pytest.raises(DecloraError, match=r"--local-addr 198\.19\.255\.7 is not an address"):
        multi_host("2", 1, "127.0.0.1:29400", local_addr="198.19.255.7")


# ----------------------------------------------------------------- a machine that dies


@pytest.fixture(scope="module")
def long_job(tmp_path_factory, tokenizer) -> Path:
    """Long enough (30 rounds) that a host can be killed while the run is under way."""
    d = tmp_path_factory.mktemp("multihost-long")
    return write_ring_job(d, tokenizer, seed=4, rounds=30, eval={"monitor": False})


def _wait_for_round(metrics: Path, at_least: int, procs, timeout: float = 120) -> None:
    """Until a peer has recorded `at_least` rounds (the run is under way, not finished)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.is_file():
            rounds = [json.loads(x)["round"] for x in metrics.read_text().splitlines() if x]
            if rounds and rounds[-1] >= at_least:
                return
        if any(p.poll() is not None for p in procs):
            raise AssertionError(f"a node stopped early: {_finish(procs)}")
        time.sleep(0.05)
    raise AssertionError(f"no round {at_least} in {metrics} after {timeout} s")


@pytest.mark.slow  # a 2-host run with a host killed, ~35 s: make test-slow
def test_a_dead_host_is_skipped_and_named(long_job, hosts, tmp_path):
    out, at = tmp_path / "skip", _endpoint(hosts)
    sets = _sets("comm.on_peer_failure=skip", "comm.timeout_s=3")
    wait = ["--rdzv-timeout", "60", "--exit-wait", "5"]  # host 0 does not wait 300 s for host 1
    procs = [_node(hosts, i, i, at, long_job, out, *wait, *sets) for i in (0, 1)]
    _wait_for_round(out / "peers" / "peer-2" / "metrics.jsonl", 4, procs)
    hosts.kill(1)  # every process of host 1: its agent and peers 2 and 3
    began = time.monotonic()
    (code0, err0), (code1, _) = _finish(procs)
    assert time.monotonic() - began < 120
    assert code1 == -9
    assert code0 == 0, err0[-3000:]
    # on the ring 0-1-2-3-0, peer 0 lost neighbour 3 and peer 1 lost neighbour 2
    assert "peer 0: finished without neighbour(s) 3" in err0
    assert "peer 1: finished without neighbour(s) 2" in err0
    for i, lost in ((0, [3]), (1, [2])):  # each surviving peer's own record of whom it lost
        wire = json.loads((out / "peers" / f"peer-{i}" / "wire.json").read_text())
        assert wire["lost_neighbours"] == lost
    summary = json.loads((out / "summary.json").read_text())
    assert summary["distributed"]["lost_neighbours_per_peer"][0] == [3]
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
    assert "Traceback" not in err0
    for i in (0, 1):
        assert (out / "adapters" / f"peer-{i}" / "adapter_model.safetensors").is_file()


@pytest.fixture(scope="module")
def whole(long_job, hosts, tmp_path_factory) -> Path:
    """The long job on 2 hosts, uninterrupted: what a killed-and-resumed run must equal."""
    at, out = _endpoint(hosts), tmp_path_factory.mktemp("multihost-whole") / "run"
    procs = [_node(hosts, i, i, at, long_job, out, "--rdzv-timeout", "60") for i in (0, 1)]
    for code, err in _finish(procs):
        assert code == 0, err[-3000:]
    return out


def _same_adapters(a_run: Path, b_run: Path) -> None:
    for i in range(4):
        a = load_file(str(a_run / "adapters" / f"peer-{i}" / "adapter_model.safetensors"))
        b = load_file(str(b_run / "adapters" / f"peer-{i}" / "adapter_model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # two 2-host runs, ~2 min: make test-slow
def test_a_machine_started_again_rejoins_under_max_restarts_bit_identically(
    long_job, hosts, whole, tmp_path
):
    """Host 1 dies whole (agent included) and is started again with the same command: host 0's
    agent restarts its peers (--max-restarts 1), both meet in a new rendezvous, the peers agree
    on the newest common checkpoint and the run ends equal to the uninterrupted one."""
    at, out = _endpoint(hosts), tmp_path / "restarted"
    extra = ("--rdzv-timeout", "60", "--max-restarts", "1")
    procs = [_node(hosts, i, i, at, long_job, out, *extra) for i in (0, 1)]
    _wait_for_round(out / "peers" / "peer-2" / "metrics.jsonl", 6, procs)
    hosts.kill(1)
    assert procs[1].wait(timeout=30) == -9
    procs[1] = _node(hosts, 1, 1, at, long_job, out, *extra)
    for code, err in _finish(procs):
        assert code == 0, err[-3000:]
    status = json.loads((out / "run.json").read_text())
    assert status["status"] == "complete" and status["resumed"] == 1
    assert "did not answer" in status["previous_error"]
    _same_adapters(whole, out)


@pytest.mark.slow  # two 2-host runs, ~2 min: make test-slow
def test_a_run_whose_host_died_resumes_on_both_hosts_bit_identically(
    long_job, hosts, whole, tmp_path
):
    at, out = _endpoint(hosts), tmp_path / "killed"
    procs = [_node(hosts, i, i, at, long_job, out, "--rdzv-timeout", "60") for i in (0, 1)]
    _wait_for_round(out / "peers" / "peer-2" / "metrics.jsonl", 6, procs)
    hosts.kill(1)
    (code0, err0), (code1, _) = _finish(procs)
    assert code1 == -9 and code0 == 2, err0[-3000:]
    assert "did not answer" in err0 and _not_complete(out)
    # both machines started again on the run directory: the peers agree on the newest round
    # all of them saved and continue from it
    at = _endpoint(hosts)
    procs = []
    for i in (0, 1):
        argv = [sys.executable, "-m", "declora", "launch", "--peers", "2", "--nnodes", "2"]
        argv += ["--node-rank", str(i), "--rdzv-endpoint", at, "--rdzv-timeout", "60", "--"]
        argv += ["--quiet", "--resume", str(out)]
        procs.append(hosts.popen(i, argv, env=ENV, stderr=subprocess.PIPE, text=True))
    for code, err in _finish(procs):
        assert code == 0, err[-3000:]
    status = json.loads((out / "run.json").read_text())
    assert status["status"] == "complete" and status["resumed"] == 1
    _same_adapters(whole, out)


@pytest.mark.slow  # a 2-host run cut mid-way, ~60 s: make test-slow
def test_a_link_down_longer_than_the_timeout_stops_the_run_naming_the_neighbour(
    long_job, hosts, tmp_path
):
    out, at = tmp_path / "cut", _endpoint(hosts)
    wait = ["--rdzv-timeout", "60", "--exit-wait", "5"]
    procs = [
        _node(hosts, i, i, at, long_job, out, *wait, *_sets("comm.timeout_s=3")) for i in (0, 1)
    ]
    _wait_for_round(out / "peers" / "peer-2" / "metrics.jsonl", 4, procs)
    hosts.link(1, up=False)
    try:
        results = _finish(procs, timeout=180)
    finally:
        hosts.link(1, up=True)
    # both sides of the cut: the peers next to it name the neighbour that went silent and the
    # timeout; host 0's launcher ends with them, host 1's (whose agent cannot reach the store
    # behind the cut) says so after --exit-wait + 30 s; both exit 2
    for code, err in results:
        assert code == 2, err[-3000:]
        assert "did not answer" in err and "comm.timeout_s=3" in err, err[-3000:]
        assert "Traceback" not in err
    assert "peer(s) 0, 1 stopped with the error above" in results[0][1]
    assert "cannot be reached to end the run" in results[1][1]
    assert _not_complete(out)


@pytest.mark.slow  # a 2-host run stopped by Ctrl-C on its first host, ~30 s: make test-slow
def test_ctrl_c_on_the_first_machine_is_recorded_and_says_how_every_machine_continues(
    long_job, hosts, tmp_path
):
    """Across machines too, the launcher of peer 0's machine records the stop in run.json
    (before, it said "running" for good: the launcher ended peer 0 before peer 0 could say
    anything), and each launcher says how to continue: every machine again, with its rank."""
    import signal

    at, out = _endpoint(hosts), tmp_path / "stopped"
    procs = []
    for i in (0, 1):
        argv = [sys.executable, "-m", "declora", "launch", "--peers", "2", "--nnodes", "2"]
        argv += ["--node-rank", str(i), "--rdzv-endpoint", at, "--rdzv-timeout", "60", "--"]
        argv += ["--quiet", "--config", str(long_job / "job.yaml"), "--out", str(out)]
        procs.append(
            hosts.popen(i, argv, env=ENV, stderr=subprocess.PIPE, text=True, start_new_session=True)
        )
    deadline = time.monotonic() + 120
    while not list(out.glob("checkpoints/peer-*/round-*")):
        assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, _finish(procs)
        time.sleep(0.2)
    os.killpg(procs[0].pid, signal.SIGINT)  # what the terminal does on Ctrl-C
    (code0, err0), (code1, err1) = _finish(procs)
    assert code0 == 130, err0[-3000:]
    again = "--peers 2 --nnodes 2 --node-rank <its rank> --rdzv-endpoint"
    hint = f"continue it by starting every machine again with: declora launch {again} {at}"
    assert f"interrupted; {hint} -- --resume {out}" in err0
    assert code1 != 0 and f"{hint} -- --resume {out}" in err1, err1[-3000:]
    for err in (err0, err1):  # one line each says what happened: no C++ stack trace per retry
        assert "frame #0" not in err and "socket.cpp" not in err, err[-3000:]
        assert "node_rank is only used" not in err, err[-3000:]  # ours is: a roll call
        assert "See inner exception" not in err, err[-3000:]  # torch's words, with no inner one
    status = json.loads((out / "run.json").read_text())
    assert status["status"] == "failed", status
    assert status["error"] == "KeyboardInterrupt: interrupted (Ctrl-C)", status
    report = subprocess.run(  # read later, the folder says the same (both hosts' peers wrote it)
        [sys.executable, "-m", "declora", "report", str(out)],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert report.returncode == 2 and f"{hint} -- --resume {out}" in report.stderr, report.stderr
