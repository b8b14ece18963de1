"""What to adapt: target LoRA modules, the trained head, and the common initial adapter.

Parameters are named canonically, independent of the engine: `<module>.lora_A` ([r, in]),
`<module>.lora_B` ([out, r]) for each adapted linear and `<head>.weight` / `<head>.bias` for each
linear of the trained head. Stacked values carry an extra leading peer axis.

The other PEFT methods (`AdapterSpec.method`, run by the reference engine) add their own leaves:
DoRA `<module>.lora_magnitude_vector` ([out]) next to the LoRA factors, IA3
`<module>.ia3_l` ([out, 1], or [1, in] for a feed-forward module) and prompt tuning one
`prompt_embeddings` ([virtual tokens, hidden]); rsLoRA has LoRA's names and scales by
alpha / sqrt(r).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from declora.config.schema import TrainConfig
from declora.errors import ConfigError
from declora.model.stacked import lora_a_init, trainable_dtype

HEAD_NAMES = ("classifier", "score")
#: The PEFT methods; all but "lora" run on the reference (PEFT) engine.
METHODS = ("lora", "dora", "rslora", "ia3", "prompt-tuning")
#: The methods that train LoRA factors (`lora_modules` holds their modules).
LORA_METHODS = ("lora", "dora", "rslora")
MAGNITUDE, IA3_VECTOR, PROMPT = "lora_magnitude_vector", "ia3_l", "prompt_embeddings"
#: Leaves of adapter parameters that are vectors or tables, not LoRA factors nor a head.
PLAIN_LEAVES = (MAGNITUDE, IA3_VECTOR, PROMPT)


@dataclass(frozen=True)
class AdapterSpec:
    """The adapted modules of one model and the adapter hyper-parameters all peers share.

    `lora_modules` are the modules with LoRA factors (lora, dora, rslora); IA3 scales
    `ia3_modules` (the input of those in `feedforward_modules`, the output of the others);
    prompt tuning adapts no module and prepends `virtual_tokens` trained embeddings."""

    lora_modules: tuple[str, ...]
    head_modules: tuple[str, ...]
    head_root: str | None
    r: int
    alpha: float
    dropout: float
    method: str = "lora"
    ia3_modules: tuple[str, ...] = ()
    feedforward_modules: tuple[str, ...] = ()
    virtual_tokens: int = 0
    prompt_init: str = "sample-vocab"

    @property
    def scaling(self) -> float:
        """Factor on B A: alpha / r, or alpha / sqrt(r) for rsLoRA."""
        return self.alpha / (math.sqrt(self.r) if self.method == "rslora" else self.r)


def ranked_spec(spec: AdapterSpec, r: int) -> AdapterSpec:
    """The same adapter at rank r with the same scale (alpha / r): one peer's true-rank adapter
    when peers differ in rank (`lora.ranks`), for PEFT's config and the exported adapter."""
    return spec if r == spec.r else replace(spec, r=r, alpha=spec.scaling * r)


def rank_mask(ranks: tuple[int, ...] | list[int], r: int) -> torch.Tensor:
    """[n, r] float mask: 1 in each peer's first r_i rank slots, 0 in the unused ones."""
    return (torch.arange(r).unsqueeze(0) < torch.tensor(list(ranks)).unsqueeze(1)).float()


def at_rank(values: dict[str, torch.Tensor], r: int) -> dict[str, torch.Tensor]:
    """One peer's values (no peer axis) cut to rank r: A's leading r rows, B's leading r
    columns; other tensors as they are."""
    out = {}
    for k, v in values.items():
        leaf = k.rpartition(".")[2]
        out[k] = v[:r] if leaf == "lora_A" else v[:, :r] if leaf == "lora_B" else v
    return out


