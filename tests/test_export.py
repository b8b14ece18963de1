"""Exported adapters load with PEFT and reproduce the engine's logits."""

from __future__ import annotations

import json

import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from declora.engine.batched import BatchedEngine
from declora.model.adapters import average, build_spec, initial_state
from declora.model.export import save_peft_adapter
from tests.conftest import synthetic_examples, tiny_bert


def test_peft_round_trip(tmp_path, tokenizer, task):
    base_dir = tmp_path / "base"
    tiny_bert().save_pretrained(base_dir)
    model = AutoModelForSequenceClassification.from_pretrained(base_dir)
    spec = build_spec(model, ["query", "value"], r=4, alpha=8, dropout=0.0, train_head=True)
    eng = BatchedEngine(model, spec, 3, initial_state(model, spec, 0), task, lr=2e-2)
    examples = synthetic_examples(tokenizer, 30)
    for _ in range(3):
        eng.train_step([examples[i * 10 : i * 10 + 10] for i in range(3)])
    values = average(eng.stacked())
    expected = eng.outputs_single(values, examples)
    peer1 = {k: v[1] for k, v in eng.stacked().items()}
    expected_peer1 = eng.outputs_all_peers(examples)[1]

    for name, vals, want in [("average", values, expected), ("peer-1", peer1, expected_peer1)]:
        out = save_peft_adapter(tmp_path / name, spec, vals, str(base_dir))
        cfg = json.loads((out / "adapter_config.json").read_text())
        assert cfg["r"] == 4 and cfg["modules_to_save"] == ["classifier"]
        fresh = AutoModelForSequenceClassification.from_pretrained(base_dir)
        loaded = PeftModel.from_pretrained(fresh, out).eval()
        batch = task.collate(examples)
        with torch.no_grad():
            got = loaded(**{k: v for k, v in batch.items() if k != "labels"}).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        # the trained adapter and head really changed the model
        assert not torch.allclose(
            got,
            AutoModelForSequenceClassification.from_pretrained(base_dir)(
                **{k: v for k, v in batch.items() if k != "labels"}
            ).logits,
        )


def test_an_untrained_head_is_exported_so_peft_loads_the_adapter(tmp_path, tokenizer, task):
    """With lora.train_head=false the run's head is the one its seed drew. PEFT's
    sequence-classification model restores the head from the adapter and fails without it
    (KeyError on classifier.weight), so the export carries that head."""
    base_dir = tmp_path / "base"
    tiny_bert(num_labels=2, seed=3).save_pretrained(base_dir)
    torch.manual_seed(7)  # the run's seed draws a head that is not the saved one
    model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=2)
    torch.nn.init.normal_(model.classifier.weight, std=0.5)
    spec = build_spec(model, ["query", "value"], r=4, alpha=8, dropout=0.0, train_head=False)
    eng = BatchedEngine(model, spec, 2, initial_state(model, spec, 0), task, lr=5e-2)
    examples = synthetic_examples(tokenizer, 20, num_labels=2)
    for _ in range(3):
        eng.train_step([examples[:10], examples[10:]])
    values = average(eng.stacked())
    assert not any(k.startswith("classifier") for k in values)
    want = eng.outputs_single(values, examples)
    model = eng.remove()
    out = save_peft_adapter(tmp_path / "avg", spec, values, str(base_dir), model=model)
    assert json.loads((out / "adapter_config.json").read_text())["modules_to_save"] == [
        "classifier"
    ]
    fresh = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=2)
    loaded = PeftModel.from_pretrained(fresh, out).eval()
    batch = task.collate(examples)
    with torch.no_grad():
        got = loaded(**{k: v for k, v in batch.items() if k != "labels"}).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
