"""`declora predict`: a finished run's model labels new texts (and answers prompts, in
test_causal_run), prepared as the run prepared its own data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from sklearn.metrics import f1_score
from transformers import BertConfig, BertForSequenceClassification

from tests.conftest import run_in_process, write_ring_job


@pytest.fixture(scope="module")
def job(tmp_path_factory, tokenizer):
    """A 4-peer ring on the tiny model whose test split is a file we hold (30 rows, every
    one scored at the end)."""
    d = write_ring_job(tmp_path_factory.mktemp("job"), tokenizer, seed=3, rounds=4)
    # weights 25x the usual init scale: the tiny model's texts differ enough to be given
    # different labels (at 0.02 it says one label for every text)
    torch.manual_seed(0)
    config = BertConfig.from_pretrained(d / "model", initializer_range=0.5)
    BertForSequenceClassification(config).save_pretrained(d / "model")
    # test labels 15 a, 10 b, 5 c: a model that says one label for every text still scores
    # differently under each mix-up of the label names
    rows = (d / "data.csv").read_text().splitlines()
    labels = "a" * 15 + "b" * 10 + "c" * 5
    test = [f"{r[:-2]},{label}" for r, label in zip(rows[-30:], labels, strict=True)]
    (d / "test.csv").write_text("\n".join([rows[0], *test]) + "\n")
    cfg = yaml.safe_load((d / "job.yaml").read_text())
    cfg["data"]["test_path"] = str(d / "test.csv")
    (d / "job.yaml").write_text(yaml.safe_dump(cfg))
    return d


def _run(job, out, *sets: str):
    args = ["run", "--quiet", "--config", str(job / "job.yaml"), "--out", str(out)]
    res = run_in_process(*args, *[a for s in sets for a in ("--set", s)])
    assert res.returncode == 0, res.stderr
    return out


@pytest.fixture(scope="module")
def finished_run(job):
    return _run(job, job / "run")


def _labels_of_the_test_file(run, out, *options: str) -> tuple[list[dict], float, float]:
    """`declora predict` on the run's test file: its rows, accuracy and macro-F1."""
    test_file = Path(yaml.safe_load((run / "config.yaml").read_text())["data"]["test_path"])
    res = run_in_process("predict", str(run), "--file", str(test_file), "-o", str(out), *options)
    assert res.returncode == 0, res.stderr
    assert "30 rows" in res.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    table = pd.read_csv(test_file, dtype=str)
    assert [r["text"] for r in rows] == list(table["text"])
    said, truth = [r["label"] for r in rows], list(table["label"])
    assert len(set(said)) > 1, "a model that tells texts apart"
    accuracy = sum(p == t for p, t in zip(said, truth, strict=True)) / len(truth)
    f1 = f1_score(truth, said, labels=["a", "b", "c"], average="macro", zero_division=0)
    return rows, accuracy, f1


def _averaged_row(run) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    return next(r for r in summary["rows"] if r["label"].endswith("(averaged model)"))


def test_predictions_on_the_test_file_score_what_the_run_reported(finished_run, tmp_path):
    """The labels predicted for the run's own test file give the accuracy the run's summary
    reports for its averaged model: same base, adapter, head, tokenization and label names."""
    rows, accuracy, f1 = _labels_of_the_test_file(finished_run, tmp_path / "labels.jsonl")
    averaged = _averaged_row(finished_run)
    assert accuracy == pytest.approx(averaged["accuracy"], abs=1e-9)
    assert f1 == pytest.approx(averaged["macro_f1"], abs=1e-9)
    for r in rows:
        assert sorted(r["probabilities"]) == ["a", "b", "c"]
        assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert r["probability"] == max(r["probabilities"].values())
    # a peer's own model is another model: its probabilities differ
    peer = tmp_path / "peer.csv"
    res = run_in_process(
        "predict",
        str(finished_run),
        "--file",
        str(finished_run.parent / "test.csv"),
        "--adapter",
        "peer-1",
        "-o",
        str(peer),
    )
    assert res.returncode == 0, res.stderr
    table = peer.read_text().splitlines()
    assert table[0] == "text,label,probability,p_a,p_b,p_c" and len(table) == 31
    assert [float(x.split(",")[-3]) for x in table[1:]] != [r["probabilities"]["a"] for r in rows]


