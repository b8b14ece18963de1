"""The follow-up algorithms and dynamic networks as options of the one round loop: through
`train` (offline peers untouched, ADF phases, bytes, determinism) and through the CLI (every
algorithm and every dynamic kind end to end, resume, bad settings)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, get_args

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from declora.algorithms import make_plan
from declora.cli import app
from declora.config.schema import DynamicKind
from declora.data.partition import partition
from declora.engine import checkpoint as ckpt
from declora.engine.batched import BatchedEngine
from declora.engine.plan import Plan
from declora.engine.round_loop import LoopHooks, LoopParts, LoopSettings, train
from declora.model.adapters import build_spec, initial_state
from declora.network.compress import make_compressor
from declora.network.compressed import CompressedGossip
from declora.network.mixing import DecafGossip
from declora.network.schedules import DYNAMIC_KINDS, make_schedule
from declora.network.simulated import SimulatedGossip
from declora.network.topology import build_topology
from declora.tasks.evaluate import Evaluator
from tests.conftest import (
    TIMINGS,
    run_adapters,
    run_cli,
    run_in_process,
    synthetic_examples,
    tiny_bert,
    write_tiny_job,
)

N = 4
runner = CliRunner()


def test_config_names_match_the_modules():
    assert set(get_args(DynamicKind)) == set(DYNAMIC_KINDS)


# ----------------------------------------------------------------- the loop itself


@pytest.fixture(scope="module")
def examples(tokenizer) -> list[dict]:
    return synthetic_examples(tokenizer, 120)


def _parts(examples: list[dict]) -> list[np.ndarray]:
    labels = np.array([e["label"] for e in examples])
    return partition(labels, N, "dirichlet", seed=0, alpha=1.0, min_size=4)


def _engine(task, plan: Plan, rounds: int, local_steps: int) -> tuple[BatchedEngine, Any]:
    model = tiny_bert()
    spec = build_spec(model, ["query", "value"], r=2, alpha=4, dropout=0.0, train_head=True)
    init = initial_state(model, spec, seed=0)
    engine = BatchedEngine(
        model,
        spec,
        plan.n,
        init,
        task,
        lr=0.5,
        optimizer="sgd",
        schedule="constant",
        total_steps=rounds * local_steps,
    )
    return engine, spec


def _snapshots(
    task,
    examples: list[dict],
    plan: Plan,
    *,
    rounds: int,
    local_steps: int = 2,
    gossip=None,
) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, Any]], BatchedEngine]:
    """Run the loop with an evaluation every round; keep every peer's parameters and SGD
    momentum after each round (index 0: the initial state)."""
    engine, spec = _engine(task, plan, rounds, local_steps)

    def state() -> dict[str, torch.Tensor]:
        out = {k: v.clone() for k, v in engine.stacked().items()}
        for k, p in engine.params.items():
            buf = engine.optimizer.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                out[f"{k}#momentum"] = buf.clone()
        return out

    snaps = [state()]
    result = train(
        LoopParts(
            engine,
            plan,
            Evaluator(examples[:16], 3, batch_size=16),
            communicator=gossip,
        ),
        examples,
        LoopSettings(
            rounds=rounds,
            local_steps=local_steps,
            seed=0,
            eval_every=1,
            eval_peers="never",
            lora_modules=spec.lora_modules,
        ),
        LoopHooks(on_record=lambda rec: snaps.append(state()), progress=False),
    )
    return snaps, result.records, engine


def _gossip(kind: str, W: np.ndarray):
    if kind == "decaf":
        return DecafGossip(W)
    if kind == "4-bit":
        comp = make_compressor(4, "stochastic", "block", 64)
        return CompressedGossip(W, comp, error_feedback=True, seed=0)
    return None


@pytest.mark.parametrize("communicator", ["exact", "decaf", "4-bit"])
def test_an_offline_peer_is_untouched_in_that_round(task, examples, communicator):
    topo = build_topology("complete", N, "metropolis")
    schedule = make_schedule("static", N, seed=1, offline_prob=0.35, base=topo)
    algorithm = "decaf" if communicator == "decaf" else "dec-lora"
    plan = make_plan(algorithm, topo, _parts(examples), 4, schedule=schedule)
    rounds = 6
    snaps, _, _ = _snapshots(
        task, examples, plan, rounds=rounds, gossip=_gossip(communicator, topo.mixing)
    )
    seen_offline = seen_online = 0
    for t in range(2, rounds + 1):  # from round 2 on, everyone has momentum to keep
        live = schedule.live(t)
        before, after = snaps[t - 1], snaps[t]
        assert before.keys() == after.keys()
        for i in range(N):
            same = all(torch.equal(before[k][i], after[k][i]) for k in before)
            if not live[i]:
                assert same, f"peer {i} was offline in round {t} but changed"
                seen_offline += 1
            elif not same:
                seen_online += 1
    assert seen_offline > 0 and seen_online > 0


def test_adf_switches_phases_on_schedule_in_the_loop(task, examples):
    topo = build_topology("ring", N, "laplacian")
    plan = make_plan("adf", topo, _parts(examples), 4, period=2)
    snaps, _, engine = _snapshots(
        task, examples, plan, rounds=6, gossip=SimulatedGossip(np.eye(N))
    )  # no mixing: a frozen factor must not move at all
    for t in range(1, 7):
        trained = "lora_B" if (t - 1) // 2 % 2 == 0 else "lora_A"
        frozen = "lora_A" if trained == "lora_B" else "lora_B"
        before, after = snaps[t - 1], snaps[t]
        keys = [k for k in before if k.endswith(frozen)]
        assert keys and all(torch.equal(before[k], after[k]) for k in keys), t
        moved = [k for k in before if k.endswith(trained)]
        assert any(not torch.equal(before[k], after[k]) for k in moved), t
    assert engine.trainable == frozenset({"lora_B"})  # round 6 is in phase 3 (B)


def test_ffa_sends_half_the_bytes_and_never_moves_a(task, examples):
    topo = build_topology("ring", N, "laplacian")
    parts = _parts(examples)
    out = {}
    for algorithm in ("dec-lora", "ffa"):
        plan = make_plan(algorithm, topo, parts, 4)
        engine, spec = _engine(task, plan, 2, 1)
        keys = {k for k in engine.stacked() if k.endswith(("lora_A", "lora_B"))}
        mix = keys if algorithm == "dec-lora" else {k for k in keys if k.endswith("lora_B")}
        res = train(
            LoopParts(
                engine,
                plan,
                Evaluator(examples[:16], 3),
                mix_keys=mix,
            ),
            examples,
            LoopSettings(
                rounds=2,
                local_steps=1,
                seed=0,
                eval_every=2,
                eval_peers="never",
                lora_modules=spec.lora_modules,
            ),
            LoopHooks(progress=False),
        )
        out[algorithm] = res
    assert out["ffa"].last("bytes_sent") * 2 == out["dec-lora"].last("bytes_sent")
    init = initial_state(tiny_bert(), spec, seed=0)
    for k, v in out["ffa"].final.items():
        if k.endswith("lora_A"):
            assert all(torch.equal(v[i], init[k]) for i in range(N))


def test_bytes_follow_each_rounds_messages(task, examples):
    """One-peer exponential: one message per peer per round, whatever the base graph."""
    topo = build_topology("complete", N, "metropolis")
    schedule = make_schedule("one-peer-exponential", N, seed=0)
    plan = make_plan("dec-lora", topo, _parts(examples), 4, schedule=schedule)
    _, records, engine = _snapshots(task, examples, plan, rounds=3, local_steps=1)
    values = sum(int(v[0].numel()) for v in engine.stacked().values())
    assert [r["bytes_sent"] for r in records] == [4.0 * values * t for t in (1, 2, 3)]


def test_stragglers_and_offline_peers_train_fewer_examples(task, examples):
    topo = build_topology("ring", N, "laplacian")
    schedule = make_schedule("random-pairs", N, seed=2, p=0.8, offline_prob=0.2, straggler_prob=0.5)
    plan = make_plan("ffa", topo, _parts(examples), 4, schedule=schedule)
    _, records, _ = _snapshots(task, examples, plan, rounds=4, local_steps=3)
    for rec in records:
        t = rec["round"]
        steps = sum(schedule.local_steps(s, 3).sum() for s in range(1, t + 1))
        assert rec["examples_per_peer"] == pytest.approx(steps * 4 / N)
        assert np.isfinite(rec["train_loss"])
    assert records[-1]["examples_per_peer"] < 4 * 3 * 4


def test_same_seed_same_result_with_every_option_on(task, examples):
    topo = build_topology("ring", N, "laplacian")
    runs = []
    for _ in range(2):
        schedule = make_schedule(
            "er-each-round", N, seed=3, p=0.6, offline_prob=0.2, straggler_prob=0.5
        )
        plan = make_plan("adf", topo, _parts(examples), 4, schedule=schedule, period=1)
        comp = make_compressor(4, "stochastic", "block", 64)
        gossip = CompressedGossip(topo.mixing, comp, error_feedback=True, seed=0)
        snaps, records, _ = _snapshots(task, examples, plan, rounds=3, gossip=gossip)
        runs.append(
            (snaps[-1], [{k: v for k, v in r.items() if k not in TIMINGS} for r in records])
        )
    (a, ra), (b, rb) = runs
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert ra == rb


# ----------------------------------------------------------------- through the CLI


@pytest.fixture(scope="module")
def job(tmp_path_factory, tokenizer) -> Path:
    """A tiny model and a small CSV."""
    d = tmp_path_factory.mktemp("followups")
    write_tiny_job(d, tokenizer, seed=1)
    cfg = {
        "model": {"name": str(d / "model")},
        "data": {"name": "file", "path": str(d / "data.csv"), "min_size": 4},
        "topology": {"peers": N},
        "lora": {"r": 2},
        "train": {"rounds": 4, "local_steps": 2, "batch_size": 4, "checkpoint_every": 0},
        "eval": {"every": 2, "max_examples": 30, "final_max_examples": 30, "peers": "never"},
        "baselines": [],
    }
    (d / "job.yaml").write_text(yaml.safe_dump(cfg))
    return d


def _run(job: Path, out: Path, *sets: str):
    args = ["run", "--quiet", "--config", str(job / "job.yaml"), "--out", str(out)]
    for s in sets:
        args += ["--set", s]
    return runner.invoke(app, args)


def _records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "sets",
    [
        ("algorithm.name=decaf",),
        ("algorithm.name=ffa",),
        ("algorithm.name=adf", "algorithm.period=1"),
        ("topology.dynamic=er-each-round", "topology.p=0.5"),
        ("topology.dynamic=one-peer-exponential", "comm.bits=4"),
        ("topology.dynamic=random-pairs", "topology.pair_prob=0.5"),
        (
            "topology.offline_prob=0.3",
            "train.straggler_prob=0.5",
            "topology.mixing=metropolis",
            "baselines=[fedavg, local-only, centralized]",
        ),
    ],
    ids=["decaf", "ffa", "adf", "er-each-round", "one-peer-exp-4bit", "random-pairs", "offline"],
)
def test_each_option_runs_from_the_cli(job, tmp_path, sets):
    out = tmp_path / "run"
    res = _run(job, out, *sets)
    assert res.exit_code == 0, res.output
    recs = _records(out)
    assert [r["round"] for r in recs] == [2, 4]
    assert all(np.isfinite(r["accuracy"]) for r in recs) and recs[-1]["bytes_sent"] > 0
    assert (out / "adapters" / "average" / "adapter_model.safetensors").is_file()
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    for s in sets:
        key, _, value = s.partition("=")
        section, name = key.split(".") if "." in key else ("", key)
        if section:
            assert str(cfg[section][name]) == str(yaml.safe_load(value))
    if "topology.offline_prob=0.3" in sets:
        assert recs[-1]["examples_per_peer"] < 4 * 2 * 4  # someone missed steps
        for name in ("fedavg", "local-only", "centralized"):
            assert _records(out / "baselines" / name)[-1]["round"] == 4
        assert "offline in a round with probability 0.3" in (out / "report.md").read_text()


def test_ffa_halves_the_bytes_from_the_cli(job, tmp_path):
    sent = {}
    for name in ("dec-lora", "ffa"):
        out = tmp_path / name
        res = _run(job, out, f"algorithm.name={name}", "lora.mix_head=false", "train.rounds=2")
        assert res.exit_code == 0, res.output
        sent[name] = _records(out)[-1]["bytes_sent"]
    assert sent["ffa"] * 2 == sent["dec-lora"]  # A and B have the same size (32 x 2)


@pytest.mark.parametrize(
    ("sets", "expect"),
    [
        (("algorithm.name=decaff",), "algorithm.name"),
        (("algorithm.period=0",), "algorithm.period"),
        (("algorithm.adf_start=C",), "algorithm.adf_start"),
        (("topology.dynamic=ring",), "topology.dynamic"),
        (("topology.offline_prob=1",), "topology.offline_prob"),
        (("topology.pair_prob=0",), "topology.pair_prob"),
        (("train.straggler_prob=1.5",), "train.straggler_prob"),
        (("baselines=[decaff]",), "baselines.0"),
        (("algorithm.name=decaf", "comm.bits=4"), "algorithm decaf sends exact factors"),
        (
            ("topology.dynamic=random-pairs", "comm.bits=4", "comm.scheme=choco"),
            "comm.scheme=choco needs a fixed graph",
        ),
        (
            ("topology.dynamic=er-each-round", "topology.mixing=uniform"),
            "topology.mixing 'uniform' cannot be used",
        ),
        (
            ("topology.offline_prob=0.2", "topology.mixing=uniform"),
            "topology.mixing 'uniform' needs a regular graph",
        ),
    ],
)
def test_bad_settings_give_one_clear_line(job, tmp_path, sets, expect):
    out = tmp_path / "bad"
    res = _run(job, out, *sets)
    assert res.exit_code == 2, res.output
    message = res.stderr[res.stderr.index("error:") :]
    problems = [line for line in message.splitlines() if line.strip()]
    if problems[0] == "error: invalid config:":
        problems = problems[1:]
    assert len(problems) == 1 and expect in problems[0], message
    assert "Traceback" not in res.output
    assert not out.exists()


# ----------------------------------------------------------------- resume


def test_a_killed_dynamic_run_resumes_bit_identically(job, tmp_path):
    """ADF phases, random pairs, offline peers, stragglers and 4-bit gossip with error
    feedback: everything a round does must come back after a crash."""
    sets = [
        "algorithm.name=adf",
        "algorithm.period=1",
        "topology.dynamic=random-pairs",
        "topology.offline_prob=0.25",
        "train.straggler_prob=0.5",
        "comm.bits=4",
        "comm.error_feedback=true",
        "train.rounds=6",
        "train.checkpoint_every=2",
        "baselines=[fedavg]",
        "train.threads=1",
    ]
    args = ["run", "--quiet", "--config", str(job / "job.yaml")]
    for s in sets:
        args += ["--set", s]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    res = run_in_process(*args, "--out", str(whole))  # train.threads=1 in all three
    assert res.returncode == 0, res.stderr
    res = run_cli(*args, "--out", str(killed), env={"DECLORA_KILL_AT": "3"})
    assert res.returncode == -9
    assert ckpt.rounds(killed / "checkpoints") == [2]
    res = run_in_process("run", "--quiet", "--resume", str(killed))
    assert res.returncode == 0, res.stderr
    a, b = run_adapters(whole), run_adapters(killed)
    assert a.keys() == b.keys() and len(a) > 0
    assert all(torch.equal(a[k], b[k]) for k in a)

    def metrics(run: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if k not in TIMINGS} for r in _records(run)]

    assert metrics(killed) == metrics(whole)
