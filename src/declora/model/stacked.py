"""Layers that hold every peer's trainable parameters stacked along a leading peer axis.

One frozen base layer is shared; the input batch is laid out peer-major ([n*b, ...], the first
b rows belong to peer 0, ...), so one batched matmul applies each peer's own adapter to its own
rows. A forward/backward over the whole batch therefore trains all peers at once, and gradients
never cross peers because their parameters are disjoint slices.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def trainable_dtype(base: torch.dtype) -> torch.dtype:
    """What the trainable factors and head are held in: float32 over a bfloat16/float16 (or
    quantized) base, as PEFT keeps adapters in float32. SGD steps of lr * grad on a bfloat16
    factor (8 bits of mantissa) round away once they fall below 1/256 of its entries."""
    if base.is_floating_point and torch.finfo(base).bits >= 32:
        return base
    return torch.float32


def _peer_view(x: torch.Tensor, m: int) -> torch.Tensor:
    if x.shape[0] % m:
        raise RuntimeError(f"batch of {x.shape[0]} rows cannot be split over {m} peers")
    return x.reshape(m, -1, x.shape[-1])


class StackedLoraLinear(nn.Module):
    """A frozen `nn.Linear` plus n LoRA adapters: y_i = W0 x + s * B_i A_i x for peer i's rows.

    Shapes follow PEFT (A: [r, in], B: [out, r]) with the peer axis in front:
    lora_A [n, r, in], lora_B [n, out, r].
    """

    def __init__(
        self, base: nn.Linear, n_peers: int, r: int, alpha: float, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        dev, dt = base.weight.device, trainable_dtype(base.weight.dtype)
        self.lora_A = nn.Parameter(torch.zeros(n_peers, r, base.in_features, device=dev, dtype=dt))
        self.lora_B = nn.Parameter(torch.zeros(n_peers, base.out_features, r, device=dev, dtype=dt))
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.peers: slice = slice(None)
        self.single: tuple[torch.Tensor, torch.Tensor] | None = None
        #: DP-SGD: one (A, B) per example ([rows, r, in], [rows, out, r]), each a copy of its
        #: peer's factors, so autograd gives every example its own gradient.
        self.rows: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base's output plus each peer's update, computed and summed in the factors' dtype
        (float32 over a bfloat16 base) and returned in the base's, as PEFT's LoRA layer does."""
        out = self.base(x)
        h = self.dropout(x)
        if self.single is not None:
            a, b = self.single
            h = h.to(a.dtype)
            return (out + self.scaling * ((h @ a.T) @ b.T)).to(out.dtype)
        if self.rows is not None:
            a, b = self.rows
        else:
            a, b = self.lora_A[self.peers], self.lora_B[self.peers]
        hv = _peer_view(h.to(a.dtype), a.shape[0])
        delta = torch.bmm(torch.bmm(hv, a.transpose(1, 2)), b.transpose(1, 2))
        return (out + self.scaling * delta.reshape(out.shape)).to(out.dtype)


class StackedLinear(nn.Module):
    """A fully trainable linear layer (e.g. a classification head), one copy per peer."""

    def __init__(self, base: nn.Linear, n_peers: int) -> None:
        super().__init__()
        dt = trainable_dtype(base.weight.dtype)
        w = base.weight.detach().to(dt)
        self.weight = nn.Parameter(w.unsqueeze(0).repeat(n_peers, 1, 1).clone())
        if base.bias is not None:
            self.bias: nn.Parameter | None = nn.Parameter(
                base.bias.detach().to(dt).unsqueeze(0).repeat(n_peers, 1).clone()
            )
        else:
            self.bias = None
        self.peers: slice = slice(None)
        self.single: tuple[torch.Tensor, torch.Tensor | None] | None = None
        #: DP-SGD: one (weight, bias) per example, copies of its peer's (see StackedLoraLinear).
        self.rows: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Computed, and returned, in the layer's dtype (float32 logits over a bfloat16 base)."""
        if self.single is not None:
            return nn.functional.linear(x.to(self.single[0].dtype), *self.single)
        x = x.to(self.weight.dtype)
        if self.rows is not None:
            w, bias = self.rows
            xv = _peer_view(x, w.shape[0])
            y = torch.bmm(xv, w.transpose(1, 2))
            y = y if bias is None else y + bias.unsqueeze(1)
            return y.reshape(*x.shape[:-1], w.shape[1])
        w = self.weight[self.peers]
        xv = _peer_view(x, w.shape[0])
        if self.bias is not None:
            y = torch.baddbmm(self.bias[self.peers].unsqueeze(1), xv, w.transpose(1, 2))
        else:
            y = torch.bmm(xv, w.transpose(1, 2))
        return y.reshape(*x.shape[:-1], w.shape[1])


def lora_a_init(out_rows: int, in_features: int, generator: torch.Generator) -> torch.Tensor:
    """PEFT's default A init (Kaiming-uniform, a=sqrt(5)), drawn from a seeded generator."""
    bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform_ with a=sqrt(5) reduces to this
    return (torch.rand(out_rows, in_features, generator=generator) * 2 - 1) * bound