def padded(values: dict[str, torch.Tensor], r: int) -> dict[str, torch.Tensor]:
    """The inverse of `at_rank`: factors zero-padded to rank r (rows of A, columns of B)."""
    out = {}
    for k, v in values.items():
        leaf = k.rpartition(".")[2]
        if leaf == "lora_A" and v.shape[-2] < r:
            v = torch.cat([v, v.new_zeros(*v.shape[:-2], r - v.shape[-2], v.shape[-1])], dim=-2)
        elif leaf == "lora_B" and v.shape[-1] < r:
            v = torch.cat([v, v.new_zeros(*v.shape[:-1], r - v.shape[-1])], dim=-1)
        out[k] = v
    return out


def find_head(model: nn.Module) -> str | None:
    """The task head that trains fully (PEFT's modules_to_save for sequence classification)."""
    names = dict(model.named_modules())
    return next((h for h in HEAD_NAMES if h in names), None)


def head_linears(model: nn.Module, head: str) -> list[str]:
    """The linear layers of the head module `head` (itself, if it is one)."""
    root = model.get_submodule(head)
    if isinstance(root, nn.Linear):
        return [head]
    return [f"{head}.{n}" for n, m in root.named_modules() if isinstance(m, nn.Linear)]


def head_state(model: nn.Module, heads: tuple[str, ...] | list[str]) -> dict[str, torch.Tensor]:
    """Copies of the weights and biases of the head's linear layers, as trained tensors."""
    state: dict[str, torch.Tensor] = {}
    for name in heads:
        lin = model.get_submodule(name)
        dt = trainable_dtype(lin.weight.dtype)
        state[f"{name}.weight"] = lin.weight.detach().to(dt, copy=True)
        if lin.bias is not None:
            state[f"{name}.bias"] = lin.bias.detach().to(dt, copy=True)
    return state


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
    model: nn.Module,
    targets: list[str],
    r: int,
    alpha: float,
    dropout: float,
    train_head: bool,
    *,
    method: str = "lora",
    feedforward: list[str] | tuple[str, ...] = (),
    virtual_tokens: int = 20,
    prompt_init: str = "sample-vocab",
) -> AdapterSpec:
    """The spec of `method` on `model`: `targets` are the LoRA (or IA3) modules, `feedforward`
    the IA3 targets whose input is scaled; prompt tuning uses neither."""
    if method not in METHODS:
        raise ConfigError(f"lora.method {method!r} is unknown; choose one of: {', '.join(METHODS)}")
    head = find_head(model) if train_head else None
    heads = head_linears(model, head) if head is not None else []
    if method == "prompt-tuning":
        return AdapterSpec(
            (),
            tuple(heads),
            head,
            r,
            alpha,
            dropout,
            method,
            virtual_tokens=virtual_tokens,
            prompt_init=prompt_init,
        )
    found = find_targets(model, targets, head)
    if method != "ia3":
        return AdapterSpec(tuple(found), tuple(heads), head, r, alpha, dropout, method)
    missing = [f for f in feedforward if not any(n == f or n.endswith("." + f) for n in found)]
    if missing:
        raise ConfigError(
            f"lora.feedforward {missing} match none of the IA3 targets (lora.targets); "
            "each feed-forward module must also be a target"
        )
    ff = [n for n in found if any(n == f or n.endswith("." + f) for f in feedforward)]
    return AdapterSpec(
        (),
        tuple(heads),
        head,
        r,
        alpha,
        dropout,
        method,
        ia3_modules=tuple(found),
        feedforward_modules=tuple(ff),
    )


