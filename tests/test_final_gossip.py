"""comm.final_gossip: exchanges after the last round, with no training between them, so that
each peer's own model nears the network average before it is scored and saved. What they do to
the factors (W^k, the average kept), their bytes, the peers' scores, and what is refused; real
peers equal to the simulation are in test_distributed (the "q4-momentum-final" run)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from declora.network.topology import build_topology
from declora.tasks.task import ClassificationTask
from tests.conftest import (
    TIMINGS,
    assert_refused,
    run_in_process,
    train_tiny_ring,
    write_ring_job,
)

ROUNDS = 3


def _train(tokenizer, task, final: int):
    res, _, plan = train_tiny_ring(
        tokenizer,
        task,
        rounds=ROUNDS,
        eval_every=1,
        eval_peers="final",
        final_gossip_steps=final,
    )
    return res, plan


@pytest.fixture(scope="module")
def pair(tokenizer):
    task = ClassificationTask(tokenizer)
    return _train(tokenizer, task, 0), _train(tokenizer, task, 20)


def test_the_final_exchanges_apply_w_to_the_last_rounds_factors_and_keep_their_mean(pair):
    (plain, plan), (settled, _) = pair
    W = torch.tensor(np.linalg.matrix_power(plan.mixing, 20), dtype=torch.float32)
    deviation = {"before": 0.0, "after": 0.0}  # squared distance of the peers to their mean
    for k, before in plain.final.items():
        expected = torch.einsum("ij,j...->i...", W, before)
        torch.testing.assert_close(settled.final[k], expected, rtol=1e-4, atol=1e-6)
        # the average of the peers, the paper's model, is what it was
        torch.testing.assert_close(settled.final[k].mean(0), before.mean(0), rtol=1e-4, atol=1e-6)
        deviation["before"] += float((before - before.mean(0)).pow(2).sum())
        deviation["after"] += float((settled.final[k] - before.mean(0)).pow(2).sum())
    assert deviation["before"] > 0 and deviation["after"] < 0.25 * deviation["before"]


def test_the_final_exchanges_are_counted_and_bring_the_peers_together(pair):
    (plain, _), (settled, _) = pair
    a, b = plain.records, settled.records
    assert [r["round"] for r in a] == [r["round"] for r in b] == [1, 2, 3]
    for x, y in zip(a[:-1], b[:-1], strict=True):  # the rounds before the last are untouched
        assert x["bytes_sent"] == y["bytes_sent"] and x["train_loss"] == y["train_loss"]
    per_exchange = a[0]["bytes_sent"]
    assert per_exchange > 0 and b[-1]["bytes_sent"] == (ROUNDS + 20) * per_exchange
    assert b[-1]["consensus_distance"] < 0.5 * a[-1]["consensus_distance"]
    assert b[-1]["accuracy"] == pytest.approx(a[-1]["accuracy"], abs=1 / 40)
    spread = []
    for r in (plain, settled):
        scores = [p["accuracy"] for p in r.peer_metrics]
        spread.append(max(scores) - min(scores))
    assert spread[1] <= spread[0]


@pytest.fixture(scope="module")
def job(tmp_path_factory, tokenizer):
    return write_ring_job(tmp_path_factory.mktemp("finalgossipjob"), tokenizer, seed=5, rounds=4)


@pytest.fixture(scope="module")
def cli_runs(job, tmp_path_factory):
    """The job through `declora run`, with a validation split, without and with 6 exchanges
    after its 4 rounds."""
    runs = {}
    for k in (0, 6):
        out = tmp_path_factory.mktemp("finalgossipruns") / f"final{k}"
        res = run_in_process(
            "run", "--quiet", "--config", str(job / "job.yaml"), "--out", str(out),
            "--set", "data.val_size=0.2", "--set", f"comm.final_gossip={k}", threads=1,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        runs[k] = out
    return runs


def _metrics(run) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_run_with_final_gossip_reports_its_bytes_and_settled_peers(cli_runs):
    runs = {k: _metrics(out) for k, out in cli_runs.items()}
    plain, settled = runs[0][-1], runs[6][-1]
    assert settled["bytes_sent"] == plain["bytes_sent"] * (4 + 6) / 4
    assert settled["consensus_distance"] < plain["consensus_distance"]
    untimed = [[{k: v for k, v in r.items() if k not in TIMINGS} for r in runs[k]] for k in runs]
    assert untimed[0][:-1] == untimed[1][:-1]  # the rounds before the last are untouched


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["algorithm.name=fedavg"], "does not gossip (its peers already hold one average)"),
        (["algorithm.name=local-only"], "does not gossip (its peers already hold their own"),
        (["comm.overlap=true"], "comm.final_gossip=3 is not supported with it (use 0)"),
    ],
)
def test_what_final_gossip_cannot_do_is_refused_before_any_run_directory(
    job, tmp_path, sets, message
):
    assert_refused(job, tmp_path, [*sets, "comm.final_gossip=3"], "comm.final_gossip", message)


def test_a_negative_count_of_final_exchanges_is_refused(job, tmp_path):
    assert_refused(job, tmp_path, ["comm.final_gossip=-1"], "comm.final_gossip")


def test_the_benchmark_settles_a_finished_run_as_the_loop_does(cli_runs):
    """benchmarks/final_gossip.py makes its exchanges on a finished run's saved adapters; they
    give what a run with comm.final_gossip gives: the same peers' scores and disagreement."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("fg", root / "benchmarks" / "final_gossip.py")
    fg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fg)
    runs = cli_runs
    rows = {r["exchanges_after"]: r for r in fg.settle(runs[0], [0, 6], set())}
    last = _metrics(runs[6])[-1]
    assert rows[0]["peers_test_accuracy"] == pytest.approx(rows[0]["run_peers_test_accuracy"])
    assert rows[6]["peers_test_accuracy"] == pytest.approx(last["peers_test_accuracy"])
    assert rows[6]["consensus_distance"] == pytest.approx(last["consensus_distance"], rel=1e-4)
    assert rows[6]["consensus_distance"] < rows[0]["consensus_distance"]
    spent = last["bytes_sent"] - rows[0]["bytes_per_peer_training"]
    assert rows[6]["bytes_per_peer"] == pytest.approx(spent)
    lines = fg.table(list(rows.values())).splitlines()
    assert len(lines) == 4 and "each peer's own model" in lines[0]
    for line, k in zip(lines[2:], (0, 6), strict=True):  # one line per count, in order
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == rows[k]["data"] and cells[3] == str(k)
        assert cells[5] == f"{rows[k]['peers_test_accuracy']:.3f}"
    # another task's runs of the same setting get lines of their own, not a shared mean
    other = [{**r, "data": "other-task", "peers_test_accuracy": 0.1} for r in rows.values()]
    lines = fg.table([*rows.values(), *other]).splitlines()
    assert len(lines) == 6
    assert {c.split("|")[1].strip() for c in lines[2:]} == {rows[0]["data"], "other-task"}


