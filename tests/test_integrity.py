"""A run never lies about itself (issue 19): NaN detection, locked run folders, whole
checkpoints, honest resumes, one clean error line for every user mistake, meaningless runs
refused, reports that never overwrite runs, and a network surface bound to loopback.

Each test names the numbered item of the issue it covers.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from declora.cli import app
from declora.config.schema import RunConfig, load_config
from declora.data.classification import load_classification_data
from declora.engine import checkpoint as ckpt
from declora.errors import ConfigError, DataError, TopologyError
from declora.network.compress import make_compressor
from declora.network.compressed import CompressedGossip
from declora.network.health import (
    Diverged,
    MessageGuard,
    NonFiniteMessage,
    check_losses,
    check_peers,
    nonfinite_rows,
)
from declora.network.simulated import SimulatedGossip
from declora.network.topology import build_topology
from declora.reporting.rundir import RunDir, RunDirBusy, record_lost_run
from declora.runners import launch
from declora.runners.sweep import Cell, run_cell
from tests.conftest import run_adapters, run_cli, write_tiny_job
from tests.integrity_workers import (
    gone_neighbour,
    nan_neighbour,
    nan_values,
    oversized_announcement,
)

runner = CliRunner()


def _strict(text: str) -> list[dict]:
    """JSON lines as a strict reader (jq, JavaScript) sees them: no NaN or Infinity tokens."""

    def refuse(token: str) -> None:
        raise ValueError(f"bare {token} in JSON")

    return [json.loads(line, parse_constant=refuse) for line in text.splitlines() if line]


# ----------------------------------------------------------------- a tiny job and one run


@pytest.fixture(scope="module")
def job(tmp_path_factory, tokenizer) -> Path:
    d = tmp_path_factory.mktemp("integrity-job")
    write_tiny_job(d, tokenizer, rows=120, seed=3)
    cfg = {
        "model": {"name": str(d / "model")},
        "data": {"name": "file", "path": str(d / "data.csv"), "min_size": 4},
        "topology": {"peers": 3},
        "lora": {"r": 2},
        "train": {"rounds": 4, "batch_size": 4, "checkpoint_every": 2},
        "eval": {"every": 1, "max_examples": 20, "final_max_examples": 20},
        "baselines": [],
    }
    (d / "job.yaml").write_text(yaml.safe_dump(cfg))
    return d


def _run(job: Path, out: Path, *sets: str, extra: tuple[str, ...] = ()) -> typing.Any:
    args = ["run", "--quiet", "--config", str(job / "job.yaml"), "--out", str(out), *extra]
    for s in sets:
        args += ["--set", s]
    return runner.invoke(app, args)


@pytest.fixture(scope="module")
def done(job, tmp_path_factory) -> Path:
    """One complete run (read-only for the tests: copy it before changing anything)."""
    out = tmp_path_factory.mktemp("integrity-runs") / "done"
    res = _run(job, out)
    assert res.exit_code == 0, res.output
    return out


def _copy(run: Path, tmp_path: Path, name: str = "copy") -> Path:
    target = tmp_path / name
    shutil.copytree(run, target, ignore=shutil.ignore_patterns(".lock"))
    return target


def _error_line(res: typing.Any) -> str:
    """The one `error:` message of a refused command (a config error lists its keys on the
    indented lines that follow), after checking exit code 2 and no traceback."""
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    lines = [x for x in res.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, res.stderr
    return res.stderr[res.stderr.index("error:") :]


# ----------------------------------------------------------------- 1. no NaN run is complete


def _float_keys(model: type, prefix: str = "") -> list[str]:
    """Every float key of the config schema, dotted (sections recursed)."""
    out = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and hasattr(ann, "model_fields"):
            out += _float_keys(ann, f"{prefix}{name}.")
        elif float in typing.get_args(ann) or ann is float:
            out.append(f"{prefix}{name}")
    return out


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_every_float_key_refuses_non_finite_numbers(value):
    keys = _float_keys(RunConfig)
    assert {"train.lr", "train.max_grad_norm", "comm.timeout_s", "lora.alpha"} <= set(keys)
    for key in keys:
        with pytest.raises(ConfigError, match=f"{key}: Input should be a finite number"):
            load_config(None, [f"{key}={value}"])
    with pytest.raises(ConfigError, match=r"data\.proportions\.0\.1: .*finite"):
        load_config(None, ["data.proportions=[[1, .nan]]"])


def test_an_infinite_learning_rate_is_one_error_line(job, tmp_path):
    res = _run(job, tmp_path / "out", "train.lr=.inf")
    assert "train.lr: Input should be a finite number" in _error_line(res)
    assert not (tmp_path / "out").exists()


def test_a_diverging_run_fails_naming_the_round_and_the_peer(job, tmp_path):
    out = tmp_path / "nan"
    res = _run(job, out, "train.lr=1e6", "train.max_grad_norm=null", "train.schedule=constant")
    line = _error_line(res)
    m = re.search(r"round (\d+): peer (\d+) diverged", line)
    assert m and "train.lr" in line, line
    status = json.loads((out / "run.json").read_text())
    assert status["status"] == "failed" and m.group(0) in status["error"]
    assert not (out / "adapters").exists()  # no NaN adapter passed off as a result
    rounds = _rounds(out)  # strict JSON, and nothing recorded from the diverged round on
    assert rounds == list(range(1, int(m.group(1))))
    for r in ckpt.rounds(out / "checkpoints"):  # no NaN checkpoint either
        state = ckpt.load(ckpt.round_dir(out / "checkpoints", r)).state
        assert all(bool(torch.isfinite(v).all()) for v in _float_tensors(state))


def _float_tensors(obj: typing.Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj] if obj.is_floating_point() else []
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list) else []
    return [t for x in items for t in _float_tensors(x)]


def test_losses_and_parameters_are_checked_per_peer():
    check_losses(3, torch.tensor([0.5, float("nan"), 0.7]), [0, 1, 2], np.array([1, 0, 1]))
    with pytest.raises(Diverged, match=r"round 3: peer 7 diverged: its training loss is inf"):
        check_losses(3, torch.tensor([0.5, float("inf")]), [6, 7])
    values = {"m.lora_A": torch.zeros(3, 2, 4), "m.lora_B": torch.zeros(3, 4, 2)}
    check_peers(5, values, [0, 1, 2], "after its local steps")
    values["m.lora_B"][2, 1, 0] = float("nan")
    values["m.lora_A"][1, 0, 0] = float("-inf")
    assert nonfinite_rows(values) == {1: ["m.lora_A"], 2: ["m.lora_B"]}
    with pytest.raises(Diverged, match=r"round 5: peer 1 diverged: .* \(in m.lora_A\) "):
        check_peers(5, values, [0, 1, 2], "after its local steps")


def test_metrics_files_hold_strict_json(tmp_path):
    rd = RunDir.create(tmp_path / "r")
    rd.append_metrics({"round": 1, "train_loss": float("nan"), "perplexity": float("inf")})
    rd.write_json("summary.json", {"rows": [{"accuracy": float("nan")}]})
    rd.set_status("complete")
    assert _strict((tmp_path / "r" / "metrics.jsonl").read_text()) == [
        {"round": 1, "train_loss": None, "perplexity": None}
    ]
    assert _strict((tmp_path / "r" / "summary.json").read_text().replace("\n", " "))


def test_a_guard_refuses_non_finite_messages_as_a_real_peer_does():
    W = np.full((3, 3), 1 / 3)
    with pytest.raises(NonFiniteMessage, match="peer 0: neighbour 2 sent non-finite values"):
        MessageGuard("error").mixing(W, {2: ["w"]})
    guard = MessageGuard("skip")
    # the receivers drop peer 2 and renormalise 1/3, 1/3 to 1/2, 1/2 (as PeerGossip does)
    first = guard.mixing(W, {2: ["w"]})
    np.testing.assert_allclose(first[:2], [[0.5, 0.5, 0], [0.5, 0.5, 0]])
    np.testing.assert_allclose(first[2], W[2])
    # they no longer send to it, so next exchange it drops them in turn (their silence)
    second = guard.mixing(W, {})
    np.testing.assert_allclose(second[2], [0, 0, 1])
    ring = build_topology("ring", 5, "laplacian").mixing
    assert MessageGuard("skip").mixing(ring, {}) is ring  # nothing refused: W itself


def test_one_peers_nan_no_longer_reaches_every_peer_in_simulation():
    W = build_topology("ring", 5, "laplacian").mixing
    x = {"w": torch.arange(20.0).reshape(5, 4)}
    x["w"][2, 0] = float("nan")
    with pytest.raises(NonFiniteMessage, match="peer 1: neighbour 2 sent non-finite values"):
        SimulatedGossip(W).mix(x)  # on_failure=error, the default: what a real peer raises
    mixed = SimulatedGossip(W, on_failure="skip").mix(x)["w"]
    assert bool(torch.isfinite(mixed[[0, 1, 3, 4]]).all())  # before: NaN on every peer
    w1 = W[1].copy()
    w1[2] = 0
    expect = torch.tensor(w1 / w1.sum(), dtype=torch.float32) @ torch.nan_to_num(x["w"])
    torch.testing.assert_close(mixed[1], expect)


def test_the_simulation_refuses_what_real_peers_refuse_identically(tmp_path):
    mp.spawn(nan_neighbour, args=(3, str(tmp_path / "store"), str(tmp_path)), nprocs=3)
    sim = SimulatedGossip(np.full((3, 3), 1 / 3), on_failure="skip")
    first = sim.mix({"w": nan_values(3)})
    second = sim.mix(first)
    for rank in range(3):
        real = load_file(str(tmp_path / f"peer-{rank}.safetensors"))
        torch.testing.assert_close(real["first"], first["w"][rank], equal_nan=True)
        torch.testing.assert_close(real["second"], second["w"][rank], equal_nan=True)
    assert bool(torch.isfinite(second["w"][:2]).all())


def test_a_neighbour_whose_process_ended_is_skipped_by_name(tmp_path):
    """Posting a send to a neighbour whose connection has closed fails that neighbour alone
    (gloo raises at once, before any wait): with comm.on_peer_failure=skip the others go on
    and average without it."""
    mp.spawn(gone_neighbour, args=(3, str(tmp_path / "store"), str(tmp_path)), nprocs=3)
    for rank in (0, 1):
        got = load_file(str(tmp_path / f"peer-{rank}.safetensors"))
        assert json.loads((tmp_path / f"peer-{rank}.json").read_text())["failed"] == [2]
        x = torch.arange(12, dtype=torch.float32).reshape(3, 4)
        first = x.mean(0)  # all three peers, once
        torch.testing.assert_close(got["first"], first)
        torch.testing.assert_close(got["second"], first)  # peers 0 and 1 hold it already


def test_a_compressed_message_that_overflows_is_refused_by_name():
    W = build_topology("ring", 4, "laplacian").mixing
    x = {"w": torch.zeros(4, 8)}
    x["w"][3] = 1e6  # finite, but not in fp16
    gossip = CompressedGossip(W, make_compressor(16, half="fp16"))
    with pytest.raises(NonFiniteMessage, match=r"neighbour 3 sent non-finite .* comm.half=bf16"):
        gossip.mix(x)


def test_a_distributed_run_in_skip_mode_does_not_complete_with_nan(job, tmp_path):
    out = tmp_path / "dist"
    args = ["launch", "--peers", "2", "--", "--quiet", "--config", str(job / "job.yaml")]
    args += ["--out", str(out)]
    for s in (
        "topology.peers=2",
        "train.lr=1e6",
        "train.max_grad_norm=null",
        "train.schedule=constant",
        "comm.on_peer_failure=skip",
        "comm.timeout_s=5",
    ):
        args += ["--set", s]  # fmt: skip
    res = run_cli(*args, env={"OMP_NUM_THREADS": "1"})
    assert res.returncode != 0
    status = json.loads((out / "run.json").read_text())
    assert status["status"] == "failed"
    assert re.search(r"round \d+: peer \d+ diverged", status["error"]), status
    assert not list(out.glob("adapters/*/adapter_model.safetensors"))


# ----------------------------------------------------------------- 2. one writer per folder


@contextmanager
def _holder(path: Path, config: Path | None = None) -> Iterator[subprocess.Popen]:
    """Another live process that holds `path` as its run directory."""
    code = (
        "import shutil, sys, time\n"
        "from declora.reporting.rundir import RunDir\n"
        "RunDir.create(sys.argv[1], overwrite=True)\n"
        "if len(sys.argv) > 2: shutil.copy(sys.argv[2], sys.argv[1] + '/config.yaml')\n"
        "print('ready', flush=True)\n"
        "time.sleep(120)\n"
    )
    args = [sys.executable, "-c", code, str(path)] + ([str(config)] if config else [])
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_a_run_folder_has_one_writer_and_the_lock_dies_with_it(job, tmp_path):
    out = tmp_path / "busy"
    with _holder(out, job / "job.yaml") as proc:
        before = (out / "run.json").read_text()
        for args in ([], ["--overwrite"]):
            res = _run(job, out, extra=tuple(args))
            assert f"in use by process {proc.pid}" in _error_line(res)
        start = time.perf_counter()
        res = runner.invoke(app, ["run", "--quiet", "--resume", str(out)])
        assert f"in use by process {proc.pid}" in _error_line(res)
        assert time.perf_counter() - start < 5  # refused before loading data and model
        with pytest.raises(RunDirBusy, match="declora"):  # the holder's command is named
            RunDir.reopen(out)
        assert (out / "run.json").read_text() == before  # nothing touched the live run
    rd = RunDir.reopen(out)  # the holder died: its lock went with it, never stale
    assert rd.status() == "running"
    rd.set_status("failed", error="test")
    RunDir.create(out, overwrite=True).set_status("complete")  # released when final


def test_a_second_launch_on_a_held_run_is_refused_without_a_resume_hint(job, tmp_path):
    """A launch whose peers refuse a folder that another process holds says so, and gives no
    "continue it with ... --resume" (that would point at the run already going on)."""
    cfg = yaml.safe_load((job / "job.yaml").read_text())
    cfg["topology"]["peers"] = 2
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "held"
    with _holder(out, tmp_path / "two.yaml") as proc:
        (out / "checkpoints" / "peer-0" / "round-2").mkdir(parents=True)  # a run under way
        (out / "peers" / "peer-0").mkdir(parents=True)
        res = run_cli("launch", "--peers", "2", "--", "--quiet", "--resume", str(out))
        assert res.returncode == 2, res.stderr[-3000:]
        # said once, by the launcher, before any peer started (each peer said it before)
        assert res.stderr.count(f"in use by process {proc.pid}") == 1, res.stderr[-3000:]
        assert "continue it" not in res.stderr, res.stderr[-3000:]


def test_a_sweep_leaves_a_cell_that_another_process_runs(tmp_path):
    cell = Cell((("lora.r", "2"),), 0)
    target = tmp_path / "cells" / cell.name
    with _holder(target) as proc:
        _, code, tail = run_cell(cell, None, [], tmp_path, 1)
        assert code != 0 and tail.startswith("skipped:") and f"process {proc.pid}" in tail
        assert json.loads((target / "run.json").read_text())["status"] == "running"


# ----------------------------------------------------------------- 3. whole checkpoints


def _state() -> dict:
    return {"round": 4, "w": torch.arange(6.0), "records": [{"round": 4, "accuracy": 0.5}]}


def _edit_meta(path: Path, change: typing.Callable[[dict], None]) -> None:
    meta = json.loads((path / ckpt.META_FILE).read_text())
    change(meta)
    (path / ckpt.META_FILE).write_text(json.dumps(meta))


DAMAGE = {
    "a recorded metric": (
        lambda p: _edit_meta(p, lambda m: m["state"]["records"][0].update(accuracy=0.9)),
        "meta.json does not match its recorded SHA-256",
    ),
    "the round": (lambda p: _edit_meta(p, lambda m: m.update(round=5)), "meta.json"),
    "an emptied state": (lambda p: _edit_meta(p, lambda m: m.update(state={})), "meta.json"),
    "a lost manifest": (
        lambda p: (p / ckpt.MANIFEST_FILE).unlink(),
        "incomplete: manifest.json is missing",
    ),
    "a damaged manifest": (
        lambda p: (p / ckpt.MANIFEST_FILE).write_text("[1, 2]"),
        "unknown format",
    ),
    "a foreign file": (lambda p: (p / "notes.txt").write_text("x"), "holds 'notes.txt'"),
}


@pytest.mark.parametrize("what", list(DAMAGE))
def test_every_file_of_a_checkpoint_is_covered(tmp_path, what):
    path = ckpt.save(tmp_path / "ck", 4, _state(), fingerprint="f", keep=1)
    assert ckpt.load(path).state["records"][0]["accuracy"] == 0.5
    damage, message = DAMAGE[what]
    damage(path)
    with pytest.raises(ckpt.CheckpointError, match=message):
        ckpt.load(path, fingerprint="f")


def test_a_consistent_but_misnumbered_checkpoint_is_refused(tmp_path):
    path = ckpt.save(tmp_path / "ck", 4, _state(), fingerprint="f", keep=1)
    path.rename(tmp_path / "ck" / "round-000006")
    with pytest.raises(ckpt.CheckpointError, match="holds round 4, not 000006"):
        ckpt.latest(tmp_path / "ck")


def test_a_whole_checkpoint_of_another_layout_is_refused_before_use(done, tmp_path):
    run = _copy(done, tmp_path)
    root = run / "checkpoints"
    last = ckpt.rounds(root)[-1]
    meta = json.loads((ckpt.round_dir(root, last) / ckpt.META_FILE).read_text())
    shutil.rmtree(ckpt.round_dir(root, last))
    ckpt.save(root, last, {"round": last}, fingerprint=meta["fingerprint"], keep=1)
    (run / "run.json").write_text(json.dumps({"status": "failed"}))
    res = runner.invoke(app, ["run", "--quiet", "--resume", str(run)])
    line = _error_line(res)  # not a raw KeyError
    assert "not what this run can continue from (KeyError" in line and "delete" in line


def test_an_old_format_checkpoint_is_refused_by_name(tmp_path):
    path = ckpt.save(tmp_path / "ck", 2, _state(), fingerprint="f", keep=1)
    (path / ckpt.MANIFEST_FILE).unlink()
    _edit_meta(path, lambda m: m.update(format=1))
    with pytest.raises(ckpt.CheckpointError, match=r"format 1 .* start the run again"):
        ckpt.load(path)


# ----------------------------------------------------------------- 4. honest resumes


def _rounds(run: Path) -> list[int]:
    return [r["round"] for r in _strict((run / "metrics.jsonl").read_text())]


def _killed(job: Path, out: Path, at: int) -> None:
    res = run_cli(
        "run", "--quiet", "--config", str(job / "job.yaml"), "--out", str(out),
        env={"DECLORA_KILL_AT": str(at), "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert res.returncode == -9, res.stderr


def test_resume_before_the_first_checkpoint_starts_cleanly(job, done, tmp_path):
    out = tmp_path / "early"
    _killed(job, out, 2)  # rounds 1 and 2 recorded, the first checkpoint is at round 2
    assert _rounds(out) == [1] and ckpt.rounds(out / "checkpoints") == []
    res = runner.invoke(app, ["run", "--quiet", "--resume", str(out)])
    assert res.exit_code == 0, res.output
    assert _rounds(out) == [1, 2, 3, 4]  # not 1, 1, 2, 3, 4
    a, b = run_adapters(done), run_adapters(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_damaged_checkpoint_advice_works(job, done, tmp_path):
    out = tmp_path / "damaged"
    _killed(job, out, 3)  # the only checkpoint (keep_checkpoints=1) is round 2's
    meta = out / "checkpoints" / "round-000002" / ckpt.META_FILE
    meta.write_text(meta.read_text().replace('"round": 2', '"round": 2 '))
    res = runner.invoke(app, ["run", "--quiet", "--resume", str(out)])
    line = _error_line(res)
    assert "round-000002" in line and "start this algorithm over from round 1" in line
    shutil.rmtree(out / "checkpoints" / "round-000002")  # what the message says to do
    res = runner.invoke(app, ["run", "--quiet", "--resume", str(out)])
    assert res.exit_code == 0, res.output
    assert _rounds(out) == [1, 2, 3, 4]
    a, b = run_adapters(done), run_adapters(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_of_a_run_without_checkpoints_is_refused(job, tmp_path):
    out = tmp_path / "nock"
    with _holder(out, job / "job.yaml"):
        pass
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    cfg["train"]["checkpoint_every"] = 0
    (out / "config.yaml").write_text(yaml.safe_dump(cfg))
    res = runner.invoke(app, ["run", "--quiet", "--resume", str(out)])
    assert "writes no checkpoints" in _error_line(res)


# ----------------------------------------------------------------- 5. one error line, exit 2


def test_a_config_that_is_not_utf8_is_one_error_line(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("name: caf\xe9\n".encode("latin-1"))
    res = runner.invoke(app, ["run", "--config", str(bad)])
    assert "is not UTF-8 text (byte 0xe9" in _error_line(res)
    res = runner.invoke(app, ["sweep", "--config", str(bad), "--grid", "lora.r=2,4"])
    assert "is not UTF-8 text" in _error_line(res)


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, 9):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    lines.append("baselines: [" + ", ".join(["*a8"] * 9) + "]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    assert bomb.stat().st_size < 1200
    start = time.perf_counter()
    res = runner.invoke(app, ["run", "--config", str(bomb)])
    assert "expands to more than 100,000 values" in _error_line(res)
    res = runner.invoke(app, ["run", "--set", "baselines=&a [*a]"])
    assert "refers to itself" in _error_line(res)
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize(
    ("sets", "expect"),
    [
        (["seed=-1"], "seed: Input should be greater than or equal to 0"),
        (["seed=100000000000000000000000"], "seed: Input should be less than or equal to"),
        (["data.split_seed=-2"], "data.split_seed"),
        (["topology.seed=5000000000"], "topology.seed"),
    ],
)
def test_seeds_outside_what_the_generators_take(job, tmp_path, sets, expect):
    assert expect in _error_line(_run(job, tmp_path / "out", *sets))


def test_an_output_folder_that_cannot_be_made(job, tmp_path):
    (tmp_path / "file").write_text("x")
    res = _run(job, tmp_path / "file" / "run")
    assert "is a file, not a directory" in _error_line(res)
    if os.geteuid() == 0:
        pytest.skip("running as root: file permissions do not stop it")
    locked = tmp_path / "ro"
    locked.mkdir(mode=0o555)
    res = _run(job, locked / "run")
    assert "no permission to write" in _error_line(res)


@pytest.mark.parametrize("record", ["{not json", "[1, 2]", "\xff\xfe"])
def test_a_damaged_run_record_is_one_error_line(done, tmp_path, record):
    run = _copy(done, tmp_path)
    (run / "run.json").write_bytes(record.encode("latin-1"))
    for args in (["report", str(run)], ["run", "--quiet", "--resume", str(run)]):
        line = _error_line(runner.invoke(app, args))
        assert "run.json" in line and ("not valid JSON" in line or "not an object" in line)


def test_a_run_folder_without_its_summary(done, tmp_path):
    run = _copy(done, tmp_path)
    (run / "summary.json").unlink()
    assert "has no summary.json" in _error_line(runner.invoke(app, ["report", str(run)]))
    (run / "summary.json").write_text('{"rows": 3}')
    assert "has no table rows" in _error_line(runner.invoke(app, ["report", str(run)]))


def test_a_report_tells_a_run_still_going_from_one_that_was_killed(done, tmp_path):
    """Both say "running" in run.json; the lock tells them apart: one a process still holds,
    and one whose process died without a word (SIGKILL, a lost machine)."""
    run = _copy(done, tmp_path)
    record = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**record, "status": "running"}))
    hold = (
        "import sys, time; from pathlib import Path; from declora.reporting.rundir import lock; "
        "lock(Path(sys.argv[1])); print('held', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(run)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        line = _error_line(runner.invoke(app, ["report", str(run)]))
        assert f"is not complete: it is still running, in process {holder.pid} on " in line
        assert not record_lost_run(run, "lost")  # a launcher leaves a held run alone
    finally:
        holder.kill()
        holder.wait()
    line = _error_line(runner.invoke(app, ["report", str(run)]))
    assert 'says "running" but no process holds the run' in line
    assert f"continue it with: declora run --resume {run}" in line
    before = (run / "run.json").read_text()
    assert record_lost_run(run, "peer 1 ended by SIGKILL")  # what `declora launch` does then
    assert json.loads((run / "run.json").read_text()) == {
        **json.loads(before),
        "status": "failed",
        "error": "peer 1 ended by SIGKILL",
    }
    assert not record_lost_run(run, "again")  # only ever a run that says "running"
    assert record_lost_run(run, "KeyboardInterrupt: interrupted (Ctrl-C)", over_failed=True)
    status = json.loads((run / "run.json").read_text())  # a launcher's stop is the cause
    assert status["error"] == "KeyboardInterrupt: interrupted (Ctrl-C)"
    assert status["peer_error"] == "peer 1 ended by SIGKILL"
    (run / "run.json").write_text(json.dumps({**status, "status": "complete"}))
    assert not record_lost_run(run, "late", over_failed=True)  # a finished run stays so
    (run / "run.json").write_text(
        json.dumps({**json.loads(before), "status": "failed", "error": "peer 1 ended by SIGKILL"})
    )
    line = _error_line(runner.invoke(app, ["report", str(run)]))
    assert "peer 1 ended by SIGKILL" in line
    for i in range(3):  # what a distributed run's peers write: it continues with a launch
        (run / "peers" / f"peer-{i}").mkdir(parents=True)
    line = _error_line(runner.invoke(app, ["report", str(run)]))
    assert f"continue it with: declora launch --peers 3 -- --resume {run}" in line
    launched = {"peers": 2, "nnodes": "2", "rdzv_endpoint": "198.18.0.1:29400"}
    failed = {**json.loads(before), "status": "failed", "error": "peer 1 ended by SIGKILL"}
    (run / "run.json").write_text(json.dumps({**failed, "launch": launched}))
    line = _error_line(runner.invoke(app, ["report", str(run)]))  # the launch, as recorded
    again = "--peers 2 --nnodes 2 --node-rank <its rank> --rdzv-endpoint 198.18.0.1:29400"
    assert f"by starting every machine again with: declora launch {again} -- --resume" in line
    shutil.rmtree(run / "peers")
    (run / "run.json").write_text(before)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["train"]["checkpoint_every"] = 0  # nothing to continue from: it says so
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    line = _error_line(runner.invoke(app, ["report", str(run)]))
    assert "wrote no checkpoints (train.checkpoint_every=0): run it again" in line


def test_report_out_must_be_a_folder_of_its_own(done, tmp_path):
    other = _copy(done, tmp_path, "other")
    (tmp_path / "file.txt").write_text("keep")
    res = runner.invoke(app, ["report", str(done), str(other), "--out", str(tmp_path / "file.txt")])
    assert "is a file" in _error_line(res)
    assert (tmp_path / "file.txt").read_text() == "keep"


def _peer_file(run: Path, i: int = 1) -> Path:
    return run / "adapters" / f"peer-{i}" / "adapter_model.safetensors"


def test_evaluate_refuses_a_corrupt_or_foreign_peer_adapter(done, tmp_path):
    run = _copy(done, tmp_path)
    good = _peer_file(run).read_bytes()
    _peer_file(run).write_bytes(good[:50])
    line = _error_line(runner.invoke(app, ["report", str(run), "--evaluate"]))
    assert "peer-1" in line and "not a readable safetensors file" in line
    tensors = load_file(str(_peer_file(done)))
    save_file({k: torch.cat([v, v]) for k, v in tensors.items()}, str(_peer_file(run)))
    line = _error_line(runner.invoke(app, ["report", str(run), "--evaluate"]))
    assert "has shape" in line and "another lora.r" in line
    assert not (run / "average_metrics.json").exists()


def test_topology_command_caps_peers_like_the_config():
    res = runner.invoke(app, ["topology", "--peers", "60000"])
    assert "at most 10,000" in _error_line(res)


# ----------------------------------------------------------------- 6. meaningless runs say so


def test_one_class_data_is_refused(tmp_path):
    f = tmp_path / "one.csv"
    f.write_text("text,label\n" + "".join(f"text number {i},pos\n" for i in range(40)))
    with pytest.raises(DataError, match=r"one class only \('pos'"):
        load_classification_data("file", path=str(f))


def test_missing_labels_are_dropped_alike_in_csv_and_jsonl(tmp_path, caplog):
    rows = [(f"text number {i}", ["a", "b"][i % 2]) for i in range(40)]
    rows += [("spelled nan", "NaN"), ("spelled none", "None"), ("empty", "")]
    csv = tmp_path / "d.csv"
    csv.write_text("text,label\n" + "".join(f"{t},{lab}\n" for t, lab in rows))
    jsonl = tmp_path / "d.jsonl"
    recs = [{"text": t, "label": lab} for t, lab in rows[:-3]]
    recs += [
        {"text": "spelled nan", "label": "NaN"},
        {"text": "spelled none", "label": None},
        {"text": "empty", "label": float("nan")},
    ]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in recs))
    with caplog.at_level(logging.WARNING, logger="declora.data"):
        a = load_classification_data("file", path=str(csv))
        b = load_classification_data("file", path=str(jsonl))
    assert a.label_names == b.label_names == ["a", "b"]
    assert sorted(a.train_text + a.test_text) == sorted(b.train_text + b.test_text)
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2 and all("dropped 3 of 43 rows" in w for w in warned)


def test_a_mixing_matrix_that_never_converges_is_refused(tmp_path):
    swap = tmp_path / "swap.json"
    swap.write_text("[[0, 1], [1, 0]]")
    with pytest.raises(TopologyError, match="spectral gap 0"):
        build_topology("edges", 2, matrix_file=str(swap))
    res = runner.invoke(
        app, ["topology", "--kind", "edges", "--peers", "2", "--matrix-file", str(swap)]
    )
    assert "never reaches the average" in _error_line(res)
    assert build_topology("ring", 4, "identity").spectral_gap == 0.0  # local-only stays


# ----------------------------------------------------------------- 7. reports never overwrite


def test_a_comparison_never_writes_into_a_run(done, tmp_path):
    other = _copy(done, tmp_path, "other")
    before = {p: p.read_bytes() for p in other.rglob("*") if p.is_file()}
    for target in (other, other / "adapters", other / "plots"):
        res = runner.invoke(app, ["report", str(done), str(other), "--out", str(target)])
        assert "choose a folder of its own" in _error_line(res)
    assert {p: p.read_bytes() for p in other.rglob("*") if p.is_file()} == before
    assert not (other / "plots").exists()


def test_a_comparison_names_what_differs_and_refuses_runs_of_other_tasks(done, tmp_path):
    """Two runs' scores compare only on one test set: the comparison lists the settings that
    differ, warns when the test set is among them, and refuses runs of different tasks."""
    same = _copy(done, tmp_path, "same")
    res = runner.invoke(app, ["report", str(done), str(same), "--out", str(tmp_path / "c0")])
    assert res.exit_code == 0, res.output
    assert "differ in no setting" in res.output and "warning" not in res.output
    other = _copy(done, tmp_path, "other")
    cfg = yaml.safe_load((other / "config.yaml").read_text())
    cfg["train"]["lr"], cfg["data"]["test_size"] = 0.5, 0.2
    cfg["name"], cfg["log"]["project"] = "renamed", "elsewhere"  # score nothing: not listed
    (other / "config.yaml").write_text(yaml.safe_dump(cfg))
    lr = yaml.safe_load((done / "config.yaml").read_text())["train"]["lr"]
    res = runner.invoke(app, ["report", str(done), str(other), "--out", str(tmp_path / "c1")])
    assert res.exit_code == 0, res.output
    table = res.output[res.output.index("Settings that differ") :]
    assert f"| train.lr | {lr} | 0.5 |" in table and "| data.test_size | " in table
    assert "| name |" not in table and "log.project" not in table
    assert "different test sets (they differ in data.test_size)" in res.output
    assert "Settings that differ" in (tmp_path / "c1" / "compare.md").read_text()
    lm = _copy(done, tmp_path, "lm")
    summary = json.loads((lm / "summary.json").read_text())
    (lm / "summary.json").write_text(json.dumps({**summary, "task": "causal-lm"}))
    res = runner.invoke(app, ["report", str(done), str(lm), "--out", str(tmp_path / "c2")])
    assert "runs of different tasks" in _error_line(res)
    assert "lm: causal-lm" in res.stderr and not (tmp_path / "c2").exists()


def test_a_run_name_is_a_folder_name(job, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("../../x", "a/b", "..", ".hidden"):
        res = runner.invoke(
            app, ["run", "--config", str(job / "job.yaml"), "--set", f"name={name}"]
        )
        assert "name: must be a plain folder name" in _error_line(res)
    assert list(tmp_path.iterdir()) == []  # nothing created, not even runs/


# ----------------------------------------------------------------- 8. the network surface


def test_a_single_machine_launch_listens_on_loopback_only(tmp_path, monkeypatch, caplog):
    """And its peers get torchrun's one thread each without torchrun's banner asking the user
    to tune OMP_NUM_THREADS (declora's train.threads does), the launcher's own left as it was."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    with caplog.at_level(logging.WARNING, logger="torch.distributed.run"):
        launch.run(["tests.integrity_workers", str(tmp_path)], peers=2)
    assert not [r for r in caplog.records if "OMP_NUM_THREADS" in r.getMessage()]
    assert "OMP_NUM_THREADS" not in os.environ
    for rank in (0, 1):
        rec = json.loads((tmp_path / f"peer-{rank}.json").read_text())
        assert rec["sum"] == 2.0 and rec["master_addr"] == "127.0.0.1"
        assert rec["omp_num_threads"] == "1"
        sockets = rec["worker"] + rec["launcher"]
        assert sockets and all(s.startswith("127.0.0.1:") for s in sockets), sockets
    opts = launch.torchrun_args(2, "1", 0, None, 0, str(tmp_path))
    assert "--standalone" not in opts and "--local-addr=127.0.0.1" in opts


def test_a_peer_announcing_a_huge_startup_message_is_refused(tmp_path):
    mp.spawn(oversized_announcement, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    err = json.loads((tmp_path / "peer-0.json").read_text())["error"]
    assert "peer 1 announced 1,099,511,627,776 bytes" in err and "at most" in err
