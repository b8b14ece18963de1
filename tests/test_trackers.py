"""Experiment trackers: a tiny job logged offline to TensorBoard, MLflow and W&B, then read back
from what each one wrote (event files, the MLflow store, the offline W&B folder)."""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from declora.cli import app
from declora.config.schema import load_config
from declora.errors import DecloraError
from declora.reporting import trackers as tr
from tests.conftest import run_cli, run_in_process, write_tiny_job

runner = CliRunner()
ALGORITHMS = ("dec-lora", "centralized")


def _installed(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


needs_all = pytest.mark.skipif(
    not _installed("tensorboard", "mlflow", "sqlalchemy", "wandb"),
    reason="the tracker extras are not installed (make test installs them)",
)


@pytest.fixture(scope="module")
def job(tmp_path_factory, tokenizer) -> Path:
    d = tmp_path_factory.mktemp("trackjob")
    write_tiny_job(d, tokenizer, seed=4, rows=120, words=5)
    cfg = {
        "model": {"name": str(d / "model")},
        "data": {"name": "file", "path": str(d / "data.csv"), "min_size": 4},
        "topology": {"peers": 3},
        "lora": {"r": 2},
        "train": {"rounds": 4, "batch_size": 4, "checkpoint_every": 0},
        "eval": {"every": 2, "max_examples": 20, "final_max_examples": 20},
        "baselines": ["centralized"],
    }
    (d / "job.yaml").write_text(yaml.safe_dump(cfg))
    return d


@pytest.fixture(scope="module")
def logged(job, tmp_path_factory) -> Path:
    """One run of the tiny job with all three trackers, W&B offline."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    mp = pytest.MonkeyPatch()
    wb = tmp_path_factory.mktemp("wandb-home")
    for var, value in {
        "WANDB_MODE": "offline",
        "WANDB_CONFIG_DIR": str(wb),
        "WANDB_CACHE_DIR": str(wb),
        "WANDB_DATA_DIR": str(wb),
    }.items():
        mp.setenv(var, value)
    try:
        args = ["run", "--quiet", "--config", str(job / "job.yaml"), "--out", str(out)]
        res = runner.invoke(app, [*args, "--set", "log.to=[tensorboard,mlflow,wandb]"])
    finally:
        mp.undo()
    assert res.exit_code == 0, res.output
    return out


def _records(run: Path, algorithm: str) -> list[dict]:
    where = run if algorithm == "dec-lora" else run / "baselines" / algorithm
    return [json.loads(x) for x in (where / "metrics.jsonl").read_text().splitlines()]


@needs_all
def test_tensorboard_has_every_evaluated_round_of_each_algorithm(logged):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for algorithm in ALGORITHMS:
        ea = EventAccumulator(str(logged / "tensorboard" / algorithm), size_guidance={"images": 0})
        ea.Reload()
        recs = _records(logged, algorithm)
        for key in ("accuracy", "train_loss", "consensus_distance", "bytes_sent"):
            points = ea.Scalars(key)
            assert [p.step for p in points] == [r["round"] for r in recs] == [2, 4]
            assert [p.value for p in points] == pytest.approx([r[key] for r in recs], rel=1e-6)
        assert "_hparams_/experiment" in ea.PluginTagToContent("hparams")
    ea = EventAccumulator(str(logged / "tensorboard" / "dec-lora"), size_guidance={"images": 0})
    ea.Reload()
    table = ea.Tensors("peer_metrics/text_summary")[0]
    assert table.step == 4 and table.tensor_proto.string_val[0].decode().count("\n| ") == 3
    assert {"plots/accuracy", "plots/consensus", "plots/topology"} <= set(ea.Tags()["images"])
    report = ea.Tensors("report/text_summary")[0].tensor_proto.string_val[0].decode()
    assert report == (logged / "report.md").read_text()


@needs_all
def test_mlflow_store_holds_one_finished_run_per_algorithm(logged):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{logged / 'mlflow.db'}")
    exp = client.get_experiment_by_name("declora")
    runs = {r.data.tags["algorithm"]: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == set(ALGORITHMS)
    for algorithm, run in runs.items():
        assert run.info.status == "FINISHED"
        assert run.info.run_name == f"tiny/{algorithm}"
        assert run.data.tags["declora.group"] == "tiny"
        assert run.data.params["lora.r"] == "2" and run.data.params["topology.peers"] == "3"
        recs = _records(logged, algorithm)
        history = client.get_metric_history(run.info.run_id, "accuracy")
        assert [m.step for m in history] == [2, 4]
        assert [m.value for m in history] == pytest.approx([r["accuracy"] for r in recs])
    main = runs["dec-lora"].info.run_id
    shared = {Path(a.path).name for a in client.list_artifacts(main, "report")}
    assert {"report.md", "summary.json", "config.yaml", "accuracy.png"} <= shared
    table = json.loads(Path(client.download_artifacts(main, "peer_metrics.json")).read_text())
    assert len(table["data"]) == 3  # one row per peer


def _wandb_records(path: Path) -> list:
    """The records of an offline `.wandb` file: W&B's LevelDB-style log of protobuf records
    (7-byte file header, then 32 KiB blocks of chunks with a 7-byte header each)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, pending, out = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # full, last
            rec = pb.Record()
            rec.ParseFromString(pending + chunk)
            out.append(rec)
            pending = b""
        elif kind in (2, 3):  # first, middle
            pending += chunk
    return out


@needs_all
def test_wandb_offline_folder_holds_one_run_per_algorithm_in_one_group(logged):
    found = {}
    for f in sorted((logged / "wandb").glob("offline-run-*/run-*.wandb")):
        recs = _wandb_records(f)
        run = next(r.run for r in recs if r.WhichOneof("record_type") == "run")
        history = {}
        for r in recs:
            if r.WhichOneof("record_type") == "history":
                items = {
                    i.key or "/".join(i.nested_key): json.loads(i.value_json)
                    for i in r.history.item
                }
                history[r.history.step.num] = items
        found[run.job_type] = (run, history, f.parent)
    assert set(found) == set(ALGORITHMS)
    for algorithm, (run, history, _) in found.items():
        assert run.run_group == "tiny" and run.display_name == f"tiny/{algorithm}"
        assert f"algorithm={algorithm}" in run.tags
        config = {i.key or i.nested_key[0]: json.loads(i.value_json) for i in run.config.update}
        assert config["lora"]["r"] == 2
        recs = _records(logged, algorithm)
        for r in recs:
            assert history[r["round"]]["accuracy"] == pytest.approx(r["accuracy"])
    folder = found["dec-lora"][2]
    assert (folder / "files" / "report" / "report.md").read_text() == (
        logged / "report.md"
    ).read_text()
    assert list((folder / "files" / "media" / "table").glob("peer_metrics_*.table.json"))


def test_a_missing_tracker_is_one_line_before_the_run_starts(job, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    out = tmp_path / "never"
    args = ["run", "--config", str(job / "job.yaml"), "--out", str(out), "--set", "log.to=[wandb]"]
    res = runner.invoke(app, args)
    assert res.exit_code == 2
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert errors == ["error: log.to=wandb needs the wandb package: pip install 'declora[wandb]'"]
    assert res.output.strip().endswith(errors[0])  # nothing after it: no traceback
    assert not out.exists()  # refused before the run directory was made


def test_require_names_the_first_missing_package(monkeypatch):
    real = importlib.util.find_spec
    gone = {"sqlalchemy"}
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in gone else real(name, *a)
    )
    if not _installed("mlflow"):
        pytest.skip("mlflow is not installed")
    with pytest.raises(DecloraError, match=r"needs the sqlalchemy package: .*declora\[mlflow\]"):
        tr.require(load_config(None, ["log.to=[mlflow]"]).log)
    tr.require(load_config(None, ["log.to=[mlflow]", "log.mlflow_uri=http://h:5000"]).log)


def test_no_trackers_means_no_files_and_no_imports(tmp_path):
    t = tr.Trackers.open(load_config(), tmp_path)
    hook = t.on_record("dec-lora")
    hook({"round": 1, "accuracy": 0.5})
    t.peer_table("dec-lora", [{"accuracy": 0.5}])
    t.end(tmp_path, "dec-lora")
    assert not t and list(tmp_path.iterdir()) == []


def test_records_and_config_are_flattened_for_trackers():
    rec = {"round": 3, "accuracy": 0.5, "bytes_sent": 10, "flag": True, "note": "x", "c": None}
    assert tr.metrics_of(rec) == {"accuracy": 0.5, "bytes_sent": 10.0}
    params = tr.flat_params({"lora": {"r": 8, "targets": ["q", "v"]}, "seed": 0, "x": None})
    assert params == {"lora.r": 8, "lora.targets": '["q", "v"]', "seed": 0, "x": "null"}


@needs_all
def test_a_resumed_run_continues_the_same_tracker_runs(job, tmp_path):
    """Killed after round 7 with a checkpoint at round 4: TensorBoard drops the interrupted
    attempt's round 6 and ends with each round once; MLflow keeps one run, finished."""
    cfg = yaml.safe_load((job / "job.yaml").read_text())
    cfg["train"].update(rounds=8, checkpoint_every=4)
    cfg.update(baselines=[], log={"to": ["tensorboard", "mlflow"]})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    args = ["run", "--quiet", "--config", str(tmp_path / "job.yaml"), "--out", str(out)]
    res = run_cli(*args, env={"DECLORA_KILL_AT": "7"})
    assert res.returncode == -9, res.stderr
    res = run_in_process("run", "--quiet", "--resume", str(out))
    assert res.returncode == 0, res.stderr

    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(out / "tensorboard" / "dec-lora"))
    ea.Reload()
    recs = _records(out, "dec-lora")
    assert [p.step for p in ea.Scalars("accuracy")] == [r["round"] for r in recs] == [2, 4, 6, 8]
    assert [p.value for p in ea.Scalars("accuracy")] == pytest.approx([r["accuracy"] for r in recs])
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("declora")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "accuracy")]
    assert sorted(set(steps)) == [2, 4, 6, 8]  # round 6 twice: logged before the kill and after


