"""The batched engine: n peers' adapters stacked on one frozen model, trained in one pass.

Every adapted linear becomes a `StackedLoraLinear` and every head linear a `StackedLinear`.
A local step concatenates the peers' batches peer-major, runs forward/backward once per chunk of
peers, clips each peer's gradient on its own, and takes one AdamW step over the stacked tensors;
AdamW is element-wise, so that is exactly n independent optimizers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from declora.adapters import AdapterSpec, OptimSettings, set_submodule
from declora.stacked import StackedLinear, StackedLoraLinear
from declora.task import Example, SingleAdapterOutputs, Task


def clip_per_peer(params: Sequence[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale each peer's gradient (its slice of every stacked tensor) to norm <= max_norm.

    Same rule as `torch.nn.utils.clip_grad_norm_`, applied per peer. Returns the norms."""
    grads = [p.grad for p in params if p.grad is not None]
    n = grads[0].shape[0]
    sq = torch.zeros(n, dtype=torch.float32, device=grads[0].device)
    for g in grads:
        sq += g.detach().reshape(n, -1).float().pow(2).sum(dim=1)
    norms = sq.sqrt()
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype).view(n, *([1] * (g.dim() - 1))))
    return norms


class BatchedEngine(SingleAdapterOutputs):
    """All peers on one model. `stacked()` exposes name -> [n, ...] tensors for gossip."""

    def __init__(
        self,
        model: nn.Module,
        spec: AdapterSpec,
        n_peers: int,
        init: dict[str, torch.Tensor],
        task: Task,
        *,
        peer_chunk: int | None = None,
        micro_batch: int | None = None,
        peer_weights: Sequence[float] | None = None,
        **optim: Any,
    ) -> None:
        """`peer_weights` scale each peer's updates (as a per-peer learning rate would);
        `optim` holds the fields of `OptimSettings` (lr, head_lr, optimizer, ...)."""
        self.model, self.spec, self.n, self.task = model, spec, n_peers, task
        settings = OptimSettings(**optim)
        self.max_grad_norm = settings.max_grad_norm
        self.peer_chunk = peer_chunk or n_peers
        self.micro_batch = micro_batch
        w = None if peer_weights is None else torch.as_tensor(peer_weights, dtype=torch.float32)
        if w is not None and w.shape != (n_peers,):
            raise ValueError(f"expected {n_peers} peer weights, got {tuple(w.shape)}")
        self.peer_weights = None if w is None or bool((w == 1).all()) else w
        for p in model.parameters():
            p.requires_grad_(False)
        self._originals: dict[str, nn.Module] = {}
        self.layers: list[StackedLoraLinear | StackedLinear] = []
        self.params: dict[str, nn.Parameter] = {}
        for name in spec.lora_modules:
            base = model.get_submodule(name)
            layer = StackedLoraLinear(base, n_peers, spec.r, spec.alpha, spec.dropout)
            self._install(name, base, layer)
            self.params[f"{name}.lora_A"] = layer.lora_A
            self.params[f"{name}.lora_B"] = layer.lora_B
        for name in spec.head_modules:
            base = model.get_submodule(name)
            layer = StackedLinear(base, n_peers)
            self._install(name, base, layer)
            self.params[f"{name}.weight"] = layer.weight
            if layer.bias is not None:
                self.params[f"{name}.bias"] = layer.bias
        self.load_stacked({k: v.unsqueeze(0).expand(n_peers, *v.shape) for k, v in init.items()})
        head = set(self.head_param_names)
        self.optimizer, self.scheduler = settings.build(
            [p for k, p in self.params.items() if k not in head],
            [self.params[k] for k in self.head_param_names],
        )

    @property
    def head_param_names(self) -> list[str]:
        return [k for k in self.params if not (k.endswith(".lora_A") or k.endswith(".lora_B"))]

    def _install(self, name: str, base: nn.Module, layer: nn.Module) -> None:
        self._originals[name] = base
        set_submodule(self.model, name, layer)
        self.layers.append(layer)  # type: ignore[arg-type]

    def remove(self) -> nn.Module:
        """Put the original modules back so the base model can be reused."""
        for name, base in self._originals.items():
            set_submodule(self.model, name, base)
        self._originals.clear()
        return self.model

    def _select(self, peers: slice) -> None:
        for layer in self.layers:
            layer.peers = peers

    def _chunks(self) -> list[tuple[int, int]]:
        c = self.peer_chunk
        return [(lo, min(lo + c, self.n)) for lo in range(0, self.n, c)]

    def train_step(self, peer_examples: Sequence[Sequence[Example]]) -> torch.Tensor:
        """One local optimizer step for every peer; returns each peer's mean loss."""
        if len(peer_examples) != self.n:
            raise ValueError(f"expected batches for {self.n} peers, got {len(peer_examples)}")
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        losses = []
        try:
            for lo, hi in self._chunks():
                self._select(slice(lo, hi))
                group = peer_examples[lo:hi]
                if hi - lo == 1 and self.micro_batch and len(group[0]) > self.micro_batch:
                    losses.append(self._accumulate(group[0], self.micro_batch))
                    continue
                rows = [ex for peer in group for ex in peer]
                loss = self.task.peer_losses(self.model, self.task.collate(rows), hi - lo)
                loss.sum().backward()
                losses.append(loss.detach())
        finally:
            self._select(slice(None))
        if self.max_grad_norm is not None:
            clip_per_peer(list(self.params.values()), self.max_grad_norm)
        self._weighted_step()
        self.scheduler.step()
        return torch.cat(losses)

    @torch.no_grad()
    def _weighted_step(self) -> None:
        """One optimizer step; with peer weights, each peer's update is scaled by its weight.
        Optimizer updates are proportional to the learning rate (SGD, momentum, AdamW with
        decoupled decay), so this is exactly a per-peer learning rate."""
        if self.peer_weights is None:
            self.optimizer.step()
            return
        before = {k: p.detach().clone() for k, p in self.params.items()}
        self.optimizer.step()
        for k, p in self.params.items():
            w = self.peer_weights.to(p.dtype).view(-1, *([1] * (p.dim() - 1)))
            p.copy_(before[k] + w * (p - before[k]))

    def _accumulate(self, rows: Sequence[Example], size: int) -> torch.Tensor:
        """One peer's large batch in passes of `size` rows (gradient accumulation)."""
        total = torch.zeros(1)
        for s in range(0, len(rows), size):
            part = rows[s : s + size]
            loss = self.task.peer_losses(self.model, self.task.collate(part), 1)
            loss = loss * (len(part) / len(rows))
            loss.sum().backward()
            total += loss.detach()
        return total

    def stacked(self) -> dict[str, torch.Tensor]:
        return {k: p.detach() for k, p in self.params.items()}

    @torch.no_grad()
    def load_stacked(self, values: dict[str, torch.Tensor]) -> None:
        for k, v in values.items():
            self.params[k].copy_(v)

    @contextmanager
    def use_single(self, values: dict[str, torch.Tensor]) -> Iterator[nn.Module]:
        """The model running one adapter given by `values` (name -> tensor, no peer axis),
        on any batch size: for evaluation of the averaged model and for generation."""
        self.model.eval()
        try:
            for name in self.spec.lora_modules:
                layer = self.model.get_submodule(name)
                layer.single = (values[f"{name}.lora_A"], values[f"{name}.lora_B"])
            for name in self.spec.head_modules:
                layer = self.model.get_submodule(name)
                layer.single = (values[f"{name}.weight"], values.get(f"{name}.bias"))
            yield self.model
        finally:
            for layer in self.layers:
                layer.single = None

    @torch.inference_mode()
    def outputs_all_peers(self, examples: Sequence[Example]) -> torch.Tensor:
        """Each peer's own model on the same examples: [n, len(examples), ...]."""
        self.model.eval()
        out = []
        try:
            for lo, hi in self._chunks():
                self._select(slice(lo, hi))
                batch = self.task.collate(list(examples) * (hi - lo))
                res = self.task.outputs(self.model, batch)
                out.append(res.view(hi - lo, len(examples), *res.shape[1:]))
        finally:
            self._select(slice(None))
        return torch.cat(out)