def test_the_report_says_how_to_close_a_gap_between_the_peers_and_the_average():
    from declora.config.schema import load_config
    from declora.engine.round_loop import Result
    from declora.network.topology import gossip_rounds_to
    from declora.reporting.report import peers_gap_markdown

    ring = build_topology("ring", 10, "laplacian")

    def note(own: float, *sets: str) -> str:
        res = Result(
            "x", records=[{"accuracy": 0.9, "peers_accuracy": own, "consensus_distance": 2.0}]
        )
        return peers_gap_markdown(load_config(None, list(sets)), ring, res)

    text = note(0.8)
    tenfold = gossip_rounds_to(0.1, ring.spectral_gap)
    assert tenfold == 36  # the 10-ring's |lambda_2| = 0.936
    assert "10.0 points below the averaged model**: the peers had not agreed" in text
    assert f"about {tenfold} exchanges cut the disagreement tenfold" in text
    assert "after the 30 exchanges" in note(0.8, "comm.final_gossip=30")
    assert note(0.895) == ""  # within a point: nothing to say
    assert note(0.8, "algorithm.name=fedavg") == ""  # its peers hold the average
    assert note(0.8, "algorithm.name=fedsa") == ""  # B stays each peer's own, by design
    assert "10.0 points below" in note(0.8, "algorithm.name=ffa")  # A frozen, B mixed