@pytest.mark.skipif(not _installed("tensorboard"), reason="needs the tensorboard extra")
def test_a_resume_in_the_same_second_is_read_after_the_interrupted_attempt(tmp_path):
    """TensorBoard reads event files in name order: whole second, then host, then pid. Here the
    interrupted attempt's file is stamped this second with a host and pid that sort after any
    real ones (what CI hit: a resume within the second, from a process with a smaller pid)."""
    import time

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    folder = tmp_path / "tb" / "dec-lora"
    old = SummaryWriter(str(folder))
    for step in (2, 4, 6):
        old.add_scalar("accuracy", step / 10, step)
    old.close()
    (written,) = folder.glob("events.out.tfevents.*")
    written.rename(folder / f"events.out.tfevents.{int(time.time()):010d}.zzzz.999999999.0")

    info = tr.RunInfo("dec-lora", "run/dec-lora", "run", {}, {}, {}, ("accuracy",), resumed=True)
    tb = tr.TensorBoardTracker(tmp_path / "tb")
    tb.start(info, {})
    tb.log("dec-lora", {"accuracy": 0.65}, 6)  # round 6 again, recomputed after the resume
    tb.log("dec-lora", {"accuracy": 0.8}, 8)
    tb.finish(failed=False)

    ea = EventAccumulator(str(folder))
    ea.Reload()
    got = [(p.step, round(p.value, 2)) for p in ea.Scalars("accuracy")]
    assert got == [(2, 0.2), (4, 0.4), (6, 0.65), (8, 0.8)]


