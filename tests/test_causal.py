"""Causal LM path: answer-only loss, batched engine vs PEFT reference, export and generation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import PeftModel
from torch.nn import functional as F
from transformers import LlamaForCausalLM

from declora.algorithms import make_plan
from declora.data.partition import partition
from declora.engine.batched import BatchedEngine
from declora.engine.reference import ReferenceEngine
from declora.engine.round_loop import LoopHooks, LoopParts, LoopSettings, train
from declora.model.adapters import average, build_spec, initial_state
from declora.model.export import save_peft_adapter
from declora.network.topology import build_topology
from declora.tasks.lm_eval import LMEvaluator, answer_f1, normalize_answer
from declora.tasks.task import IGNORE, CausalLMTask
from tests.conftest import tiny_llama as shared_tiny_llama

VOCAB, PAD, EOS = 64, 0, 1
N_PEERS = 4


class ToyTokenizer:
    """Just what CausalLMTask needs from a tokenizer: ids of pad/eos, decode."""

    pad_token_id, eos_token_id, unk_token_id = PAD, EOS, 2

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.unk_token_id

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return " ".join(f"t{i}" for i in ids if not (skip_special_tokens and i in (PAD, EOS)))


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """The shared tiny Llama on a 64-token vocabulary, with embeddings large enough (init 0.2)
    for the normed hidden state to single out a token."""
    return shared_tiny_llama(
        seed,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        initializer_range=0.2,
        pad_token_id=PAD,
        bos_token_id=3,
        eos_token_id=EOS,
    )


def chat_examples(n: int, seed: int = 0) -> list[dict]:
    """Prompt tokens (no loss), then an answer that depends on the prompt's first token, EOS."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        prompt = rng.integers(4, VOCAB, size=rng.integers(3, 9)).tolist()
        g = prompt[0] % 3
        answer = [10 + g, 20 + g, 30, EOS]
        ids = prompt + answer
        labels = [IGNORE] * len(prompt) + answer
        out.append({"input_ids": ids, "labels": labels, "group": int(g)})
    return out


def test_loss_counts_answer_tokens_only():
    model, task = tiny_llama(), CausalLMTask(ToyTokenizer())
    examples = chat_examples(6)
    batch = task.collate(examples)
    # manual reference: full logits, shifted, only positions whose next token is an answer token
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    per_row = []
    for i, ex in enumerate(examples):
        k = len(ex["input_ids"])
        tgt = torch.tensor(ex["labels"][1:k])
        keep = tgt != IGNORE
        per_row.append(F.cross_entropy(logits[i, : k - 1][keep], tgt[keep], reduction="sum").item())
    out = task.outputs(model, batch)
    assert out[:, 1].tolist() == [sum(t != IGNORE for t in ex["labels"]) for ex in examples]
    torch.testing.assert_close(out[:, 0], torch.tensor(per_row), atol=1e-4, rtol=1e-5)
    # peers: rows 0-2 and 3-5, each a token-weighted mean
    losses = task.peer_losses(model, batch, 2)
    want = [sum(per_row[:3]) / out[:3, 1].sum(), sum(per_row[3:]) / out[3:, 1].sum()]
    torch.testing.assert_close(losses, torch.tensor(want, dtype=losses.dtype), atol=1e-4, rtol=1e-5)
    # marking the answer as prompt removes it from the loss: nothing left means zero tokens
    hidden = [{**ex, "labels": [IGNORE] * len(ex["labels"])} for ex in examples[:2]]
    assert task.outputs(model, task.collate(hidden))[:, 1].sum() == 0


def test_prompt_tokens_do_not_receive_loss_gradient_targets():
    """Changing the label ids of prompt positions (they are IGNORE) changes nothing; changing
    an answer token changes the loss."""
    model, task = tiny_llama(), CausalLMTask(ToyTokenizer())
    ex = chat_examples(1)[0]
    base = task.outputs(model, task.collate([ex]))
    moved = dict(ex, labels=list(ex["labels"]))
    moved["labels"][-2] = (moved["labels"][-2] + 1) % VOCAB or 4
    moved["input_ids"] = list(ex["input_ids"])
    moved["input_ids"][-2] = moved["labels"][-2]
    assert not torch.equal(task.outputs(model, task.collate([moved])), base)


