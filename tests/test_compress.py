"""Tests for message compressors and bit packing (declora.network.compress)."""

from __future__ import annotations

import math

import pytest
import torch

from declora.errors import ConfigError
from declora.network.compress import (
    Cast,
    Identity,
    Packet,
    Quantize,
    make_compressor,
    pack_bits,
    unpack_bits,
)

GRANULARITIES = ("tensor", "row", "block")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _per_element(c: Quantize, values: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Expand one value per group to the tensor's shape (an independent re-derivation)."""
    numel = math.prod(shape)
    if c.granularity == "tensor":
        return values.expand(numel).reshape(shape)
    if c.granularity == "row":
        rows = shape[0] if len(shape) >= 2 else 1
        return values.repeat_interleave(numel // rows).reshape(shape)
    idx = torch.arange(numel) // c.block_size
    return values[idx].reshape(shape)


# --------------------------------------------------------------------------- bit packing


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("numel", [0, 1, 3, 7, 13, 101])
def test_pack_unpack_round_trip(bits: int, numel: int) -> None:
    codes = torch.randint(0, 1 << bits, (numel,), generator=_gen(bits * 100 + numel))
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == math.ceil(numel * bits / 8)
    assert torch.equal(unpack_bits(packed, bits, numel), codes)


def test_pack_layout_is_lsb_first_and_accepts_any_shape() -> None:
    # 4-bit codes 1, 2 -> one byte 0x21; 1-bit codes 1,0,1 -> 0b101.
    assert pack_bits(torch.tensor([1, 2]), 4).tolist() == [0x21]
    assert pack_bits(torch.tensor([1, 0, 1]), 1).tolist() == [0b101]
    codes = torch.randint(0, 8, (3, 5, 2), generator=_gen())
    assert torch.equal(unpack_bits(pack_bits(codes, 3), 3, 30), codes.reshape(-1))


def test_pack_rejects_codes_out_of_range() -> None:
    with pytest.raises(ValueError, match="codes must lie"):
        pack_bits(torch.tensor([0, 4]), 2)
    with pytest.raises(ValueError):
        pack_bits(torch.tensor([-1]), 3)


# --------------------------------------------------------------------------- byte accounting


def _real_size(p: Packet) -> int:
    metas = [m for m in (p.scales, p.offsets) if m is not None]
    return p.payload.numel() * p.payload.element_size() + sum(
        m.numel() * m.element_size() for m in metas
    )


@pytest.mark.parametrize(
    ("compressor", "shape", "expected"),
    [
        (Identity(), (8, 100), 4 * 800),
        (Cast("fp16"), (8, 100), 2 * 800),
        (Cast("bf16"), (7, 3), 2 * 21),
        (Quantize(4, granularity="row"), (8, 100), 400 + 8 * 8),
        (Quantize(2, granularity="tensor"), (8, 100), 200 + 8),
        (Quantize(3, granularity="block", block_size=16), (10, 10), 38 + 7 * 8),
        (Quantize(1, granularity="row"), (13,), 2 + 8),  # 1-D: one row
        (Quantize(5, granularity="row"), (3, 4, 5), math.ceil(60 * 5 / 8) + 3 * 8),
        (Quantize(8, granularity="block", block_size=256), (1000,), 1000 + 4 * 8),
    ],
)
def test_nbytes_is_exact(compressor, shape, expected) -> None:
    x = torch.randn(shape, generator=_gen())
    p = compressor.encode(x, _gen(1))
    assert p.nbytes() == expected
    assert p.nbytes() == _real_size(p)
    assert p.payload.dtype == torch.uint8
    assert p.shape == tuple(shape)
    if p.scales is not None:
        assert p.scales.dtype == torch.float32 and p.offsets.dtype == torch.float32


def test_identity_and_cast_round_trip() -> None:
    x = torch.randn(5, 7, generator=_gen())
    p = Identity().encode(x)
    assert p.kind == "fp32"
    x_before = x.clone()
    x.add_(1.0)  # the packet must not alias the sender's tensor
    assert torch.equal(Identity().decode(p), x_before)
    for half, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        c = Cast(half)
        out = c.decode(c.encode(x))
        assert out.dtype == torch.float32 and out.shape == x.shape
        assert torch.equal(out, x.to(dtype).float())


def test_decode_rejects_a_packet_of_another_kind() -> None:
    p = Quantize(4).encode(torch.randn(3, 3), _gen())
    with pytest.raises(ValueError, match="cannot decode"):
        Quantize(2).decode(p)
    with pytest.raises(ValueError, match="cannot decode"):
        Identity().decode(p)


# --------------------------------------------------------------------------- quantization


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_nearest_error_is_at_most_half_a_step(bits: int, granularity: str) -> None:
    c = Quantize(bits, rounding="nearest", granularity=granularity, block_size=7)
    for shape in [(6, 11), (23,), (3, 4, 5)]:
        x = torch.randn(shape, generator=_gen(bits)) * 3
        p = c.encode(x)
        out = c.decode(p)
        assert out.shape == x.shape and out.dtype == torch.float32
        half_step = _per_element(c, p.scales, shape) / 2
        tol = 1e-5 * float(x.abs().max())  # float32 rounding in (x - min) / scale
        assert bool(((out - x).abs() <= half_step + tol).all())
        # The group extremes survive (min exactly, max up to rounding).
        assert bool((out >= _per_element(c, p.offsets, shape) - tol).all())


def test_group_counts_follow_granularity() -> None:
    x = torch.randn(6, 11, generator=_gen())
    assert Quantize(4, granularity="tensor").encode(x, _gen()).scales.numel() == 1
    assert Quantize(4, granularity="row").encode(x, _gen()).scales.numel() == 6
    block = Quantize(4, granularity="block", block_size=10).encode(x, _gen())
    assert block.scales.numel() == 7  # 66 values: six blocks of 10 and one of 6
    flat = x.reshape(-1)
    assert torch.equal(block.offsets, torch.stack([b.min() for b in flat.split(10)]))


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_stochastic_rounding_is_unbiased(bits: int) -> None:
    c = Quantize(bits, rounding="stochastic", granularity="row")
    x = torch.randn(4, 50, generator=_gen(bits))
    g = _gen(123)
    trials = 1000
    total = torch.zeros_like(x)
    for _ in range(trials):
        p = c.encode(x, g)
        total += c.decode(p)
    mean = total / trials
    # Each decode is within one step and has std <= step / 2, so the mean's std is
    # step / (2 sqrt(trials)); allow five of those.
    step = _per_element(c, p.scales, tuple(x.shape))
    assert bool(((mean - x).abs() <= 5 * step / (2 * trials**0.5) + 1e-6).all())
    # ... and it is a genuinely random rounding, not nearest in disguise.
    assert not torch.equal(c.decode(c.encode(x, g)), c.decode(c.encode(x, g)))


def test_stochastic_rounding_is_deterministic_for_a_seed() -> None:
    c = Quantize(3, rounding="stochastic", granularity="block", block_size=9)
    x = torch.randn(5, 13, generator=_gen())
    a, b = c.encode(x, _gen(7)), c.encode(x, _gen(7))
    assert torch.equal(a.payload, b.payload)
    assert not torch.equal(a.payload, c.encode(x, _gen(8)).payload)


@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
def test_constant_group_decodes_exactly(rounding: str) -> None:
    x = torch.full((3, 9), 0.1234567)
    x[1] = -2.5
    c = Quantize(2, rounding=rounding, granularity="row")
    p = c.encode(x, _gen())
    assert torch.equal(p.scales, torch.zeros(3))
    assert torch.equal(unpack_bits(p.payload, 2, 27), torch.zeros(27, dtype=torch.int64))
    assert torch.equal(c.decode(p), x)


def test_empty_tensor() -> None:
    c = Quantize(4, granularity="row")
    p = c.encode(torch.zeros(3, 0), _gen())
    assert p.payload.numel() == 0 and p.nbytes() == 0
    assert c.decode(p).shape == (3, 0)


# --------------------------------------------------------------------------- factory


def test_make_compressor_picks_the_right_kind() -> None:
    assert isinstance(make_compressor(), Identity)
    assert make_compressor(16).name == "fp16"
    assert make_compressor(16, half="bf16").name == "bf16"
    q = make_compressor(3, rounding="nearest", granularity="block", block_size=64)
    assert isinstance(q, Quantize)
    assert (q.bits, q.rounding, q.granularity, q.block_size) == (3, "nearest", "block", 64)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"bits": 0}, "comm.bits"),
        ({"bits": 9}, "comm.bits"),
        ({"bits": 12}, "comm.bits"),
        ({"bits": 64}, "comm.bits"),
        ({"bits": True}, "comm.bits"),
        ({"bits": 4.0}, "comm.bits"),
        ({"block_size": 0}, "comm.block_size"),
        ({"block_size": -3}, "comm.block_size"),
        ({"rounding": "up"}, "comm.rounding"),
        ({"granularity": "column"}, "comm.granularity"),
        ({"bits": 16, "half": "fp8"}, "comm.half"),
    ],
)
def test_invalid_settings_raise_config_error(kwargs, key) -> None:
    with pytest.raises(ConfigError, match=key) as info:
        make_compressor(**kwargs)
    assert "\n" not in str(info.value)


