"""What loading any frozen base shares: local folders, dtypes, bitsandbytes quantization,
and freezing. Both loaders (classifiers and causal LMs) build on it."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
from torch import nn

from declora.errors import ModelError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
QUANTIZE_MODES = ("nf4", "int8")


def local_model_folder(name: str) -> str | None:
    """`name` as a checked local model folder; None when it reads as a hub id instead."""
    p = Path(name).expanduser()
    if p.exists():
        if not p.is_dir() or not (p / "config.json").is_file():
            raise ModelError(
                f"model.name {name!r} is not a model folder: expected a directory with "
                "config.json and weights (a Hugging Face save_pretrained folder)"
            )
        return str(p)
    if name.startswith((".", "/", "~")):
        raise ModelError(f"model.name {name!r}: no such folder")
    return None


def hub_options(path: str, offline_models: str) -> dict[str, Any]:
    """from_pretrained options for what `resolve_*` returned: none for a local folder; for a hub
    id, those of `hub_load_options` (which refuses at once one that cannot be loaded here)."""
    if Path(path).is_dir():
        return {}
    from declora.model.hub import hub_load_options

    return hub_load_options(path, offline_models=offline_models)


def quantization_config(quantize: str | None, dtype: str) -> Any:
    """A BitsAndBytesConfig, or a clear error naming what this machine lacks."""
    if quantize is None:
        return None
    if quantize not in QUANTIZE_MODES:
        raise ModelError(f"model.quantize must be nf4, int8 or null, not {quantize!r}")
    missing = []
    if not torch.cuda.is_available():
        missing.append("this machine has no CUDA device")
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("bitsandbytes is not installed")
    if missing:
        raise ModelError(
            f"model.quantize={quantize} needs a CUDA GPU and the bitsandbytes package "
            f"(pip install bitsandbytes); {' and '.join(missing)}"
        )
    from transformers import BitsAndBytesConfig

    if quantize == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=DTYPES[dtype],
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def frozen(model: nn.Module, tokenizer: Any) -> nn.Module:
    """The base in eval mode with no trainable weights, and a pad token for batching."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
