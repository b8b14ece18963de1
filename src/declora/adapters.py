"""What to adapt: target LoRA modules, the trained head, and the common initial adapter.

Parameters are named canonically, independent of the engine: `<module>.lora_A` ([r, in]),
`<module>.lora_B` ([out, r]) for each adapted linear and `<head>.weight` / `<head>.bias` for each
linear of the trained head. Stacked values carry an extra leading peer axis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from declora.errors import ConfigError
from declora.stacked import lora_a_init

HEAD_NAMES = ("classifier", "score")


@dataclass(frozen=True)
class AdapterSpec:
    """The adapted modules of one model and the LoRA hyper-parameters all peers share."""

    lora_modules: tuple[str, ...]
    head_modules: tuple[str, ...]
    head_root: str | None
    r: int
    alpha: float
    dropout: float

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def find_head(model: nn.Module) -> str | None:
    """The task head that trains fully (PEFT's modules_to_save for sequence classification)."""
    names = dict(model.named_modules())
    return next((h for h in HEAD_NAMES if h in names), None)


def _linear_names(model: nn.Module, skip: str | None) -> list[str]:
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and not (skip and (n == skip or n.startswith(skip + ".")))
    ]


def find_targets(model: nn.Module, targets: list[str], head: str | None) -> list[str]:
    """Resolve target names as PEFT does: exact name or a '.'-suffix; 'all-linear' = every linear
    layer outside the head (and outside a language-model output layer)."""
    linears = _linear_names(model, head)
    if targets == ["all-linear"]:
        found = [n for n in linears if n.split(".")[-1] != "lm_head"]
    else:
        found = [n for n in linears if any(n == t or n.endswith("." + t) for t in targets)]
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in linears)]
        if missing:
            leaves = sorted({n.split(".")[-1] for n in linears})
            raise ConfigError(
                f"lora.targets {missing} match no linear layer of this model; "
                f"its linear layers are named: {', '.join(leaves)} (or use all-linear)"
            )
    if not found:
        raise ConfigError("lora.targets match no linear layer of this model")
    return found


def build_spec(
    model: nn.Module, targets: list[str], r: int, alpha: float, dropout: float, train_head: bool
) -> AdapterSpec:
    head = find_head(model) if train_head else None
    heads: list[str] = []
    if head is not None:
        root = model.get_submodule(head)
        if isinstance(root, nn.Linear):
            heads = [head]
        else:
            heads = [f"{head}.{n}" for n, m in root.named_modules() if isinstance(m, nn.Linear)]
    lora = find_targets(model, targets, head)
    return AdapterSpec(tuple(lora), tuple(heads), head, r, alpha, dropout)


def initial_state(model: nn.Module, spec: AdapterSpec, seed: int) -> dict[str, torch.Tensor]:
    """The one adapter every peer starts from: A random (seeded), B = 0, head as loaded."""
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name in spec.lora_modules:
        lin = model.get_submodule(name)
        state[f"{name}.lora_A"] = lora_a_init(spec.r, lin.in_features, gen)
        state[f"{name}.lora_B"] = torch.zeros(lin.out_features, spec.r)
    for name in spec.head_modules:
        lin = model.get_submodule(name)
        state[f"{name}.weight"] = lin.weight.detach().clone()
        if lin.bias is not None:
            state[f"{name}.bias"] = lin.bias.detach().clone()
    return state


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, module)


def make_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, total_steps: int | None
) -> torch.optim.lr_scheduler.LambdaLR:
    """Learning-rate factor per completed step: constant, or linear / cosine decay to zero over
    `total_steps` (a decayed rate lets noisy SGD settle instead of ending on a random swing)."""
    if schedule == "constant" or not total_steps:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    if schedule == "linear":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: max(0.0, 1.0 - step / total_steps)
        )
    if schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps)),
        )
    raise ValueError(f"unknown schedule {schedule!r}")


def make_optimizer(
    name: str, groups: list[dict], lr: float, weight_decay: float, momentum: float
) -> torch.optim.Optimizer:
    """AdamW or SGD over (stacked) parameters. Both are element-wise, so one optimizer over
    tensors stacked along a peer axis is exactly one independent optimizer per peer."""
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}")


@dataclass(frozen=True)
class OptimSettings:
    """How every peer optimizes its own parameters; shared by both engines."""

    lr: float
    head_lr: float | None = None
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    optimizer: str = "adamw"
    momentum: float = 0.9
    schedule: str = "constant"
    total_steps: int | None = None

    def build(
        self, lora: list[torch.nn.Parameter], head: list[torch.nn.Parameter], scale: float = 1.0
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        """Optimizer (LoRA factors at lr, head at head_lr, both times `scale`) and its
        learning-rate schedule."""
        groups: list[dict] = [{"params": lora, "lr": self.lr * scale}]
        if head:
            groups.append({"params": head, "lr": (self.head_lr or self.lr) * scale})
        opt = make_optimizer(self.optimizer, groups, self.lr, self.weight_decay, self.momentum)
        return opt, make_scheduler(opt, self.schedule, self.total_steps)
