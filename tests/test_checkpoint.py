"""Checkpoints: exact round trips, atomic and checked files, and resume == never stopped."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from declora.cli import app
from declora.data.sampling import PeerSampler
from declora.engine import checkpoint as ckpt
from tests.conftest import run_adapters, run_cli, run_in_process, run_metrics, write_tiny_job

runner = CliRunner()


def test_nested_state_round_trips_with_integer_keys_and_none():
    p = torch.nn.Parameter(torch.randn(3, 4))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.randn(3, 4)
    opt.step()
    state = {"opt": opt.state_dict(), "x": [1, 2.5, None, "s"], "t": torch.arange(5)}
    tensors: dict[str, torch.Tensor] = {}
    body = ckpt.flatten(state, "s", tensors)
    json.dumps(body)  # JSON-able without the tensors
    back = ckpt.unflatten(json.loads(json.dumps(body)), tensors)
    assert set(back["opt"]["state"]) == {0}  # integer keys survive JSON
    assert torch.equal(back["opt"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert back["x"] == [1, 2.5, None, "s"]
    assert torch.equal(back["t"], torch.arange(5))
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = torch.optim.AdamW([q], lr=0.1)
    opt2.load_state_dict(back["opt"])
    g = torch.randn(3, 4)
    for param, o in ((p, opt), (q, opt2)):
        param.grad = g.clone()
        o.step()
    assert torch.equal(p, q)


def test_sampler_state_continues_the_same_order(tmp_path):
    a = PeerSampler(np.arange(10), 4, seed=3, peer=1)
    for _ in range(3):
        a.next()
    ckpt.save(tmp_path, 1, {"sampler": a.state_dict()}, fingerprint="f", keep=1)
    b = PeerSampler(np.arange(10), 4, seed=3, peer=1)
    b.load_state_dict(ckpt.latest(tmp_path).state["sampler"])
    for _ in range(5):
        assert np.array_equal(a.next(), b.next())


def _saved(tmp_path: Path) -> Path:
    return ckpt.save(
        tmp_path / "ck", 4, {"w": torch.randn(50), "round": 4}, fingerprint="abc", keep=2
    )


def test_save_is_atomic_and_keeps_the_newest(tmp_path):
    root = tmp_path / "ck"
    for r in (2, 4, 6):
        ckpt.save(root, r, {"w": torch.full((3,), float(r))}, fingerprint="f", keep=2)
    assert ckpt.rounds(root) == [4, 6]
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temporary left
    (root / "round-000008").mkdir()  # a folder that never got its files is not "complete"...
    with pytest.raises(ckpt.CheckpointError, match="incomplete"):
        ckpt.latest(root)
    latest = ckpt.load(ckpt.round_dir(root, 6), fingerprint="f")
    assert latest.round == 6 and torch.equal(latest.state["w"], torch.full((3,), 6.0))


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncate", "state.safetensors has .* bytes but was written with .* \\(truncated"),
        ("flip", "state.safetensors does not match its recorded SHA-256"),
        ("meta", "meta.json has .* bytes but was written with"),
        ("missing", "incomplete: state.safetensors is missing"),
    ],
)
def test_a_damaged_checkpoint_is_refused_with_a_clear_error(tmp_path, damage, message):
    path = _saved(tmp_path)
    state = path / ckpt.STATE_FILE
    if damage == "truncate":
        state.write_bytes(state.read_bytes()[:-7])
    elif damage == "flip":
        raw = bytearray(state.read_bytes())
        raw[-3] ^= 0xFF
        state.write_bytes(bytes(raw))
    elif damage == "meta":
        (path / ckpt.META_FILE).write_text("{not json")
    else:
        state.unlink()
    with pytest.raises(ckpt.CheckpointError, match=message):
        ckpt.load(path)


def test_a_checkpoint_of_another_configuration_is_refused(tmp_path):
    path = _saved(tmp_path)
    with pytest.raises(ckpt.CheckpointError, match="another configuration"):
        ckpt.load(path, fingerprint="xyz")


# ----------------------------------------------------------------- resume through the CLI


@pytest.fixture(scope="module")
def job(tmp_path_factory, tokenizer):
    """A tiny model, a small CSV and a config with checkpoints every 2 rounds."""
    d = tmp_path_factory.mktemp("ckjob")
    write_tiny_job(d, tokenizer, seed=1)
    cfg = {
        "model": {"name": str(d / "model")},
        "data": {"name": "file", "path": str(d / "data.csv")},
        "topology": {"peers": 4},
        # one thread: whole runs in this process and killed runs in a fresh one agree bit for bit
        "train": {
            "rounds": 6,
            "local_steps": 2,
            "batch_size": 4,
            "checkpoint_every": 2,
            "threads": 1,
        },
        "eval": {"every": 2, "max_examples": 30, "final_max_examples": 30},
        "baselines": ["centralized"],
        "comm": {"bits": 4, "error_feedback": True},  # stochastic rounding state must resume
    }
    (d / "job.yaml").write_text(yaml.safe_dump(cfg))
    return d


@pytest.fixture(scope="module")
def uninterrupted(job, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "whole"
    res = run_in_process("run", "--quiet", "--config", str(job / "job.yaml"), "--out", str(out))
    assert res.returncode == 0, res.stderr
    return out


def test_a_killed_run_resumes_to_exactly_the_same_adapters(job, uninterrupted, tmp_path):
    out = tmp_path / "killed"
    res = run_cli(
        "run",
        "--quiet",
        "--config",
        str(job / "job.yaml"),
        "--out",
        str(out),
        env={"DECLORA_KILL_AT": "3"},
    )
    assert res.returncode == -9  # SIGKILL: a real crash after round 3's local steps
    assert json.loads((out / "run.json").read_text())["status"] == "running"
    assert ckpt.rounds(out / "checkpoints") == [2]
    # it cannot say it stopped, but a report sees that no process holds it any more
    res = runner.invoke(app, ["report", str(out)])
    assert res.exit_code == 2 and 'says "running" but no process holds the run' in res.output
    assert f"declora run --resume {out}" in res.output
    res = run_in_process("run", "--quiet", "--resume", str(out))
    assert res.returncode == 0, res.stderr
    a, b = run_adapters(uninterrupted), run_adapters(out)
    assert a.keys() == b.keys() and len(a) > 0
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical, baseline included
    assert run_metrics(out) == run_metrics(uninterrupted)
    status = json.loads((out / "run.json").read_text())
    assert status["status"] == "complete" and status["resumed"] == 1


def test_a_stopped_run_records_the_stop_frees_its_folder_and_resumes(job, uninterrupted, tmp_path):
    """SIGTERM (kill, a scheduler's preemption) after round 3: run.json says why the run
    stopped instead of "running", the lock is released, the exit code is the shell's for that
    signal, and --resume ends where an unstopped run ends."""
    import signal

    from declora.reporting.rundir import busy

    sig, out = "TERM", tmp_path / "stopped"
    env = {"DECLORA_KILL_AT": "3", "DECLORA_KILL_SIGNAL": sig}
    res = run_cli("run", "--quiet", "--config", str(job / "job.yaml"), "--out", str(out), env=env)
    assert res.returncode == 128 + signal.Signals[f"SIG{sig}"]
    assert f"stopped by SIG{sig}; continue it with: declora run --resume {out}" in res.stderr
    assert "Traceback" not in res.stderr
    status = json.loads((out / "run.json").read_text())
    assert status["status"] == "failed" and status["error"] == f"Stopped: stopped by SIG{sig}"
    assert busy(out) is None and ckpt.rounds(out / "checkpoints") == [2]
    res = runner.invoke(app, ["report", str(out)])
    assert res.exit_code == 2 and f"(Stopped: stopped by SIG{sig})" in res.output
    res = run_in_process("run", "--quiet", "--resume", str(out))
    assert res.returncode == 0, res.stderr
    a, b = run_adapters(uninterrupted), run_adapters(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    status = json.loads((out / "run.json").read_text())
    assert status["status"] == "complete" and "error" not in status
    assert status["previous_error"] == f"Stopped: stopped by SIG{sig}"


def test_a_stop_signal_is_an_exception_inside_the_block_and_an_ignored_one_stays_ignored():
    """SIGHUP (a closed terminal) as the run sees it; under `nohup` it is ignored and stays so."""
    import os
    import signal
    import time

    from declora.runners.signals import Stopped, stop_on_signals

    inherited = signal.signal(signal.SIGHUP, signal.SIG_DFL)  # the suite may run under nohup
    try:
        with pytest.raises(Stopped) as stop, stop_on_signals():
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(5)  # the handler raises at the next bytecode, long before this ends
        assert str(stop.value) == "stopped by SIGHUP" and stop.value.exit_code == 129
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL  # restored after the block
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        with stop_on_signals():
            os.kill(os.getpid(), signal.SIGHUP)  # ignored, as nohup asked: nothing happens
            time.sleep(0.05)
    finally:
        signal.signal(signal.SIGHUP, inherited)


def test_cpu_time_continues_across_a_resume_and_is_left_out_after_an_older_checkpoint(
    job, tmp_path
):
    """`cpu_seconds` (the process's CPU time in the loop, which pauses and other processes do
    not inflate) goes on from the checkpoint's count; a checkpoint written before it was
    counted gives no `cpu_seconds` after the resume rather than a count that starts again."""
    import shutil

    killed = tmp_path / "killed"
    res = run_cli("run", "--quiet", "--config", str(job / "job.yaml"), "--out", str(killed),
                  env={"DECLORA_KILL_AT": "3"})  # fmt: skip
    assert res.returncode == -9
    for legacy in (False, True):
        out = tmp_path / f"legacy-{legacy}"
        shutil.copytree(killed, out)
        path = ckpt.round_dir(out / "checkpoints", 2)
        fp = json.loads((path / ckpt.META_FILE).read_text())["fingerprint"]
        state = ckpt.load(path, fingerprint=fp).state
        assert 0 < state["cpu_elapsed"] < 1000
        if legacy:
            del state["cpu_elapsed"]
        else:
            state["cpu_elapsed"] = 1000.0
        shutil.rmtree(path)
        ckpt.save(out / "checkpoints", 2, state, fingerprint=fp, keep=1)
        res = run_in_process("run", "--quiet", "--resume", str(out))
        assert res.returncode == 0, res.stderr
        recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in recs] == [2, 4, 6]
        assert 0 < recs[0]["cpu_seconds"] < 1000  # from the first attempt, as it was
        later = [r.get("cpu_seconds") for r in recs[1:]]
        if legacy:
            assert later == [None, None]
        else:
            assert 1000 < later[0] < later[1] < 1000 + recs[-1]["wall_seconds"]


def test_resume_refuses_bad_requests(job, uninterrupted, tmp_path):
    res = runner.invoke(app, ["run", "--resume", str(uninterrupted)])
    assert res.exit_code == 2 and "already complete" in res.output
    res = runner.invoke(app, ["run", "--resume", str(tmp_path)])
    assert res.exit_code == 2 and "no config.yaml" in res.output
    res = runner.invoke(app, ["run", "--resume", str(uninterrupted), "--set", "train.rounds=9"])
    assert res.exit_code == 2 and "drop --config and --set" in res.output


def test_resume_from_a_damaged_checkpoint_says_which_and_why(job, tmp_path):
    out = tmp_path / "damaged"
    res = run_cli(
        "run",
        "--quiet",
        "--config",
        str(job / "job.yaml"),
        "--out",
        str(out),
        env={"DECLORA_KILL_AT": "5"},
    )
    assert res.returncode == -9
    state = out / "checkpoints" / "round-000004" / ckpt.STATE_FILE
    state.write_bytes(state.read_bytes()[:100])
    res = runner.invoke(app, ["run", "--quiet", "--resume", str(out)])
    assert res.exit_code == 2
    assert "round-000004" in res.output and "truncated" in res.output
    assert "Traceback" not in res.output


def test_checkpoints_of_older_versions_resume_and_other_configs_do_not(tmp_path):
    """The fingerprint covers the keys set to other than their defaults, so a key added later
    with a default that changes nothing keeps a run resumable; checkpoints written before the
    change (the whole config, before comm.mix_momentum and comm.final_gossip existed) are still
    accepted; a real difference in the config is refused by both."""
    from declora.config.schema import load_config
    from declora.engine.checkpoint import fingerprint_of
    from declora.runners.build import checkpointing

    cfg = load_config(None, ["train.lr=0.1"])
    mine = checkpointing(cfg, tmp_path, resume=True, extra="dec-lora")
    whole = cfg.model_dump(mode="json")
    whole["train"].pop("threads")
    assert mine.fingerprint == fingerprint_of([{"train": {"lr": 0.1}}, "dec-lora"])
    for key in ("mix_momentum", "final_gossip"):  # what a checkpoint of 2026-12-01 carries
        del whole["comm"][key]
    legacy = fingerprint_of([whole, "dec-lora"])
    assert mine.also_accepted == (legacy,)
    ckpt.save(tmp_path, 2, {"round": 2}, fingerprint=legacy, keep=1)
    assert mine.saved() is not None and mine.saved().round == 2
    other = checkpointing(load_config(None, ["train.lr=0.2"]), tmp_path, resume=True,
                          extra="dec-lora")  # fmt: skip
    with pytest.raises(ckpt.CheckpointError, match="another configuration"):
        other.saved()
    threads = checkpointing(load_config(None, ["train.lr=0.1", "train.threads=2"]), tmp_path,
                            resume=True, extra="dec-lora")  # fmt: skip
    assert threads.fingerprint == mine.fingerprint  # the thread count may change on resume