def initial_state(model: nn.Module, spec: AdapterSpec, seed: int) -> dict[str, torch.Tensor]:
    """The one adapter every peer starts from, as PEFT initialises it but from a seeded
    generator: A random, B = 0 (DoRA's magnitude: the row norms of the frozen weight, so the
    model starts as the base model), IA3 vectors 1, prompt embeddings sampled from the
    vocabulary's embeddings (or N(0, 1)); the head as loaded."""
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name in spec.lora_modules:
        lin = model.get_submodule(name)
        state[f"{name}.lora_A"] = lora_a_init(spec.r, lin.in_features, gen)
        state[f"{name}.lora_B"] = torch.zeros(lin.out_features, spec.r)
        if spec.method == "dora":
            state[f"{name}.{MAGNITUDE}"] = torch.linalg.norm(lin.weight.detach(), dim=1).float()
    for name in spec.ia3_modules:
        lin = model.get_submodule(name)
        ff = name in spec.feedforward_modules
        state[f"{name}.{IA3_VECTOR}"] = torch.ones(
            (1, lin.in_features) if ff else (lin.out_features, 1)
        )
    if spec.method == "prompt-tuning":
        emb = model.get_input_embeddings().weight.detach()
        if spec.prompt_init == "random":
            state[PROMPT] = torch.randn(spec.virtual_tokens, emb.shape[1], generator=gen)
        else:
            rows = torch.randint(0, emb.shape[0], (spec.virtual_tokens,), generator=gen)
            state[PROMPT] = emb[rows].float().clone()
    state.update(head_state(model, spec.head_modules))
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


_TRAIN_DEFAULTS = TrainConfig()  # the defaults live in the config schema, and only there


@dataclass(frozen=True)
class OptimSettings:
    """How every peer optimizes its own parameters; shared by both engines. Every default is
    the config's (`train.*`), so an engine built by hand trains like `declora run`."""

    lr: float = _TRAIN_DEFAULTS.lr
    head_lr: float | None = _TRAIN_DEFAULTS.head_lr
    weight_decay: float = _TRAIN_DEFAULTS.weight_decay
    max_grad_norm: float | None = _TRAIN_DEFAULTS.max_grad_norm
    optimizer: str = _TRAIN_DEFAULTS.optimizer
    momentum: float = _TRAIN_DEFAULTS.momentum
    schedule: str = _TRAIN_DEFAULTS.schedule
    total_steps: int | None = None  # None: no decay (the schedule needs the run's length)

    @classmethod
    def of(cls, train: TrainConfig) -> OptimSettings:
        """From the config's `train` section; decays over all of the run's local steps."""
        return cls(
            lr=train.lr,
            head_lr=train.head_lr,
            weight_decay=train.weight_decay,
            max_grad_norm=train.max_grad_norm,
            optimizer=train.optimizer,
            momentum=train.momentum,
            schedule=train.schedule,
            total_steps=train.rounds * train.local_steps,
        )

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


def average(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The paper's evaluated model: each factor (and head) averaged over peers.

    With peers of different ranks (`lora.ranks`) the factors are held zero-padded to the
    largest rank, so a rank slot that k of n peers hold enters with weight k/n in each factor
    (its update with (k/n)^2). Averaging each slot over its holders only was measured worse on
    the demo job (docs/guides/mixed-ranks.md): slots held by peers that never mix with each
    other would add their cross terms at full weight."""
    return {k: v.mean(dim=0) for k, v in values.items()}


def product_average(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The peers' weight average as one adapter of rank n * r: mean_i B_i A_i exactly.

    `average` multiplies the mean factors, (mean B)(mean A), which differs from the mean of
    the updates by the factors' covariance across peers: large while peers disagree (label
    skew on a sparse graph). Stacking the peers' factors, A = [A_1; ...; A_n] and
    B = [B_1 ... B_n] / n, gives B A = mean_i B_i A_i at the same scale s when the adapter's
    alpha keeps s at rank n * r (`ranked_spec`). Other tensors (the head) are averaged."""
    out = {}
    for k, v in values.items():
        n, leaf = v.shape[0], k.rpartition(".")[2]
        if leaf == "lora_A":  # [n, r, in] -> [n r, in]
            out[k] = v.reshape(n * v.shape[1], v.shape[2])
        elif leaf == "lora_B":  # [n, out, r] -> [out, n r], each peer's block over n
            out[k] = v.permute(1, 0, 2).reshape(v.shape[1], n * v.shape[2]) / n
        else:
            out[k] = v.mean(dim=0)
    return out
