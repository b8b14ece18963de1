"""The PEFT methods Dec-LoRA is compared with, decentralized through the reference engine.

`lora.method` picks one: `lora` (the paper's), `dora` (LoRA factors plus a trained magnitude per
output row), `rslora` (LoRA scaled by alpha / sqrt(r)), `ia3` (a trained vector that scales each
target's output, or its input for `lora.feedforward` modules) and `prompt-tuning`
(`lora.virtual_tokens` trained embeddings prepended to every input). Whatever the method, each
peer's trainable tensors (and the classification head) are what it sends and mixes, all peers
start from the same seeded adapter, and the averaged model is the mean of every tensor.

Methods other than `lora` run on the reference engine (one PEFT model with a named adapter per
peer): a run selects it by itself. This module holds what is specific to a method: its PEFT
config, the names of its parameters inside a PEFT model and in PEFT's saved adapter, and the
checks that refuse combinations that cannot work, before any work starts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from declora.config.schema import peer_ranks
from declora.errors import ConfigError
from declora.model.adapters import (
    IA3_VECTOR,
    LORA_METHODS,
    MAGNITUDE,
    METHODS,
    PROMPT,
    AdapterSpec,
    build_spec,
)

if TYPE_CHECKING:
    from peft import PeftConfig

    from declora.config.schema import RunConfig

__all__ = [
    "METHODS",
    "adapter_config",
    "method_spec",
    "peft_key",
    "peft_param_name",
]


def adapter_config(
    spec: AdapterSpec, task_type: str | None = None, base_model: str | None = None
) -> PeftConfig:
    """PEFT's config of the adapter `spec` describes (targets by their full module names).

    Prompt tuning always needs a task type (PEFT's task model prepends the virtual tokens);
    the other methods work on the bare model and take one only for the saved config."""
    from peft import IA3Config, LoraConfig, PromptTuningConfig  # (2-3 s: only when needed)

    modules_to_save = [spec.head_root] if spec.head_modules else None
    common = dict(task_type=task_type, base_model_name_or_path=base_model)
    if spec.method in LORA_METHODS:
        extra = {}
        if spec.method == "dora":
            extra["use_dora"] = True
        if spec.method == "rslora":
            extra["use_rslora"] = True
        return LoraConfig(
            r=spec.r,
            lora_alpha=spec.alpha,
            lora_dropout=spec.dropout,
            target_modules=list(spec.lora_modules),
            modules_to_save=modules_to_save,
            **extra,
            **common,
        )
    if spec.method == "ia3":
        return IA3Config(
            target_modules=list(spec.ia3_modules),
            feedforward_modules=list(spec.feedforward_modules),
            modules_to_save=modules_to_save,
            **common,
        )
    if spec.method == "prompt-tuning":
        common["task_type"] = task_type or "SEQ_CLS"
        return PromptTuningConfig(
            num_virtual_tokens=spec.virtual_tokens,
            prompt_tuning_init="RANDOM" if spec.prompt_init == "random" else "SAMPLE_VOCAB",
            modules_to_save=modules_to_save,
            **common,
        )
    raise ValueError(f"unknown PEFT method {spec.method!r}; choose one of: {', '.join(METHODS)}")


def _head_prefix(spec: AdapterSpec) -> str:
    """Where the base model sits in a PEFT model: prompt learning wraps it directly."""
    return "base_model." if spec.method == "prompt-tuning" else "base_model.model."


def peft_param_name(spec: AdapterSpec, canonical: str, adapter: str) -> str:
    """The parameter of one named adapter inside a PEFT model, for a canonical name."""
    if canonical == PROMPT:
        return f"prompt_encoder.{adapter}.embedding.weight"
    module, _, leaf = canonical.rpartition(".")
    if leaf in ("lora_A", "lora_B", MAGNITUDE):
        return f"base_model.model.{module}.{leaf}.{adapter}.weight"
    if leaf == IA3_VECTOR:
        return f"base_model.model.{module}.{leaf}.{adapter}"
    root = spec.head_root or ""
    rest = module[len(root) :]
    return f"{_head_prefix(spec)}{root}.modules_to_save.{adapter}{rest}.{leaf}"


def peft_key(spec: AdapterSpec, canonical: str) -> str:
    """The key of a canonical parameter in PEFT's saved adapter_model.safetensors."""
    if canonical == PROMPT:
        return "prompt_embeddings"
    module, _, leaf = canonical.rpartition(".")
    if leaf in ("lora_A", "lora_B"):
        return f"base_model.model.{module}.{leaf}.weight"
    if leaf in (MAGNITUDE, IA3_VECTOR):
        return f"base_model.model.{module}.{leaf}"
    return f"{_head_prefix(spec)}{module}.{leaf}"


def method_spec(model: nn.Module, cfg: RunConfig) -> AdapterSpec:
    """The adapter spec of a run's `lora` settings on its model."""
    lo = cfg.lora
    if lo.method == "prompt-tuning":
        limit = getattr(model.config, "max_position_embeddings", None)
        need = cfg.data.max_length + lo.virtual_tokens
        if limit and need > limit:
            raise ConfigError(
                f"lora.virtual_tokens={lo.virtual_tokens} plus data.max_length="
                f"{cfg.data.max_length} exceed the model's {limit} positions; lower one of them"
            )
    ranks = peer_ranks(cfg)
    r, alpha = lo.r, lo.alpha
    if ranks is not None:  # held at the largest rank, with the scale alpha / r of lora.r
        r, alpha = max(ranks), lo.alpha / lo.r * max(ranks)
    spec = build_spec(
        model,
        lo.targets,
        r,
        alpha,
        lo.dropout,
        lo.train_head,
        method=lo.method,
        feedforward=lo.feedforward,
        virtual_tokens=lo.virtual_tokens,
        prompt_init=lo.prompt_init,
    )
    if ranks is not None:
        for name in spec.lora_modules:
            lin = model.get_submodule(name)
            width = min(lin.in_features, lin.out_features)
            if r > width:
                raise ConfigError(
                    f"lora.ranks: rank {r} is above the width of layer {name} ({width}); "
                    f"ranks must be 1..{width}"
                )
    return spec
