"""Held-out evaluation of causal LMs: answer-token loss and perplexity, generated answers.

Perplexity is exp of the mean negative log-likelihood over all held-out answer tokens (the
prompt and template never count). The answer-match score greedily generates answers for a fixed
subset of held-out prompts and compares them with the reference answers by token F1 after
SQuAD-style normalisation: a coarse check that the model says the right thing, not only that it
assigns the right words a high probability.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from declora.model.adapters import average
from declora.tasks.evaluate import peers_outputs
from declora.tasks.task import CausalLMTask, Example

if TYPE_CHECKING:
    from declora.engine.round_loop import Engine

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> list[str]:
    """Lower case, no punctuation, no articles, split on white space."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCT))
    return text.split()


def answer_f1(prediction: str, reference: str) -> float:
    """Token-overlap F1 between two answers (1.0 when both are empty)."""
    pred, ref = normalize_answer(prediction), normalize_answer(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def _loss_metrics(nll: float, tokens: float, examples: int) -> dict[str, float]:
    loss = nll / max(tokens, 1.0)
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "eval_examples": examples,
        "eval_tokens": int(tokens),
    }


class LMEvaluator:
    """Held-out answer-token loss/perplexity of the averaged model and of each peer's model,
    plus generated answers from the averaged model at the end."""

    primary = "perplexity"
    columns = ("loss", "perplexity", "answer_f1")
    higher_is_better = False

    def __init__(
        self,
        task: CausalLMTask,
        test: Sequence[Example],
        prompts: Sequence[tuple[list[int], str]],
        *,
        batch_size: int = 16,
        max_examples: int | None = None,
        final_max_examples: int | None = None,
        peer_max_examples: int | None = None,
        generate_examples: int = 0,
        max_new_tokens: int = 32,
        samples: Sequence[tuple[str, list[int]]] = (),
        seed: int = 0,
    ) -> None:
        self.task, self.test, self.batch_size = task, test, batch_size
        order = np.random.default_rng(seed).permutation(len(test))
        self.avg_idx = self._by_length(order[: max_examples or len(test)])
        self.final_idx = self._by_length(order[: final_max_examples or len(test)])
        self.peer_idx = self._by_length(order[: peer_max_examples or len(test)])
        gen_order = np.random.default_rng(seed).permutation(len(prompts))[:generate_examples]
        self.gen = [prompts[i] for i in sorted(gen_order, key=lambda i: len(prompts[i][0]))]
        self.max_new_tokens = max_new_tokens
        self.samples = list(samples)

    def _by_length(self, idx: np.ndarray) -> np.ndarray:
        return np.array(sorted(idx, key=lambda i: len(self.test[i]["input_ids"])), dtype=np.int64)

    def _batches(self, idx: np.ndarray, size: int) -> list[list[Example]]:
        return [[self.test[i] for i in idx[s : s + size]] for s in range(0, len(idx), size)]

    def average(self, engine: Engine, *, final: bool = False) -> dict[str, float]:
        idx = self.final_idx if final else self.avg_idx
        values = average(engine.stacked())
        out = torch.cat(
            [engine.outputs_single(values, b) for b in self._batches(idx, self.batch_size)]
        )
        metrics = _loss_metrics(float(out[:, 0].sum()), float(out[:, 1].sum()), len(idx))
        if final and self.gen:
            metrics.update(self.answer_match(engine, values))
        return metrics

    def peers(self, engine: Engine) -> list[dict[str, float]]:
        size = max(1, self.batch_size // max(1, min(engine.n, 8)))
        out = peers_outputs(engine, self._batches(self.peer_idx, size))
        return [
            {
                k: v
                for k, v in _loss_metrics(float(o[:, 0].sum()), float(o[:, 1].sum()), 0).items()
                if k in ("loss", "perplexity")
            }
            for o in out
        ]

    def _generate(self, engine: Engine, values: dict[str, torch.Tensor], prompts: list) -> list:
        texts = []
        with engine.use_single(values) as model:
            for s in range(0, len(prompts), self.batch_size):
                outs = self.task.generate(
                    model, prompts[s : s + self.batch_size], self.max_new_tokens
                )
                texts += [
                    self.task.tokenizer.decode(o, skip_special_tokens=True).strip() for o in outs
                ]
        return texts

    def answer_match(self, engine: Engine, values: dict[str, torch.Tensor]) -> dict[str, float]:
        """Mean token F1 and exact match of greedy answers against the references."""
        answers = self._generate(engine, values, [p for p, _ in self.gen])
        refs = [r for _, r in self.gen]
        f1 = [answer_f1(a, r) for a, r in zip(answers, refs, strict=True)]
        exact = [
            normalize_answer(a) == normalize_answer(r) for a, r in zip(answers, refs, strict=True)
        ]
        return {
            "answer_f1": float(np.mean(f1)),
            "answer_exact": float(np.mean(exact)),
            "answer_examples": len(f1),
        }

    def extras(self, engine: Engine) -> dict[str, Any]:
        """Answers of the averaged model to the fixed sample prompts, for the report."""
        if not self.samples:
            return {}
        values = average(engine.stacked())
        answers = self._generate(engine, values, [ids for _, ids in self.samples])
        return {
            "samples": [
                {"prompt": q, "answer": a} for (q, _), a in zip(self.samples, answers, strict=True)
            ]
        }
