"""Which attention kernel a training pass uses.

On CPU, PyTorch's scaled-dot-product attention picks its fused (flash) kernel when attention
dropout is off. Over a bfloat16 base that kernel's backward is slow: on MiniLM with dropout off
it took half of a training step, and a step with the unfused ("math") kernel trained 1.66x
the examples per second (docs/results/engine.md). With dropout on, PyTorch already uses the
unfused kernel, so forcing it there changes nothing, bit for bit. Scoring keeps the default:
there the fused forward is the faster one. Float32 bases keep the default too (the two kernels
train at the same speed there, and float32 results stay as they were). float16 bases are not
covered: none was measured, and `model.dtype` offers float32 and bfloat16.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

MEASURED_SLOW = (torch.bfloat16,)  # base dtypes whose fused CPU backward was measured slow


def base_dtype(model: nn.Module) -> torch.dtype:
    """The frozen base's compute dtype: its input embeddings' (adapters may be float32 over a
    bfloat16 base, so the first parameter found does not tell)."""
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    weight = getattr(embeddings, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.dtype
    return next(model.parameters()).dtype


def unfused_attention_wanted(model: nn.Module) -> bool:
    """True where a training pass of `model` should use the unfused attention kernel: a
    bfloat16 base on CPU."""
    first = next(model.parameters(), None)
    if first is None or first.device.type != "cpu":
        return False
    return base_dtype(model) in MEASURED_SLOW


@contextlib.contextmanager
def training_attention(model: nn.Module) -> Iterator[None]:
    """Run a training pass (forward and, through autograd, its backward) of `model` with the
    attention kernel that trains fastest on its device and dtype."""
    if not unfused_attention_wanted(model):
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        yield