def test_with_a_validation_split_it_uses_the_best_round_and_a_head_the_run_drew(job, tmp_path):
    """With data.val_size the run keeps the best-validation round's adapters: predict uses
    them unless asked for the final average, and each scores on test what the run recorded.
    An untrained head (lora.train_head=false) is not in the adapter: it is the one the run's
    seed drew, drawn again."""
    run = _run(job, tmp_path / "run", "data.val_size=0.2", "lora.train_head=false", "seed=5")
    final = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    _, accuracy, f1 = _labels_of_the_test_file(run, tmp_path / "best.jsonl")
    assert accuracy == pytest.approx(final["val_best_test_accuracy"], abs=1e-9)
    assert f1 == pytest.approx(final["val_best_test_macro_f1"], abs=1e-9)
    _, accuracy, f1 = _labels_of_the_test_file(run, tmp_path / "avg.jsonl", "--adapter", "average")
    assert accuracy == pytest.approx(final["test_accuracy"], abs=1e-9)
    assert f1 == pytest.approx(final["test_macro_f1"], abs=1e-9)


def test_texts_on_the_command_line_are_labelled_one_line_each(finished_run):
    res = run_in_process("predict", str(finished_run), "alpha beta", "gamma delta epsilon")
    assert res.returncode == 0, res.stderr
    lines = [x for x in res.stdout.splitlines() if "\t" in x]
    assert [x.split("\t")[2] for x in lines] == ["alpha beta", "gamma delta epsilon"]
    assert all(x.split("\t")[0] in ("a", "b", "c") for x in lines)
    assert all(0.0 < float(x.split("\t")[1]) <= 1.0 for x in lines)


@pytest.mark.parametrize(
    ("args", "said"),
    [
        ([], "either as arguments or as --file"),
        (["hi", "--file", "{run}/config.yaml"], "either as arguments or as --file"),
        (["hi", "--adapter", "peer-x"], "accepted: best-val, average, peer-<i>"),
        (["hi", "--adapter", "peer-9"], "has no adapter 'peer-9'; it has: average, peer-0"),
        (["hi", "--adapter", "best-val"], "has no adapter 'best-val'"),
        (["hi", "--baseline", "fedavg"], "has no baseline 'fedavg'; it has: none"),
        (["hi", "--out", "{tmp}/labels.txt"], "accepted: .jsonl, .json, .csv, .tsv"),
        (["hi", "--out", "{tmp}/gone/labels.csv"], "does not exist"),
        (["--file", "{run}/metrics.jsonl"], "has no column 'text'"),
        (["--file", "{tmp}/absent.csv"], "does not exist"),
    ],
    ids=[
        "no-input",
        "two-inputs",
        "bad-adapter-name",
        "absent-peer",
        "no-validation-split",
        "absent-baseline",
        "bad-output-extension",
        "output-folder-missing",
        "missing-column",
        "missing-file",
    ],
)
def test_mistakes_are_refused_with_what_is_accepted(finished_run, tmp_path, args, said):
    args = [a.format(run=finished_run, tmp=tmp_path) for a in args]
    res = run_in_process("predict", str(finished_run), *args)
    assert res.returncode == 2, res.stderr
    assert said in res.stderr and "Traceback" not in res.stderr
    assert not list(tmp_path.glob("labels*"))


def test_a_folder_that_is_not_a_finished_run_is_refused(tmp_path, finished_run):
    res = run_in_process("predict", str(tmp_path), "hi")
    assert res.returncode == 2 and "not a declora run directory" in res.stderr
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text((finished_run / "config.yaml").read_text())
    (unfinished / "run.json").write_text(json.dumps({"status": "running"}))
    res = run_in_process("predict", str(unfinished), "hi")
    assert res.returncode == 2, res.stderr
    assert "the run is 'running', and adapters are written when it completes" in res.stderr


