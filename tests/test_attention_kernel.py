"""Training passes over a bfloat16 base on CPU use the unfused attention kernel
(`declora.model.attention`): PyTorch's fused CPU kernel, which it picks when attention dropout
is off, has a slow backward in bfloat16. Scoring and float32 bases keep PyTorch's choice, and
with dropout on nothing changes, bit for bit."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import declora.tasks.task as task_module
from declora.engine.batched import BatchedEngine
from declora.model.adapters import build_spec, initial_state
from declora.model.attention import training_attention, unfused_attention_wanted
from tests.conftest import synthetic_examples, tiny_bert

N = 2


def _engine(task, dtype: torch.dtype, dropout: float = 0.0) -> BatchedEngine:
    model = tiny_bert(dropout=dropout).to(dtype)
    spec = build_spec(model, ["query", "value"], r=4, alpha=8, dropout=0.0, train_head=True)
    init = initial_state(model, spec, seed=0)
    return BatchedEngine(model, spec, N, init, task, optimizer="sgd", momentum=0.9, lr=0.5)


def _batches(tokenizer, steps: int) -> list[list[list[dict]]]:
    examples = synthetic_examples(tokenizer, 40)
    rng = np.random.default_rng(0)
    return [[[examples[j] for j in rng.integers(0, 40, 4)] for _ in range(N)] for _ in range(steps)]


def _fused_calls(run) -> int:
    """How many times `run()` calls PyTorch's fused (flash) CPU attention kernel."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    return sum(e.count for e in prof.key_averages() if "flash_attention" in e.key)


@pytest.mark.parametrize(
    ("dtype", "fused_in_training"), [(torch.bfloat16, False), (torch.float32, True)]
)
def test_training_over_a_bf16_base_avoids_the_fused_kernel(
    tokenizer, task, dtype, fused_in_training
):
    engine = _engine(task, dtype)
    batch = _batches(tokenizer, 1)[0]
    assert unfused_attention_wanted(engine.model) is (dtype == torch.bfloat16)
    assert (_fused_calls(lambda: engine.train_step(batch)) > 0) is fused_in_training
    # scoring keeps PyTorch's own choice: the fused forward is the faster one
    assert _fused_calls(lambda: engine.outputs_all_peers(batch[0])) > 0


def test_without_the_choice_pytorch_would_train_with_the_fused_kernel(tokenizer, task, monkeypatch):
    """What the choice changes: without it, a bfloat16 training pass (dropout off) runs the
    fused kernel."""
    monkeypatch.setattr(task_module, "training_attention", lambda model: contextlib.nullcontext())
    engine = _engine(task, torch.bfloat16)
    assert _fused_calls(lambda: engine.train_step(_batches(tokenizer, 1)[0])) > 0


def test_with_dropout_on_the_choice_changes_nothing(tokenizer, task, monkeypatch):
    """With attention dropout on, PyTorch already runs the unfused kernel, so bfloat16 runs
    with dropout (the plateau study's) end bit-identical with and without the choice."""
    batches = _batches(tokenizer, 4)
    finals = []
    for choose in (True, False):
        if not choose:
            monkeypatch.setattr(
                task_module, "training_attention", lambda model: contextlib.nullcontext()
            )
        engine = _engine(task, torch.bfloat16, dropout=0.1)
        torch.manual_seed(7)
        losses = torch.stack([engine.train_step(b) for b in batches])
        finals.append((losses, engine.stacked()))
    (loss_a, a), (loss_b, b) = finals
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["bert.encoder.layer.0.attention.self.query.lora_B"].abs().sum() > 0  # it trained


def test_float32_bases_are_left_alone():
    model = tiny_bert()
    assert not unfused_attention_wanted(model)
    with training_attention(model):  # nothing to enter
        pass
    assert unfused_attention_wanted(tiny_bert().to(torch.bfloat16))
