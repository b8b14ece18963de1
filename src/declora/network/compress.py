"""Compressors for gossip messages: what one peer puts on the wire for one tensor.

A compressor turns a float tensor into a `Packet` whose `nbytes()` is the exact number of bytes
sent, so communication cost can be reported honestly (payload plus per-group metadata). Three
families: exact fp32 (`Identity`), half-precision casts (`Cast`) and k-bit asymmetric min/max
quantization (`Quantize`) with stochastic (unbiased) or nearest rounding, and the scaled sign
(`ScaledSign`, 1 bit), a contractive compressor for error feedback at one bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from declora.errors import ConfigError

BITS_CHOICES = "1..8, 16 or 32"
ROUNDINGS = ("stochastic", "nearest", "sign")
GRANULARITIES = ("tensor", "row", "block")
HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Packet:
    """What one peer puts on the wire for one tensor."""

    payload: torch.Tensor  # uint8: packed codes, or the raw bytes of fp32/fp16/bf16 values
    scales: torch.Tensor | None  # float32, one per group (tensor / row / block)
    offsets: torch.Tensor | None  # float32, one per group (the group minimum), or None
    shape: tuple[int, ...]
    kind: str  # "fp32" | "fp16" | "bf16" | "q<k>"

    def nbytes(self) -> int:
        """Exact bytes on the wire; the shape is not counted because both sides know it."""
        total = int(self.payload.numel()) * self.payload.element_size()
        for meta in (self.scales, self.offsets):
            if meta is not None:
                total += 4 * int(meta.numel())
        return total


# --------------------------------------------------------------------------- bit packing


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits} cannot be packed; choose 1..8")


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2^bits) into a flat uint8 buffer of ceil(numel*bits/8) bytes.

    Codes are written least significant bit first, one after another with no padding between
    them, so sub-byte widths (3, 5, 6, 7 bits) cost exactly what they claim.
    """
    _check_bits(bits)
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {1 << bits}) for bits={bits}")
    if bits == 8:
        return flat.to(torch.uint8)
    shifts = torch.arange(bits, device=flat.device)
    stream = ((flat.unsqueeze(1) >> shifts) & 1).reshape(-1)  # one entry per bit
    nbytes = math.ceil(stream.numel() / 8)
    padded = torch.zeros(nbytes * 8, dtype=torch.int64, device=flat.device)
    padded[: stream.numel()] = stream
    weights = 1 << torch.arange(8, device=flat.device)
    return (padded.reshape(nbytes, 8) * weights).sum(dim=1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of `pack_bits`: the first `numel` codes as a flat int64 tensor."""
    _check_bits(bits)
    need = math.ceil(numel * bits / 8)
    if packed.numel() < need:
        raise ValueError(f"{packed.numel()} bytes cannot hold {numel} codes of {bits} bits")
    raw = packed.reshape(-1)[:need].to(torch.int64)
    if bits == 8:
        return raw
    shifts = torch.arange(8, device=raw.device)
    stream = ((raw.unsqueeze(1) >> shifts) & 1).reshape(-1)[: numel * bits]
    weights = 1 << torch.arange(bits, device=raw.device)
    return (stream.reshape(numel, bits) * weights).sum(dim=1)


# --------------------------------------------------------------------------- compressors


class Compressor:
    """Base class: `decode(encode(x))` is what every neighbour sees of x."""

    name: str = "base"

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> Packet:
        raise NotImplementedError

    def decode(self, p: Packet) -> torch.Tensor:
        raise NotImplementedError

    def _check_kind(self, p: Packet, kind: str) -> None:
        if p.kind != kind:
            raise ValueError(f"{self.name} cannot decode a packet of kind {p.kind!r}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"


def _raw_bytes(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The bytes of x in `dtype`, as a fresh uint8 buffer (not aliasing the caller's tensor)."""
    return x.detach().reshape(-1).to(dtype, copy=True).contiguous().view(torch.uint8)


class Identity(Compressor):
    """Exact fp32: the baseline every compressed run is compared with."""

    name = "fp32"

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> Packet:
        return Packet(_raw_bytes(x, torch.float32), None, None, tuple(x.shape), "fp32")

    def decode(self, p: Packet) -> torch.Tensor:
        self._check_kind(p, "fp32")
        return p.payload.view(torch.float32).reshape(p.shape)


class Cast(Compressor):
    """Half precision on the wire (2 bytes a value), decoded back to float32."""

    def __init__(self, half: str = "fp16") -> None:
        if half not in HALF_DTYPES:
            raise ConfigError(f"comm.half={half!r} is not supported; choose fp16 or bf16")
        self.name = half
        self.dtype = HALF_DTYPES[half]

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> Packet:
        return Packet(_raw_bytes(x, self.dtype), None, None, tuple(x.shape), self.name)

    def decode(self, p: Packet) -> torch.Tensor:
        self._check_kind(p, self.name)
        return p.payload.view(self.dtype).to(torch.float32).reshape(p.shape)


class Quantize(Compressor):
    """k-bit asymmetric quantization with one (scale, min) pair per group.

    code = round((x - min) / scale) with scale = (max - min) / (2^k - 1); decode = min + code *
    scale. Stochastic rounding (floor(v + U[0, 1))) is unbiased, which keeps gossip averages
    right in expectation; nearest rounding has half the worst-case error but is biased.
    """

    def __init__(
        self,
        bits: int,
        rounding: str = "stochastic",
        granularity: str = "row",
        block_size: int = 256,
    ) -> None:
        _check_quant_settings(bits, rounding, granularity, block_size)
        if rounding == "sign":
            raise ConfigError("comm.rounding=sign is the scaled-sign compressor, not min/max")
        self.bits = bits
        self.rounding = rounding
        self.granularity = granularity
        self.block_size = block_size
        self.levels = (1 << bits) - 1
        group = f"block{block_size}" if granularity == "block" else granularity
        self.name = f"q{bits}-{group}-{rounding}"

    def _groups(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """(number of groups, group length) for the flat tensor; the last block may be short."""
        numel = math.prod(shape)
        if self.granularity == "tensor":
            return 1, numel
        if self.granularity == "row":
            rows = shape[0] if len(shape) >= 2 else 1
            return rows, (numel // rows if rows else 0)
        return math.ceil(numel / self.block_size), self.block_size

    def _per_element(self, group_values: torch.Tensor, numel: int, length: int) -> torch.Tensor:
        """Expand one value per group to one value per element of the flat tensor."""
        if length == 0:
            return group_values[:0]
        return group_values.repeat_interleave(length)[:numel]

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> Packet:
        flat = x.detach().reshape(-1).to(torch.float32)
        numel = flat.numel()
        groups, length = self._groups(tuple(x.shape))
        if numel == 0:  # nothing to describe: no codes and no group metadata
            zeros = torch.zeros(0, dtype=torch.float32)
            empty = torch.zeros(0, dtype=torch.uint8)
            return Packet(empty, zeros, zeros.clone(), tuple(x.shape), self.kind)
        # Pad the last block with its own last value so it does not move that block's min/max.
        padded = torch.cat([flat, flat[-1:].expand(groups * length - numel)])
        view = padded.reshape(groups, length)
        lo = view.amin(dim=1)
        scale = (view.amax(dim=1) - lo) / self.levels
        lo_e = self._per_element(lo, numel, length)
        scale_e = self._per_element(scale, numel, length)
        safe = torch.where(scale_e > 0, scale_e, torch.ones_like(scale_e))
        v = torch.where(scale_e > 0, (flat - lo_e) / safe, torch.zeros_like(flat))
        if self.rounding == "stochastic":
            device = generator.device if generator is not None else flat.device
            noise = torch.rand(numel, generator=generator, device=device).to(flat.device)
            codes = torch.floor(v + noise)
        else:
            codes = torch.round(v)
        codes = codes.clamp_(0, self.levels).to(torch.int64)
        return Packet(pack_bits(codes, self.bits), scale, lo, tuple(x.shape), self.kind)

    @property
    def kind(self) -> str:
        return f"q{self.bits}"

    def decode(self, p: Packet) -> torch.Tensor:
        self._check_kind(p, self.kind)
        numel = math.prod(p.shape)
        if p.scales is None or p.offsets is None:
            raise ValueError("a quantized packet needs scales and offsets")
        _, length = self._groups(p.shape)
        codes = unpack_bits(p.payload, self.bits, numel).to(torch.float32)
        lo = self._per_element(p.offsets, numel, length)
        scale = self._per_element(p.scales, numel, length)
        return (lo + codes * scale).reshape(p.shape)


class ScaledSign(Compressor):
    """1 bit a value: the sign, times one scale per group, the group's mean |x|.

    C(x) = mean(|x|) sign(x) is contractive: ||x - C(x)||^2 = ||x||^2 - ||x||_1^2 / d <=
    (1 - 1/d) ||x||^2 per group of d values, so error feedback's residual shrinks instead of
    growing. Stochastic 1-bit min/max rounding is unbiased but not contractive (its error can
    exceed the value itself), which is why error feedback diverges with it. Biased, so use it
    with error feedback (`comm.error_feedback=true`)."""

    kind = "s1"

    def __init__(self, granularity: str = "block", block_size: int = 256) -> None:
        _check_common("sign", granularity, block_size)
        self.granularity, self.block_size = granularity, block_size
        group = f"block{block_size}" if granularity == "block" else granularity
        self.name = f"sign1-{group}"
        self._q = Quantize(1, "nearest", granularity, block_size)  # grouping helpers only

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> Packet:
        flat = x.detach().reshape(-1).to(torch.float32)
        numel = flat.numel()
        groups, length = self._q._groups(tuple(x.shape))
        if numel == 0:
            empty = torch.zeros(0, dtype=torch.uint8)
            return Packet(empty, torch.zeros(0), None, tuple(x.shape), self.kind)
        padded = torch.cat([flat, torch.zeros(groups * length - numel)])
        counts = torch.full((groups,), float(length))
        counts[-1] = numel - (groups - 1) * length
        scale = padded.reshape(groups, length).abs().sum(dim=1) / counts
        codes = (flat >= 0).to(torch.int64)
        return Packet(pack_bits(codes, 1), scale, None, tuple(x.shape), self.kind)

    def decode(self, p: Packet) -> torch.Tensor:
        self._check_kind(p, self.kind)
        numel = math.prod(p.shape)
        if p.scales is None:
            raise ValueError("a scaled-sign packet needs its scales")
        _, length = self._q._groups(p.shape)
        signs = unpack_bits(p.payload, 1, numel).to(torch.float32) * 2 - 1
        return (signs * self._q._per_element(p.scales, numel, length)).reshape(p.shape)


# --------------------------------------------------------------------------- factory


def _check_quant_settings(
    bits: object, rounding: object, granularity: object, block: object
) -> None:
    """Reject settings with a message naming the config key and what is accepted."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not (1 <= bits <= 8):
        raise ConfigError(f"comm.bits={bits!r} is not supported by quantization; choose 1..8")
    _check_common(rounding, granularity, block)


def _check_common(rounding: object, granularity: object, block_size: object) -> None:
    if rounding not in ROUNDINGS:
        raise ConfigError(
            f"comm.rounding={rounding!r} is unknown; choose stochastic, nearest or sign"
        )
    if granularity not in GRANULARITIES:
        raise ConfigError(
            f"comm.granularity={granularity!r} is unknown; choose tensor, row or block"
        )
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ConfigError(
            f"comm.block_size={block_size!r} is not supported; choose an integer >= 1"
        )


def make_compressor(
    bits: int = 32,
    rounding: str = "stochastic",
    granularity: str = "row",
    block_size: int = 256,
    half: str = "fp16",
) -> Compressor:
    """Build the compressor for `comm.*` settings: 32 -> fp32, 16 -> `half`, 1..8 -> k-bit."""
    valid_bits = isinstance(bits, int) and not isinstance(bits, bool)
    if not valid_bits or not (1 <= bits <= 8 or bits in (16, 32)):
        raise ConfigError(f"comm.bits={bits!r} is not supported; choose {BITS_CHOICES}")
    _check_common(rounding, granularity, block_size)
    if half not in HALF_DTYPES:
        raise ConfigError(f"comm.half={half!r} is not supported; choose fp16 or bf16")
    if bits == 32:
        return Identity()
    if bits == 16:
        return Cast(half)
    if rounding == "sign":
        if bits != 1:
            raise ConfigError(f"comm.rounding=sign sends 1 bit a value; comm.bits={bits} (use 1)")
        return ScaledSign(granularity, block_size)
    return Quantize(bits, rounding, granularity, block_size)