def test_a_run_on_text_pairs_reads_both_columns(job, tmp_path):
    """A pair task (data.text_pair_column) is fed both texts, as in training; texts on the
    command line, which cannot say which is which, are refused."""
    for name in ("data.csv", "test.csv"):
        lines = (job / name).read_text().splitlines()
        rows = [
            f"{t},{t.split()[0]} {t.split()[-1]},{y}"
            for t, y in (x.rsplit(",", 1) for x in lines[1:])
        ]
        (tmp_path / name).write_text("\n".join(["text,pair,label", *rows]) + "\n")
    sets = [f"data.path={tmp_path / 'data.csv'}", f"data.test_path={tmp_path / 'test.csv'}"]
    run = _run(job, tmp_path / "run", *sets, "data.text_pair_column=pair")
    rows, accuracy, _ = _labels_of_the_test_file(run, tmp_path / "pairs.jsonl")
    assert accuracy == pytest.approx(_averaged_row(run)["accuracy"], abs=1e-9)
    assert rows[0]["pair"] == " ".join(rows[0]["text"].split()[:: len(rows[0]["text"].split()) - 1])
    res = run_in_process("predict", str(run), "one text")
    assert res.returncode == 2 and "classifies pairs of texts" in res.stderr, res.stderr


def test_export_merges_the_adapter_into_a_model_transformers_loads_alone(finished_run, tmp_path):
    """`declora export`: the merged folder loads with transformers (no PEFT), with the label
    names in its config, and gives the probabilities `declora predict` gives."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "merged"
    res = run_in_process("export", str(finished_run), str(out))
    assert res.returncode == 0, res.stderr
    assert "merged" in res.stdout and not list(tmp_path.glob(".*partial"))
    umask = os.umask(0)
    os.umask(umask)
    # readable as any file the user writes (a server under another account loads it)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes == dict.fromkeys(modes, 0o666 & ~umask)
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert model.config.id2label == {0: "a", 1: "b", 2: "c"}
    assert not any("lora" in name for name, _ in model.named_parameters())
    rows, _, _ = _labels_of_the_test_file(finished_run, tmp_path / "labels.jsonl")
    tok = AutoTokenizer.from_pretrained(out)
    batch = tok(
        [r["text"] for r in rows], padding=True, truncation=True, max_length=64, return_tensors="pt"
    )
    with torch.no_grad():
        probs = torch.softmax(model(**batch).logits, dim=-1)
    want = torch.tensor([list(r["probabilities"].values()) for r in rows])
    torch.testing.assert_close(probs, want, atol=1e-5, rtol=1e-4)
    # an existing folder is kept unless --overwrite
    res = run_in_process("export", str(finished_run), str(out), "--adapter", "peer-0")
    assert res.returncode == 2 and "already exists" in res.stderr
    assert AutoModelForSequenceClassification.from_pretrained(out).config.id2label[0] == "a"
    res = run_in_process(
        "export", str(finished_run), str(out), "--adapter", "peer-0", "--overwrite"
    )
    assert res.returncode == 0, res.stderr
    peer0 = AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        assert not torch.allclose(torch.softmax(peer0(**batch).logits, dim=-1), want, atol=1e-4)


def test_a_prompt_tuning_run_has_nothing_to_merge(job, tmp_path):
    run = _run(job, tmp_path / "run", "lora.method=prompt-tuning", "lora.virtual_tokens=4")
    res = run_in_process("export", str(run), str(tmp_path / "merged"))
    assert res.returncode == 2 and "no weights to merge" in res.stderr, res.stderr
    assert not (tmp_path / "merged").exists() and not list(tmp_path.glob(".*partial"))
    res = run_in_process("predict", str(run), "alpha beta")  # it still predicts
    assert res.returncode == 0, res.stderr
