"""Writing adapters in PEFT's own format, so `PeftModel.from_pretrained` loads them.

Any method of `declora.model.peft_methods` (LoRA, DoRA, rsLoRA, IA3, prompt tuning): the config is
PEFT's config of the spec, the tensors carry PEFT's saved keys (`peft_key`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from declora.model.adapters import AdapterSpec, at_rank, ranked_spec
from declora.model.peft_methods import adapter_config, peft_key

__all__ = ["peft_key", "save_at_rank", "save_peft_adapter"]


def save_peft_adapter(
    out_dir: str | Path,
    spec: AdapterSpec,
    values: dict[str, torch.Tensor],
    base_model: str,
    task_type: str = "SEQ_CLS",
) -> Path:
    """Write adapter_config.json and adapter_model.safetensors for one adapter."""
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
) -> Path:
    """One adapter held at spec.r (zero beyond `rank`) written at its true rank `rank`, with
    the same scale (alpha = scale x rank): a peer of `lora.ranks`, loadable on its own."""
    if rank != spec.r:
        spec, values = ranked_spec(spec, rank), at_rank(values, rank)
    return save_peft_adapter(out_dir, spec, values, base_model, task_type)