def _run(
    engine_cls,
    algorithm="dec-lora",
    *,
    targets=("q_proj", "v_proj"),
    chunk=None,
    optimizer="adamw",
    rounds=3,
    local_steps=2,
    lr=None,
):
    model, task = tiny_llama(), CausalLMTask(ToyTokenizer())
    spec = build_spec(model, list(targets), r=4, alpha=8, dropout=0.0, train_head=False)
    init = initial_state(model, spec, seed=0)
    examples = chat_examples(80)
    groups = np.array([e["group"] for e in examples])
    parts = partition(groups, N_PEERS, "dirichlet", seed=0, alpha=1.0, min_size=4)
    plan = make_plan(algorithm, build_topology("ring", N_PEERS, "laplacian"), parts, 3)
    kwargs = dict(
        lr=lr or (1e-2 if optimizer == "adamw" else 0.5),
        optimizer=optimizer,
        total_steps=rounds * local_steps,
        schedule="linear",
    )
    if engine_cls is BatchedEngine:
        kwargs["peer_chunk"] = chunk
    engine = engine_cls(model, spec, plan.n, init, task, **kwargs)
    evaluator = LMEvaluator(task, examples[:20], [], batch_size=8)
    res = train(
        LoopParts(
            engine,
            plan,
            evaluator,
        ),
        examples,
        LoopSettings(
            rounds=rounds,
            local_steps=local_steps,
            seed=0,
            eval_every=rounds,
            lora_modules=spec.lora_modules,
        ),
        LoopHooks(progress=False),
    )
    return res, engine, spec


@pytest.mark.parametrize(
    ("targets", "chunk", "optimizer"),
    [(("q_proj", "v_proj"), None, "adamw"), (("all-linear",), 3, "sgd")],
)
def test_batched_matches_reference_on_llama(targets, chunk, optimizer):
    batched, _, spec = _run(BatchedEngine, targets=targets, chunk=chunk, optimizer=optimizer)
    ref, _, _ = _run(ReferenceEngine, targets=targets, optimizer=optimizer)
    assert "lm_head" not in " ".join(spec.lora_modules)
    if targets == ("all-linear",):  # q, k, v, o, gate, up, down in both layers
        assert len(spec.lora_modules) == 14
    for k in batched.final:
        torch.testing.assert_close(batched.final[k], ref.final[k], atol=1e-5, rtol=1e-4)
    b = [float(v.abs().max()) for k, v in batched.final.items() if k.endswith("lora_B")]
    assert min(b) > 1e-6
    last_b, last_r = batched.records[-1], ref.records[-1]
    assert last_b["perplexity"] == pytest.approx(last_r["perplexity"], rel=1e-4)
    assert last_b["peers_perplexity"] == pytest.approx(last_r["peers_perplexity"], rel=1e-4)


def test_training_lowers_heldout_perplexity():
    res, _, _ = _run(BatchedEngine, targets=("all-linear",), rounds=20, local_steps=2, lr=5e-2)
    first = _run(BatchedEngine, rounds=1, local_steps=1)[0].records[-1]["perplexity"]
    assert res.records[-1]["perplexity"] < 0.25 * first


def test_export_loads_in_peft_and_generates_the_same(tmp_path):
    res, engine, spec = _run(BatchedEngine, rounds=4)
    values = average(res.final)
    task = engine.task
    examples = chat_examples(5, seed=3)
    want = engine.outputs_single(values, examples)
    prompts = [
        ex["input_ids"][: ex["labels"].index(next(t for t in ex["labels"] if t != IGNORE))]
        for ex in examples
    ]
    with engine.use_single(values) as model:
        gen_engine = task.generate(model, prompts, max_new_tokens=6)
    engine.remove()
    save_peft_adapter(tmp_path / "avg", spec, values, "tiny-llama", "CAUSAL_LM")
    peft = PeftModel.from_pretrained(tiny_llama(), tmp_path / "avg").eval()
    assert peft.peft_config["default"].task_type == "CAUSAL_LM"
    got = task.outputs(peft, task.collate(examples))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert task.generate(peft, prompts, max_new_tokens=6) == gen_engine
    assert any(len(g) > 0 for g in gen_engine)


def test_left_padded_generation_matches_one_by_one():
    model, task = tiny_llama(), CausalLMTask(ToyTokenizer())
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14]]
    together = task.generate(model, prompts, max_new_tokens=5)
    alone = [task.generate(model, [p], max_new_tokens=5)[0] for p in prompts]
    assert together == alone


def test_answer_match_normalisation():
    assert normalize_answer("The Eiffel Tower, in Paris!") == ["eiffel", "tower", "in", "paris"]
    assert answer_f1("Paris", "paris.") == 1.0
    assert answer_f1("It is Paris", "Paris") == pytest.approx(2 * (1 / 3) / (1 / 3 + 1))
    assert answer_f1("London", "Paris") == 0.0
