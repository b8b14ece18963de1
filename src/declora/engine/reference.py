"""The reference engine: one PEFT model with a named adapter per peer, peers one after another.

Slow but obviously right. Tests hold the batched engine to it; it also exposes the same
`stacked()` / `load_stacked()` view so the round loop and the gossip code are shared, and the
same switches for frozen factors (`set_trainable`) and peers that sit a step out (`active`).

It runs every PEFT method of `declora.model.peft_methods` (the spec's `method`: LoRA, DoRA, rsLoRA,
IA3, prompt tuning): the peers' trainable tensors, named canonically, are whatever PEFT's adapter
of that method trains, plus the classification head (PEFT's modules_to_save).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from peft import PeftModel, get_peft_model
from peft.utils import AuxiliaryTrainingWrapper
from torch import nn

from declora.engine.batched import as_active_mask
from declora.engine.state import TrainingState
from declora.model.adapters import (
    LORA_METHODS,
    AdapterSpec,
    OptimSettings,
    at_rank,
    padded,
    ranked_spec,
    set_submodule,
)
from declora.model.peft_methods import adapter_config, peft_param_name
from declora.model.stacked import trainable_dtype
from declora.network.mixing import LORA_FACTORS, check_factors, factor_of
from declora.tasks.task import Example, SingleAdapterOutputs, Task

__all__ = ["ReferenceEngine", "lora_config", "peer_name", "peft_param_name"]


#: The extra adapter that scores the averaged model when peers differ in rank.
SINGLE = "single"


def peer_name(i: int) -> str:
    return f"peer-{i}"


def lora_config(spec: AdapterSpec):
    """PEFT's config of the spec's adapter on the bare model (any method, despite the name)."""
    return adapter_config(spec)


def _adapter_params(named: dict[str, nn.Parameter], adapter: str) -> dict[str, nn.Parameter]:
    """Every parameter of one named adapter (its name is one segment of the parameter's)."""
    return {n: p for n, p in named.items() if adapter in n.split(".")}


class ReferenceEngine(SingleAdapterOutputs, TrainingState):
    """n PEFT adapters on one model, trained peer by peer, each with its own optimizer.

    `init` names every trainable tensor of the spec's method (see `declora.model.adapters`); a
    parameter PEFT trains that `init` does not name is refused, except a head copy when the head
    does not train (prompt tuning's task model always adds one), which stays frozen."""

    def __init__(
        self,
        model: nn.Module,
        spec: AdapterSpec,
        n_peers: int,
        init: dict[str, torch.Tensor],
        task: Task,
        *,
        peer_weights: Sequence[float] | None = None,
        ranks: Sequence[int] | None = None,
        **optim: Any,
    ) -> None:
        """`peer_weights` scale each peer's updates (its learning rate); `ranks` gives each
        peer a PEFT adapter of its own true rank (same scale alpha / r), whose factors the
        stacked view zero-pads to spec.r; `optim` holds the fields of `OptimSettings`."""
        self.spec, self.n, self.task = spec, n_peers, task
        settings = OptimSettings(**optim)
        self.max_grad_norm = settings.max_grad_norm
        self.ranks = None if ranks is None or all(r == spec.r for r in ranks) else list(ranks)
        if self.ranks is not None and len(self.ranks) != n_peers:
            raise ValueError(f"expected {n_peers} ranks, got {len(self.ranks)}")
        configs = [
            adapter_config(spec if self.ranks is None else ranked_spec(spec, r))
            for r in (self.ranks or [spec.r] * n_peers)
        ]
        self.model: PeftModel = get_peft_model(model, configs[0], adapter_name=peer_name(0))
        for i in range(1, n_peers):
            self.model.add_adapter(peer_name(i), configs[i])
        if self.ranks is not None:  # the averaged model, at the largest rank, is scored here
            self.model.add_adapter(SINGLE, adapter_config(spec))
        self._float32_head_copies()
        named = dict(self.model.named_parameters())
        self.names = list(init)
        absent = [k for k in self.names if peft_param_name(spec, k, peer_name(0)) not in named]
        if absent:
            self.remove()
            raise ValueError(f"PEFT's {spec.method} adapter has no parameter for {absent[:3]}")
        self.peer_params: list[dict[str, nn.Parameter]] = [
            {k: named[peft_param_name(spec, k, peer_name(i))] for k in self.names}
            for i in range(n_peers)
        ]
        self.single_params = (
            None
            if self.ranks is None
            else {k: named[peft_param_name(spec, k, SINGLE)] for k in self.names}
        )
        self.untracked: list[list[nn.Parameter]] = []  # kept frozen
        for i, params in enumerate(self.peer_params):
            tracked = {id(p) for p in params.values()}
            extra = {
                n: p
                for n, p in _adapter_params(named, peer_name(i)).items()
                if id(p) not in tracked
            }
            unknown = [n for n in extra if "modules_to_save" not in n.split(".")]
            if unknown:
                self.remove()
                raise ValueError(f"init does not name the trainable parameters {unknown[:3]}")
            self.untracked.append(list(extra.values()))
        self.load_stacked({k: v.unsqueeze(0).expand(n_peers, *v.shape) for k, v in init.items()})
        self.trainable: frozenset[str] = LORA_FACTORS
        heads = set(spec.head_modules)
        self.optimizers, self.schedulers = [], []
        weights = list(peer_weights) if peer_weights is not None else [1.0] * n_peers
        for params, w in zip(self.peer_params, weights, strict=True):
            lora = [p for k, p in params.items() if k.rpartition(".")[0] not in heads]
            head = [p for k, p in params.items() if k.rpartition(".")[0] in heads]
            opt, sched = settings.build(lora, head, scale=float(w))
            self.optimizers.append(opt)
            self.schedulers.append(sched)

    def _float32_head_copies(self) -> None:
        """Over a half-precision base, the head's trained copies (PEFT keeps them in the base's
        dtype) are held in float32 like the factors, their input cast to it: the batched
        engine's head does the same (`declora.model.stacked.trainable_dtype`)."""
        root = self.spec.head_root
        if not self.spec.head_modules or root is None:
            return
        wrapper = self.model.get_base_model().get_submodule(root)
        if not isinstance(wrapper, AuxiliaryTrainingWrapper):
            return
        dtypes = {p.dtype for p in wrapper.original_module.parameters()}
        if all(trainable_dtype(d) == d for d in dtypes):
            return
        for copy in wrapper.modules_to_save.values():
            copy.float()

        def to_float32(_module: nn.Module, args: tuple) -> tuple:
            return tuple(
                a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                for a in args
            )

        wrapper.register_forward_pre_hook(to_float32)

    def remove(self) -> nn.Module:
        """Strip the PEFT wrappers so the base model can be reused as it was loaded: the head's
        original module goes back in (PEFT's own unload would keep the active adapter's
        trained copy)."""
        base = self.model.get_base_model()
        for name, module in list(base.named_modules()):
            if isinstance(module, AuxiliaryTrainingWrapper):
                set_submodule(base, name, module.original_module)
        if self.model.peft_config[peer_name(0)].is_prompt_learning:
            return base  # no layer was wrapped
        return self.model.unload()

    def set_trainable(self, factors: Iterable[str]) -> None:
        """Only these LoRA factors ('lora_A', 'lora_B') and the head get gradients from now on;
        frozen ones get none, so each peer's optimizer skips them and keeps their state.
        Other tensors of the method (DoRA's magnitudes) keep training."""
        chosen = check_factors(factors)
        if chosen != LORA_FACTORS and self.spec.method not in LORA_METHODS:
            raise ValueError(f"lora.method={self.spec.method} has no LoRA factors to freeze")
        self.trainable = chosen

    def _freeze(self, i: int) -> None:
        """Apply `trainable` to peer i: PEFT's `set_adapter` makes the active adapter fully
        trainable, so this runs after it."""
        for k, p in self.peer_params[i].items():
            factor = factor_of(k)
            if factor is not None:
                p.requires_grad_(factor in self.trainable)
        for p in self.untracked[i]:
            p.requires_grad_(False)

    def train_step(
        self,
        peer_examples: Sequence[Sequence[Example]],
        active: Sequence[bool] | np.ndarray | None = None,
    ) -> torch.Tensor:
        """One optimizer step per active peer, one peer after another; returns each peer's
        mean loss, NaN for a peer that sat out. An inactive peer's examples are ignored, its
        optimizer does not step, but its learning-rate schedule advances (it follows the global
        step count, as in the batched engine)."""
        mask = as_active_mask(active, self.n)
        self.model.train()
        losses = []
        for i, examples in enumerate(peer_examples):
            if mask is not None and not mask[i]:
                with warnings.catch_warnings():  # stepping a schedule before its optimizer
                    warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step")
                    self.schedulers[i].step()
                losses.append(torch.full((1,), float("nan")))
                continue
            self.model.set_adapter(peer_name(i))
            self._freeze(i)
            opt = self.optimizers[i]
            opt.zero_grad(set_to_none=True)
            loss = self.task.peer_losses(self.model, self.task.collate(examples), 1)
            if loss.requires_grad:  # False only when nothing is trainable
                loss.sum().backward()
            if self.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(
                    list(self.peer_params[i].values()), self.max_grad_norm
                )
            opt.step()
            self.schedulers[i].step()
            losses.append(loss.detach())
        return torch.cat(losses)

    def reset_optimizer_state(
        self, factors: frozenset[str], peers: np.ndarray | None = None
    ) -> None:
        """Forget the optimizer state of these LoRA factors, on every peer or on the `peers`
        mask (see BatchedEngine; here each peer's optimizer starts afresh exactly)."""
        chosen = np.ones(self.n, dtype=bool) if peers is None else np.asarray(peers, dtype=bool)
        for i, (opt, params) in enumerate(zip(self.optimizers, self.peer_params, strict=True)):
            if not chosen[i]:
                continue
            for name, p in params.items():
                if factor_of(name) in factors:
                    opt.state.pop(p, None)

    def _optimizers(self) -> tuple[list, list]:
        return list(self.optimizers), list(self.schedulers)

    def momentum(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """Each peer's SGD momentum buffer of these tensors, stacked (zeros before a step)."""
        out = {}
        for k in keys:
            rows = []
            for opt, params in zip(self.optimizers, self.peer_params, strict=True):
                buf = opt.state.get(params[k], {}).get("momentum_buffer")
                rows.append(torch.zeros_like(params[k]) if buf is None else buf.detach())
            out[k] = torch.stack(rows)
        return out

    @torch.no_grad()
    def load_momentum(self, buffers: dict[str, torch.Tensor]) -> None:
        for i, (opt, params) in enumerate(zip(self.optimizers, self.peer_params, strict=True)):
            for k, v in buffers.items():
                state = opt.state[params[k]]
                if state.get("momentum_buffer") is None:
                    state["momentum_buffer"] = torch.zeros_like(params[k])
                state["momentum_buffer"].copy_(v[i])

    def stacked(self) -> dict[str, torch.Tensor]:
        if self.ranks is None:
            return {k: torch.stack([p[k].detach() for p in self.peer_params]) for k in self.names}
        r = self.spec.r
        rows = [padded({k: p[k].detach() for k in self.names}, r) for p in self.peer_params]
        return {k: torch.stack([row[k] for row in rows]) for k in self.names}

    @torch.no_grad()
    def load_stacked(self, values: dict[str, torch.Tensor]) -> None:
        for i, params in enumerate(self.peer_params):
            row = {k: v[i] for k, v in values.items()}
            if self.ranks is not None:  # the peer's own rank: leading rows / columns
                row = at_rank(row, self.ranks[i])
            for k, v in row.items():
                params[k].copy_(v)

    @contextmanager
    def use_single(self, values: dict[str, torch.Tensor]) -> Iterator[nn.Module]:
        """The PEFT model running one adapter given by `values` (loaded into peer 0's slot,
        restored afterwards; with mixed ranks, into an adapter of the largest rank)."""
        if self.single_params is not None:
            self.model.eval()
            self.model.set_adapter(SINGLE)
            with torch.no_grad():
                for k, v in values.items():
                    self.single_params[k].copy_(v)
            yield self.model
            return
        saved = {k: p.detach().clone() for k, p in self.peer_params[0].items()}
        self.model.eval()
        self.model.set_adapter(peer_name(0))
        try:
            with torch.no_grad():
                for k, v in values.items():
                    self.peer_params[0][k].copy_(v)
            yield self.model
        finally:
            with torch.no_grad():
                for k, v in saved.items():
                    self.peer_params[0][k].copy_(v)

    @torch.inference_mode()
    def outputs_all_peers(
        self, examples: Sequence[Example], peers: int | None = None
    ) -> torch.Tensor:
        self.model.eval()
        batch = self.task.collate(examples)
        out = []
        for i in range(min(self.n, peers or self.n)):
            self.model.set_adapter(peer_name(i))
            out.append(self.task.outputs(self.model, batch))
        return torch.stack(out)
