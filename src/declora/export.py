"""Writing adapters in PEFT's own format, so `PeftModel.from_pretrained` loads them."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save_file

from declora.adapters import AdapterSpec


def peft_key(spec: AdapterSpec, canonical: str) -> str:
    """Key of a canonical parameter in PEFT's saved adapter_model.safetensors."""
    module, _, leaf = canonical.rpartition(".")
    if leaf in ("lora_A", "lora_B"):
        return f"base_model.model.{module}.{leaf}.weight"
    return f"base_model.model.{module}.{leaf}"


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
    config = LoraConfig(
        task_type=task_type,
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.lora_modules),
        modules_to_save=[spec.head_root] if spec.head_modules else None,
        base_model_name_or_path=base_model,
    )
    tensors = {
        peft_key(spec, k): v.detach().to("cpu").contiguous().clone() for k, v in values.items()
    }
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(out))
    return out