def test_bits_message_lists_what_is_accepted() -> None:
    with pytest.raises(ConfigError, match=r"comm.bits=9 is not supported; choose 1..8, 16 or 32"):
        make_compressor(9)
    with pytest.raises(ConfigError, match=r"comm\.bits"):
        Quantize(16)


def test_scaled_sign_is_contractive_and_one_bit_a_value():
    from declora.network.compress import ScaledSign, make_compressor

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 29, generator=gen)
    comp = make_compressor(1, "sign", "block", 64)
    assert isinstance(comp, ScaledSign)
    packet = comp.encode(x)
    blocks = -(-x.numel() // 64)
    assert packet.nbytes() == -(-x.numel() // 8) + 4 * blocks  # bits + one fp32 scale per block
    y = comp.decode(packet)
    assert torch.equal(torch.sign(y), torch.where(x >= 0, 1.0, -1.0))
    # contractive: ||x - C(x)||^2 <= (1 - 1/d) ||x||^2 on every block of d values
    flat, dec = x.reshape(-1), y.reshape(-1)
    for lo in range(0, flat.numel(), 64):
        xb, yb = flat[lo : lo + 64], dec[lo : lo + 64]
        assert float((xb - yb).pow(2).sum()) <= (1 - 1 / len(xb)) * float(xb.pow(2).sum()) + 1e-5
        torch.testing.assert_close(yb.abs().mean(), xb.abs().mean())


def test_error_feedback_residual_stays_bounded_with_scaled_sign_not_with_stochastic_one_bit():
    """Sending the same value again and again with error feedback: with the contractive scaled
    sign the residual stays below its bound sqrt((1 - delta) / delta) ||x|| (delta >= 1/d for
    blocks of d = 256 values: 16 ||x||) and the mean of what was sent converges to the value;
    stochastic 1-bit min/max rounding lets the residual explode."""
    from declora.network.compress import make_compressor

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(512, generator=gen)

    def run(comp, steps: int) -> tuple[float, float]:
        residual, sent = torch.zeros_like(x), torch.zeros_like(x)
        g = torch.Generator().manual_seed(2)
        for _ in range(steps):
            message = x + residual
            if not bool(torch.isfinite(message).all()):
                return float("inf"), float("inf")  # diverged
            decoded = comp.decode(comp.encode(message, g))
            residual = message - decoded
            sent += decoded
        return float(residual.norm() / x.norm()), float((sent / steps - x).norm() / x.norm())

    res_sign, err_sign = run(make_compressor(1, "sign", "block", 256), 200)
    res_stoch, _ = run(make_compressor(1, "stochastic", "block", 256), 40)
    assert res_sign < 16.0 and err_sign < 0.1
    assert res_stoch > 1e4


def test_one_bit_settings_that_cannot_work_are_refused():
    from declora.config.schema import load_config
    from declora.errors import ConfigError

    with pytest.raises(ConfigError, match=r"not contractive.*comm\.rounding=sign"):
        load_config(None, ["comm.bits=1", "comm.error_feedback=true"])
    with pytest.raises(ConfigError, match=r"comm\.rounding=sign sends 1 bit"):
        load_config(None, ["comm.bits=4", "comm.rounding=sign"])
    ok = load_config(None, ["comm.bits=1", "comm.rounding=sign", "comm.error_feedback=true"])
    assert ok.comm.rounding == "sign"


def test_the_real_peer_checks_allow_one_4bit_level_on_a_boundary_and_nothing_more():
    """`assert_equal_up_to_a_level` (the simulation-vs-real-peer checks of quantized gossip)
    lets one value land a level apart, and refuses a scale error or several moved values."""
    from tests.conftest import assert_equal_up_to_a_level

    a = torch.linspace(-0.1, 0.1, 256)
    flipped = a.clone()
    flipped[10] += 0.2 / 15  # one 4-bit level of the tensor's range
    assert_equal_up_to_a_level(a, flipped, bits=4)
    with pytest.raises(AssertionError, match="beyond one 4-bit level"):
        assert_equal_up_to_a_level(a, a.clone().index_fill_(0, torch.tensor([3]), 0.5), bits=4)
    with pytest.raises(AssertionError, match="of 256 beyond"):
        assert_equal_up_to_a_level(a, a * 1.01, bits=4)  # a scale error moves nearly all