def test_sweep_cells_carry_their_grid_values_as_tags():
    from declora.runners.sweep import cell_tags, cells

    a, b = cells({"lora.r": ["2", "4"], "data.alpha": ["0.1"]}, [0, 1])[1:3]
    assert cell_tags(a, {"team": "nlp"}, Path("runs/rank")) == (
        'log.tags={"team": "nlp", "lora.r": "2", "data.alpha": "0.1", "seed": "1", "sweep": "rank"}'
    )
    tags = load_config(None, [cell_tags(b, {}, Path("runs/rank"))]).log.tags
    assert tags == {"lora.r": "4", "data.alpha": "0.1", "seed": "0", "sweep": "rank"}


@needs_all
def test_a_sweep_cell_is_a_tracker_run_tagged_with_its_grid_values(job, tmp_path):
    """A sweep cell logged to a shared MLflow store (log.dir): its run carries the cell's grid
    value, seed and sweep name as tags, next to the base config's own tags."""
    out, track = tmp_path / "rank", tmp_path / "track"
    sets = ["log.to=[mlflow]", f"log.dir={track}", "log.tags={team: nlp}", "baselines=[]"]
    args = ["sweep", "--config", str(job / "job.yaml"), "--grid", "lora.r=4", "--out", str(out)]
    for s in sets:
        args += ["--set", s]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{track / 'mlflow.db'}")
    exp = client.get_experiment_by_name("declora")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "r=4__seed=0/dec-lora" and run.info.status == "FINISHED"
    want = {"lora.r": "4", "seed": "0", "sweep": "rank", "team": "nlp", "algorithm": "dec-lora"}
    assert want.items() <= run.data.tags.items()
    assert run.data.params["lora.r"] == "4"


@needs_all
def test_real_peers_log_the_network_on_rank_0_and_each_peer_its_own(job, tmp_path):
    """Two torchrun peers, `log.peers=true`: rank 0 logs the network-wide record as the run's
    tracker run, and every peer its own loss and bytes, all in one MLflow store."""
    out = tmp_path / "dist"
    sets = ["topology.peers=2", "baselines=[]", "log.to=[tensorboard,mlflow]", "log.peers=true"]
    args = ["launch", "--peers", "2", "--", "--quiet", "--config", str(job / "job.yaml")]
    args += ["--out", str(out)]
    for s in sets:
        args += ["--set", s]
    res = run_cli(*args, env={"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]

    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recs = _records(out, "dec-lora")
    ea = EventAccumulator(str(out / "tensorboard" / "dec-lora"))
    ea.Reload()
    assert [p.value for p in ea.Scalars("accuracy")] == pytest.approx([r["accuracy"] for r in recs])
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("declora")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"dist/dec-lora", "dist/peer-0", "dist/peer-1"}
    for i in (0, 1):
        run = runs[f"dist/peer-{i}"]
        assert run.data.tags["peer"] == str(i) and run.data.tags["algorithm"] == "dec-lora"
        own = [
            json.loads(x) for x in (out / f"peers/peer-{i}/metrics.jsonl").read_text().splitlines()
        ]
        history = client.get_metric_history(run.info.run_id, "peer_train_loss")
        assert [m.step for m in history] == [r["round"] for r in own] == [2, 4]
        assert [m.value for m in history] == pytest.approx([r["peer_train_loss"] for r in own])
        assert "accuracy" not in run.data.metrics  # a peer logs its own numbers only
    assert all(r.info.status == "FINISHED" for r in runs.values())
