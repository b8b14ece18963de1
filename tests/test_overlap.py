"""comm.overlap: gossip one round stale, x^t = y^t + (W x^{t-1} - x^{t-1}), defined once.

The arithmetic on its own (the wrapper around any communicator), then whole runs: bytes as
before, resume exact, and the config refusing what it cannot do. The equality of real peers
with the simulation is in test_distributed (the "overlap" run).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from declora.network.compress import make_compressor
from declora.network.compressed import CompressedGossip
from declora.network.distributed import PeerFailure
from declora.network.overlap import OverlappedGossip
from declora.network.simulated import SimulatedGossip
from declora.network.topology import build_topology
from tests.conftest import (
    assert_refused,
    run_adapters,
    run_cli,
    run_in_process,
    run_job,
    run_metrics,
    write_ring_job,
)


def _ring(n: int = 5) -> np.ndarray:
    return build_topology("ring", n, "metropolis").mixing


def _values(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "m.lora_A": torch.randn(n, 2, 6, generator=g),
        "m.lora_B": torch.randn(n, 6, 2, generator=g),
    }


def test_without_training_it_is_plain_gossip():
    W = _ring()
    x = _values(5, 0)
    g = OverlappedGossip(SimulatedGossip(W), background=False)
    g.start(x)
    out = g.mix(x)  # no local steps: y = x
    Wt = torch.tensor(W, dtype=torch.float32)
    for k, v in x.items():
        torch.testing.assert_close(out[k], torch.einsum("ij,j...->i...", Wt, v))


def test_the_correction_is_the_mix_of_what_was_sent_and_keeps_the_average():
    W = _ring()
    x, y = _values(5, 0), _values(5, 1)
    g = OverlappedGossip(SimulatedGossip(W), background=False)
    g.start(x)
    out = g.mix(y)
    Wt = torch.tensor(W, dtype=torch.float32)
    for k in x:
        expected = y[k] + torch.einsum("ij,j...->i...", Wt, x[k]) - x[k]
        torch.testing.assert_close(out[k], expected)
        # W doubly stochastic: the corrections sum to zero, the mean moves by the updates only
        torch.testing.assert_close(out[k].mean(0), y[k].mean(0), atol=1e-6, rtol=0)
        assert not torch.allclose(out[k], y[k])  # and the peers were moved


def test_the_background_thread_computes_exactly_what_the_simulation_does():
    W = _ring()
    runs = []
    for background in (False, True):
        comp = make_compressor(4, "stochastic", "block", 8)
        g = OverlappedGossip(
            CompressedGossip(W, comp, error_feedback=True, seed=3), background=background
        )
        x, outs, sent_bytes = _values(5, 0), [], []
        for t in range(3):  # the encoder's RNG and residuals carry across rounds
            g.start(x)
            y = {k: v + 0.1 * (t + 1) for k, v in x.items()}
            x = g.mix(y)
            outs.append(x)
            sent_bytes.append(g.last_bytes.copy())
        runs.append((outs, sent_bytes))
    for a, b in zip(runs[0][0], runs[1][0], strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(np.array_equal(a, b) for a, b in zip(*[r[1] for r in runs], strict=True))
    assert runs[0][1][0].sum() > 0


class _Failing(SimulatedGossip):
    def mix(self, values):
        raise PeerFailure("peer 0: neighbour 1 did not answer")


def test_an_exchange_that_fails_in_the_background_fails_the_round():
    g = OverlappedGossip(_Failing(_ring()), background=True)
    x = _values(5, 0)
    g.start(x)
    with pytest.raises(PeerFailure, match="neighbour 1 did not answer"):
        g.mix(x)
    g.start(x)  # the wrapper is usable again: nothing stays in flight
    g.close()


def test_nothing_is_saved_or_rewired_while_an_exchange_is_in_flight():
    g = OverlappedGossip(SimulatedGossip(_ring()), background=False)
    g.start(_values(5, 0))
    with pytest.raises(RuntimeError, match="in flight"):
        g.state_dict()
    with pytest.raises(RuntimeError, match="in flight"):
        g.set_mixing(_ring())
    with pytest.raises(RuntimeError, match="one exchange per round"):
        g.start(_values(5, 0))


# ----------------------------------------------------------------- whole runs


@pytest.fixture(scope="module")
def job(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("overlapjob")
    # one thread: runs in this process and a killed one in a fresh process agree bit for bit
    comm = {"bits": 4, "error_feedback": True}
    return write_ring_job(d, tokenizer, seed=3, comm=comm, train={"threads": 1})


@pytest.fixture(scope="module")
def runs(job, tmp_path_factory):
    base = tmp_path_factory.mktemp("overlapruns")
    for name, sets in {"sync": (), "overlap": ("comm.overlap=true",)}.items():
        args = ["run", "--quiet", "--config", str(job / "job.yaml"), "--out", str(base / name)]
        res = run_in_process(*args, *(x for s in sets for x in ("--set", s)))
        assert res.returncode == 0, res.stderr[-3000:]
    return base


def test_an_overlapped_run_sends_the_same_bytes_and_ends_elsewhere(runs):
    sync, over = run_metrics(runs / "sync"), run_metrics(runs / "overlap")
    assert [r["bytes_sent"] for r in over] == [r["bytes_sent"] for r in sync]
    assert over[-1]["bytes_sent"] > 0
    a, b = run_adapters(runs / "sync"), run_adapters(runs / "overlap")
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], b[k]) for k in a)  # one round stale is another algorithm
    assert all(bool(torch.isfinite(v).all()) for v in b.values())
    saved = yaml.safe_load((runs / "overlap" / "config.yaml").read_text())
    assert saved["comm"]["overlap"] is True


@pytest.mark.slow  # two more CLI runs, ~20 s: make test-slow
def test_a_killed_overlapped_run_resumes_exactly(job, runs, tmp_path):
    out = tmp_path / "killed"
    res = run_job(job, out, "comm.overlap=true", env={"DECLORA_KILL_AT": "3"})
    assert res.returncode == -9
    res = run_cli("run", "--quiet", "--resume", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = run_adapters(runs / "overlap"), run_adapters(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert run_metrics(out) == run_metrics(runs / "overlap")


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["algorithm.name=decaf", "comm.bits=32", "comm.error_feedback=false"], "product-svd"),
        (["comm.gossip_steps=2"], "comm.gossip_steps=2"),
        (["algorithm.name=fedavg"], "does not gossip"),
    ],
)
def test_what_overlap_cannot_do_is_refused_before_any_run_directory(job, tmp_path, sets, message):
    assert_refused(job, tmp_path, [*sets, "comm.overlap=true"], "comm.overlap", message)
