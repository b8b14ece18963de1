"""`train.length_sort`: a step's rows sorted by length into passes (each row on its own peer's
adapter) give the unsorted step's losses and parameters, with less padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from declora.config.schema import load_config
from declora.engine.batched import BatchedEngine
from declora.model.adapters import build_spec, initial_state
from declora.tasks.task import IGNORE, CausalLMTask
from tests.conftest import synthetic_examples, tiny_bert
from tests.test_causal import EOS, VOCAB, ToyTokenizer
from tests.test_causal import tiny_llama as toy_llama

PEERS = 4


class CountingTask:
    """The task, recording each pass's padded size (rows x longest)."""

    def __init__(self, task) -> None:
        self.task, self.padded = task, 0

    def __getattr__(self, name):
        return getattr(self.task, name)

    def collate(self, examples):
        batch = self.task.collate(examples)
        self.padded += batch["input_ids"].numel()
        return batch


def _steps(model_fn, spec_targets, task, batches, *, sort, active=None, micro=6, steps=2):
    model = model_fn()
    spec = build_spec(model, spec_targets, r=4, alpha=8, dropout=0.0, train_head=False)
    counting = CountingTask(task)
    eng = BatchedEngine(
        model, spec, PEERS, initial_state(model, spec, 0), counting, lr=0.5, optimizer="sgd",
        momentum=0.9, max_grad_norm=1.0, peer_chunk=2, micro_batch=micro, length_sort=sort,
    )  # fmt: skip
    losses = [eng.train_step(batches, active=active) for _ in range(steps)]
    return losses, eng.stacked(), counting.padded


def _assert_same(a, b) -> None:
    (la, sa, _), (lb, sb, _) = a, b
    for x, y in zip(la, lb, strict=True):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5, equal_nan=True)
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=1e-6, rtol=1e-5, msg=k)


@pytest.mark.parametrize("active", [None, [True, False, True, True]])
def test_sorted_passes_give_the_unsorted_step_with_less_padding(tokenizer, task, active):
    examples = synthetic_examples(tokenizer, 4 * PEERS, seed=5)
    batches = [examples[4 * i : 4 * i + 4] for i in range(PEERS)]
    lens = [len(ex["input_ids"]) for ex in examples]
    assert len(set(lens)) > 3  # lengths differ, or sorting could not help
    with_head = dict(model_fn=lambda: tiny_bert(), spec_targets=["query", "value"], task=task)
    plain = _steps(**with_head, batches=batches, sort=False, active=active)
    tidy = _steps(**with_head, batches=batches, sort=True, active=active)
    _assert_same(plain, tidy)
    assert tidy[2] < plain[2]  # fewer padded positions for the same rows
    if active is not None:  # a peer that sits out keeps its values and gets a NaN loss
        assert torch.isnan(tidy[0][0][1])
        before = initial_state(tiny_bert(), build_spec(tiny_bert(), ["query", "value"], r=4,
                               alpha=8, dropout=0.0, train_head=False), 0)  # fmt: skip
        for k, v in tidy[1].items():
            torch.testing.assert_close(v[1], before[k], atol=0, rtol=0)


def test_a_causal_lm_weights_each_row_by_its_answer_tokens():
    """The causal LM's per-peer loss is a mean over answer tokens: rows with longer answers
    count more, in sorted passes as in one pass."""
    rng = np.random.default_rng(3)
    examples = []
    for _ in range(4 * PEERS):
        prompt = rng.integers(4, VOCAB, size=rng.integers(2, 12)).tolist()
        answer = [*rng.integers(4, VOCAB, size=rng.integers(1, 6)).tolist(), EOS]
        examples.append({"input_ids": prompt + answer, "labels": [IGNORE] * len(prompt) + answer})
    task = CausalLMTask(ToyTokenizer())
    assert task.row_weight(examples[0]) == sum(x != IGNORE for x in examples[0]["labels"][1:])
    batches = [examples[4 * i : 4 * i + 4] for i in range(PEERS)]
    llama = dict(model_fn=toy_llama, spec_targets=["q_proj", "v_proj"], task=task)
    plain = _steps(**llama, batches=batches, sort=False, micro=5)
    tidy = _steps(**llama, batches=batches, sort=True, micro=5)
    _assert_same(plain, tidy)
    assert tidy[2] < plain[2]


@pytest.mark.parametrize(
    ("sets", "phrase"),
    [
        (["lora.method=dora"], "train.length_sort needs train.engine=batched"),
        (["train.engine=reference"], "got train.engine=reference"),
        (
            ["privacy.mechanism=dp-sgd", "privacy.epsilon=3"],
            "train.length_sort does not apply to privacy.mechanism=dp-sgd",
        ),
    ],
)
def test_length_sort_refuses_what_it_cannot_sort(sets, phrase):
    from declora.errors import ConfigError

    assert load_config(None, ["train.length_sort=true"]).train.length_sort
    with pytest.raises(ConfigError, match=phrase):
        load_config(None, ["train.length_sort=true", *sets])
