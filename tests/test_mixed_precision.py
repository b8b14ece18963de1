"""A bfloat16 base (`model.dtype=bfloat16`): the frozen model computes in bfloat16, while the
adapters and the head are held, updated and sent in float32 (as PEFT keeps adapters)."""

from __future__ import annotations

import numpy as np
import torch

from declora.engine.batched import BatchedEngine
from declora.model.adapters import build_spec, initial_state
from declora.model.stacked import trainable_dtype
from tests.conftest import synthetic_examples, tiny_bert

N = 3


def _engine(task, dtype: torch.dtype, lr: float) -> BatchedEngine:
    model = tiny_bert().to(dtype)
    spec = build_spec(model, ["query", "value"], r=4, alpha=8, dropout=0.0, train_head=True)
    init = initial_state(model, spec, seed=0)
    return BatchedEngine(
        model, spec, N, init, task, optimizer="sgd", momentum=0.0, lr=lr, max_grad_norm=None
    )


def _steps(engine: BatchedEngine, tokenizer, steps: int) -> None:
    examples = synthetic_examples(tokenizer, 60)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        engine.train_step([[examples[j] for j in rng.integers(0, 60, 4)] for _ in range(N)])


def test_trainable_dtype_is_float32_below_32_bits():
    assert trainable_dtype(torch.bfloat16) is torch.float32
    assert trainable_dtype(torch.float16) is torch.float32
    assert trainable_dtype(torch.uint8) is torch.float32  # a quantized base's packed weight
    assert trainable_dtype(torch.float32) is torch.float32
    assert trainable_dtype(torch.float64) is torch.float64


def test_bf16_base_keeps_adapters_and_head_in_float32(tokenizer, task):
    engine = _engine(task, torch.bfloat16, lr=0.5)
    assert {p.dtype for p in engine.params.values()} == {torch.float32}
    frozen = {p.dtype for n, p in engine.model.named_parameters() if "lora" not in n}
    assert torch.bfloat16 in frozen
    _steps(engine, tokenizer, 2)
    examples = synthetic_examples(tokenizer, 8, seed=1)
    outs = engine.outputs_all_peers(examples)
    assert outs.dtype == torch.float32 and torch.isfinite(outs).all()
    single = {k: v[0] for k, v in engine.stacked().items()}
    with engine.use_single(single) as model:
        batch = task.collate(examples)
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, outs[0], atol=1e-5, rtol=1e-4)


def test_small_steps_survive_over_a_bf16_base(tokenizer, task):
    """Steps below bfloat16's resolution of the head's weights (about 1/256 of an entry) still
    move them, and every trainable moves in the direction the float32 base's steps take."""
    moved = {}
    for dtype in (torch.float32, torch.bfloat16):
        engine = _engine(task, dtype, lr=1e-4)
        before = {k: v.clone() for k, v in engine.stacked().items()}
        _steps(engine, tokenizer, 3)
        after = engine.stacked()
        moved[dtype] = torch.cat([(after[k] - before[k]).flatten() for k in sorted(after)])
        head = next(k for k in after if k.endswith("classifier.weight"))
        step = (after[head] - before[head]).abs()
        # the head's entries moved, by less than bfloat16 could represent at their size
        assert (step > 0).float().mean() > 0.9
        assert (step < before[head].abs() / 256).float().mean() > 0.5
    cos = torch.nn.functional.cosine_similarity(moved[torch.float32], moved[torch.bfloat16], dim=0)
    assert cos > 0.98, cos


def test_bf16_causal_lm_trains_in_float32_adapters():
    """The causal LM path (no head): the update is added back in bfloat16, the loss is finite,
    and the factors stay float32."""
    from declora.tasks.task import CausalLMTask
    from tests.test_causal import ToyTokenizer, chat_examples, tiny_llama

    model, task = tiny_llama().to(torch.bfloat16), CausalLMTask(ToyTokenizer())
    spec = build_spec(model, ["q_proj", "v_proj"], r=4, alpha=8, dropout=0.0, train_head=False)
    engine = BatchedEngine(
        model, spec, 2, initial_state(model, spec, seed=0), task, optimizer="sgd", lr=0.5
    )
    examples = chat_examples(8)
    before = {k: v.clone() for k, v in engine.stacked().items()}
    for _ in range(2):
        losses = engine.train_step([examples[:4], examples[4:]])
    assert torch.isfinite(losses).all()
    after = engine.stacked()
    assert {v.dtype for v in after.values()} == {torch.float32}
    assert any(not torch.equal(after[k], before[k]) for k in after if k.endswith("lora_B"))


def test_reference_engine_over_a_bf16_base_agrees_with_the_batched_one(tokenizer, task):
    """PEFT keeps LoRA factors in float32 over a bfloat16 base but its head copies in
    bfloat16; the reference engine holds those in float32 too, so both engines take the same
    steps."""
    from declora.engine.reference import ReferenceEngine

    examples = synthetic_examples(tokenizer, 40)
    finals = {}
    for cls in (BatchedEngine, ReferenceEngine):
        model = tiny_bert().to(torch.bfloat16)
        spec = build_spec(model, ["query", "value"], r=4, alpha=8, dropout=0.0, train_head=True)
        init = initial_state(model, spec, seed=0)
        engine = cls(model, spec, 2, init, task, optimizer="sgd", lr=0.5, momentum=0.9)
        for s in range(4):
            engine.train_step([examples[8 * s : 8 * s + 4], examples[8 * s + 4 : 8 * s + 8]])
        finals[cls] = engine.stacked()
        assert {v.dtype for v in finals[cls].values()} == {torch.float32}
    batched, ref = finals[BatchedEngine], finals[ReferenceEngine]
    assert batched.keys() == ref.keys()
    for k in batched:
        assert float((batched[k] - ref[k]).norm() / ref[k].norm()) < 1e-5, k
        if not k.endswith("lora_A"):  # B and the head moved (A barely, behind a B near 0)
            assert not torch.equal(ref[k], init[k].expand_as(ref[k])), k
