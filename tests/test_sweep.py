"""`declora sweep`: grid expansion, validation before work, resumability, mean +- std tables."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from declora.cli import app
from declora.errors import ConfigError
from declora.runners.sweep import cells, parse_grid, split_values
from tests.conftest import write_tiny_job

runner = CliRunner()


def test_values_split_on_commas_outside_brackets():
    assert split_values("ring, er ,torus") == ["ring", "er", "torus"]
    assert split_values("[[0.15,0.85],[0.85,0.15]],null") == ["[[0.15,0.85],[0.85,0.15]]", "null"]


def test_grid_is_a_product_times_seeds():
    grid = parse_grid(["lora.r=2,4,8", "topology.kind=ring,er"])
    cs = cells(grid, [0, 1])
    assert len(cs) == 12 and len({c.name for c in cs}) == 12
    assert cs[0].sets == ["lora.r=2", "topology.kind=ring", "seed=0"]


@pytest.mark.parametrize(
    "items, message",
    [
        (["lora.r"], "must look like key=value1,value2"),
        (["seed=1,2"], "use --seeds N"),
        (["lora.r=2", "lora.r=4"], "given twice"),
    ],
)
def test_bad_grids_are_refused(items, message):
    with pytest.raises(ConfigError, match=message):
        parse_grid(items)


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("sweepjob")
    write_tiny_job(d, tokenizer, seed=3, rows=120, words=5)
    cfg = {
        "model": {"name": str(d / "model")},
        "data": {"name": "file", "path": str(d / "data.csv")},
        "topology": {"peers": 3},
        "train": {"rounds": 2, "batch_size": 4, "checkpoint_every": 0},
        "eval": {"every": 2, "max_examples": 20, "final_max_examples": 20, "peers": "never"},
        "baselines": [],
    }
    (d / "base.yaml").write_text(yaml.safe_dump(cfg))
    return d / "base.yaml"


def test_an_invalid_cell_stops_the_sweep_before_any_run(base, tmp_path):
    res = runner.invoke(
        app, ["sweep", "--config", str(base), "--grid", "lora.r=2,0", "--out", str(tmp_path / "s")]
    )
    assert res.exit_code == 2
    assert "sweep cell r=0__seed=0" in res.output and "lora.r" in res.output
    assert not (tmp_path / "s").exists()


def test_a_cell_whose_data_file_is_missing_stops_the_sweep_before_any_run(base, tmp_path):
    """A data.path typo in one value of the grid is found before the first cell trains,
    not after the cells before it have run."""
    good = yaml.safe_load(base.read_text())["data"]["path"]
    grid = f"data.path={good},{tmp_path / 'typo.csv'}"
    out = tmp_path / "s"
    res = runner.invoke(app, ["sweep", "--config", str(base), "--grid", grid, "--out", str(out)])
    assert res.exit_code == 2, res.output
    assert "sweep cell" in res.output and "typo.csv does not exist" in res.output
    assert "Traceback" not in res.output and not out.exists()


def test_sweep_runs_resumes_and_tabulates(base, tmp_path):
    out = tmp_path / "s"
    args = ["sweep", "--config", str(base), "--grid", "lora.r=2,4", "--seeds", "2"]
    args += ["--out", str(out), "--jobs", "2"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "4 cells, 0 already complete, 4 to run" in res.output
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 4 and {r["lora.r"] for r in rows} == {"2", "4"}
    agg = json.loads((out / "results.json").read_text())
    r2 = [float(r["accuracy"]) for r in rows if r["lora.r"] == "2"]
    mean = next(a for a in agg if a["lora.r"] == "2")
    assert mean["accuracy"] == pytest.approx(np.mean(r2))
    assert mean["accuracy_std"] == pytest.approx(np.std(r2, ddof=1))
    assert "±" in (out / "results.md").read_text()
    # a finished sweep reruns nothing; a cell that did not finish is run again
    (out / "cells" / "r=4__seed=1" / "run.json").write_text('{"status": "failed"}')
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "4 cells, 3 already complete, 1 to run" in res.output
    # several runs side by side: one table, plots, and an error for a folder that is no run
    cmp = tmp_path / "cmp"
    runs = [str(out / "cells" / name) for name in ("r=2__seed=0", "r=4__seed=0")]
    res = runner.invoke(app, ["report", *runs, "--out", str(cmp)])
    assert res.exit_code == 0, res.output
    assert "| r=2__seed=0 |" in res.output and "| r=4__seed=0 |" in res.output
    assert "| lora.r | 2 | 4 |" in res.output and "test sets" not in res.output
    for f in ("accuracy.png", "accuracy_vs_bytes.png", "consensus.png", "compare.md"):
        assert (cmp / f).is_file()
    res = runner.invoke(app, ["report", runs[0], str(tmp_path)])
    assert res.exit_code == 2 and "not a declora run directory" in res.output


def test_a_stopped_sweep_stops_its_running_cell_and_starts_no_other(base, tmp_path):
    """SIGTERM to the sweep process alone (a scheduler's preemption): the running cell gets it
    too and records it, instead of training on as an orphan that holds its folder while the
    sweep looks stopped, and the next cell never starts."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from declora.reporting.rundir import busy

    out = tmp_path / "s"
    cmd = [sys.executable, "-m", "declora", "sweep", "--config", str(base), "--out", str(out)]
    cmd += [
        "--grid",
        "lora.r=2,4",
        "--set",
        "train.rounds=400",
        "--set",
        "train.checkpoint_every=2",
    ]
    sweep = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = out / "cells" / "r=2__seed=0"
    deadline = time.monotonic() + 120
    while not (first / "metrics.jsonl").is_file():  # the cell is training
        assert sweep.poll() is None and time.monotonic() < deadline, sweep.communicate()
        time.sleep(0.1)
    os.kill(sweep.pid, signal.SIGTERM)
    _, err = sweep.communicate(timeout=120)
    assert sweep.returncode == 143, err
    assert "stopped by SIGTERM; the same command continues the sweep" in err
    status = json.loads((first / "run.json").read_text())
    assert status["status"] == "failed" and status["error"] == "Stopped: stopped by SIGTERM"
    assert busy(first) is None  # no orphan holds it
    assert not (out / "cells" / "r=4__seed=0").exists()
