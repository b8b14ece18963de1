"""Writing adapters in PEFT's own format, so `PeftModel.from_pretrained` loads them.

Any method of `declora.model.peft_methods` (LoRA, DoRA, rsLoRA, IA3, prompt tuning): the config is
PEFT's config of the spec, the tensors carry PEFT's saved keys (`peft_key`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from declora.model.adapters import (
    AdapterSpec,
    at_rank,
    find_head,
    head_linears,
    head_state,
    ranked_spec,
)
from declora.model.peft_methods import adapter_config, peft_key

__all__ = ["peft_key", "save_at_rank", "save_peft_adapter", "with_untrained_head"]


def save_peft_adapter(
    out_dir: str | Path,
    spec: AdapterSpec,
    values: dict[str, torch.Tensor],
    base_model: str,
    task_type: str = "SEQ_CLS",
    *,
    model: nn.Module | None = None,
) -> Path:
    """Write adapter_config.json and adapter_model.safetensors for one adapter.

    With the run's `model`, a classifier's head that was not trained (`lora.train_head=false`)
    is written too: PEFT's sequence-classification model always restores the head from the
    adapter (and fails without it), and the run's head is the one its seed drew."""
    if model is not None and task_type == "SEQ_CLS":
        spec, values = with_untrained_head(model, spec, values)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = adapter_config(spec, task_type, base_model)
    tensors = {
        peft_key(spec, k): v.detach().to("cpu").contiguous().clone() for k, v in values.items()
    }
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(out))
    return out


def save_at_rank(
    out_dir: str | Path,
    spec: AdapterSpec,
    values: dict[str, torch.Tensor],
    rank: int,
    base_model: str,
    task_type: str = "SEQ_CLS",
    *,
    model: nn.Module | None = None,
) -> Path:
    """One adapter held at spec.r (zero beyond `rank`) written at its true rank `rank`, with
    the same scale (alpha = scale x rank): a peer of `lora.ranks`, loadable on its own."""
    if rank != spec.r:
        spec, values = ranked_spec(spec, rank), at_rank(values, rank)
    return save_peft_adapter(out_dir, spec, values, base_model, task_type, model=model)


def with_untrained_head(
    model: nn.Module, spec: AdapterSpec, values: dict[str, torch.Tensor]
) -> tuple[AdapterSpec, dict[str, torch.Tensor]]:
    """The spec and values with the model's head added, where the adapter has none."""
    head = None if spec.head_modules else find_head(model)
    if head is None:
        return spec, values
    heads = tuple(head_linears(model, head))
    return replace(spec, head_modules=heads, head_root=head), {
        **values,
        **head_state(model, heads),
    }
