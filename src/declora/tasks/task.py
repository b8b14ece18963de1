"""The task a model is trained on: how examples become a batch, a per-peer loss and outputs.

Engines stay task-agnostic: they hand a task the model and a peer-major batch and get back one
mean loss per peer (training) or one output row per example (evaluation), so the same engines
serve sequence classification and causal language modelling.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn import functional as F

from declora.data.tables import Example
from declora.model.attention import training_attention

IGNORE = -100  # label of tokens that carry no loss (prompt, template, padding)


class Task(Protocol):
    def collate(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]: ...
    def outputs(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...
    def peer_losses(
        self, model: nn.Module, batch: dict[str, torch.Tensor], n_peers: int
    ) -> torch.Tensor: ...
    def row_weight(self, example: Example) -> int: ...


class SingleAdapterOutputs:
    """Shared by the engines: task outputs of one adapter given as values (the averaged model).
    An engine provides `task` and a `use_single(values)` context that yields the model."""

    task: Task

    @torch.inference_mode()
    def outputs_single(
        self, values: dict[str, torch.Tensor], examples: Sequence[Example]
    ) -> torch.Tensor:
        """Task outputs (logits, or per-example NLL) of one adapter given by `values`."""
        with self.use_single(values) as model:  # type: ignore[attr-defined]
            return self.task.outputs(model, self.task.collate(examples))


class ClassificationTask:
    """Sequence classification: cross-entropy on the model's logits; outputs are the logits."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def collate(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        feats = [{k: v for k, v in ex.items() if k != "label"} for ex in examples]
        batch = self.tokenizer.pad(feats, return_tensors="pt")
        batch = dict(batch)
        batch["labels"] = torch.tensor([ex["label"] for ex in examples], dtype=torch.long)
        return batch

    def outputs(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return model(**inputs).logits

    def peer_losses(
        self, model: nn.Module, batch: dict[str, torch.Tensor], n_peers: int
    ) -> torch.Tensor:
        """Mean cross-entropy of each peer's rows; rows are laid out peer-major."""
        with training_attention(model):
            logits = self.outputs(model, batch)
        per_row = F.cross_entropy(logits.float(), batch["labels"], reduction="none")
        return per_row.view(n_peers, -1).mean(dim=1)

    def row_weight(self, example: Example) -> int:
        """What one row counts for in its peer's mean loss: every row alike."""
        return 1


class CausalLMTask:
    """Next-token prediction on the tokens whose label is not IGNORE (the answers).

    Only the positions that carry a loss go through the output layer: with a 49k-token
    vocabulary the full [batch, length, vocab] logits would dominate time and memory, while the
    answer tokens are a fraction of each sequence. Outputs per example are (summed negative
    log-likelihood, token count), from which evaluation computes loss and perplexity.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else tokenizer.eos_token_id)

    def collate(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        """Right-padded input ids, attention mask and labels (IGNORE on padding)."""
        width = max(len(ex["input_ids"]) for ex in examples)
        ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for i, ex in enumerate(examples):
            k = len(ex["input_ids"])
            ids[i, :k] = torch.as_tensor(ex["input_ids"])
            labels[i, :k] = torch.as_tensor(ex["labels"])
            mask[i, :k] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def token_nll(
        self, model: nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Negative log-likelihood of every predicted token and the row it belongs to."""
        targets = batch["labels"][:, 1:]
        keep = targets != IGNORE
        head = model.get_output_embeddings()
        decoder = model.get_decoder()
        if head is not None and decoder is not model:
            hidden = decoder(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).last_hidden_state
            logits = head(hidden[:, :-1][keep])
        else:  # a model we cannot split: full logits, then select
            full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            logits = full.logits[:, :-1][keep]
        nll = F.cross_entropy(logits.float(), targets[keep], reduction="none")
        rows = torch.arange(targets.shape[0]).unsqueeze(1).expand_as(targets)[keep]
        return nll, rows

    def outputs(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """[rows, 2]: summed NLL over each example's answer tokens and their count."""
        nll, rows = self.token_nll(model, batch)
        n = batch["input_ids"].shape[0]
        out = torch.zeros(n, 2, dtype=torch.float32)
        out[:, 0].index_add_(0, rows, nll.detach().float())
        out[:, 1].index_add_(0, rows, torch.ones_like(nll, dtype=torch.float32))
        return out

    def peer_losses(
        self, model: nn.Module, batch: dict[str, torch.Tensor], n_peers: int
    ) -> torch.Tensor:
        """Each peer's mean NLL over all answer tokens of its rows (token-weighted)."""
        with training_attention(model):
            nll, rows = self.token_nll(model, batch)
        per_peer_rows = batch["input_ids"].shape[0] // n_peers
        peer = rows // per_peer_rows
        total = torch.zeros(n_peers, dtype=nll.dtype).index_add(0, peer, nll)
        count = torch.zeros(n_peers, dtype=nll.dtype).index_add(0, peer, torch.ones_like(nll))
        return total / count.clamp(min=1.0)

    def row_weight(self, example: Example) -> int:
        """What one row counts for in its peer's mean loss: its predicted answer tokens (the
        mean is over tokens, as in `peer_losses`)."""
        return sum(1 for label in list(example["labels"])[1:] if label != IGNORE)

    @torch.inference_mode()
    def generate(
        self, model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int
    ) -> list[list[int]]:
        """Greedy continuations of left-padded prompts, cut at the first end-of-sequence."""
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.as_tensor(list(p))
            mask[i, width - len(p) :] = 1
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=self.pad_id,
        )
        eos = self._eos_ids()
        result = []
        for row in out[:, width:].tolist():
            cut = next((j for j, t in enumerate(row) if t in eos), len(row))
            result.append(row[:cut])
        return result

    def _eos_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        for tok in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>"):
            tid = self.tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid != self.tokenizer.unk_token_id:
                ids.add(tid)
        return {i for i in ids if i is not None}
