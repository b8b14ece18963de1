"""Tests for gossip with compressed messages (declora.network.compressed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from declora.errors import ConfigError, TopologyError
from declora.network.compress import Cast, Identity, Quantize, make_compressor
from declora.network.compressed import ChocoGossip, CompressedGossip
from declora.network.simulated import SimulatedGossip


def _ring(n: int) -> np.ndarray:
    W = np.zeros((n, n))
    for i in range(n):
        W[i, i] = W[i, (i + 1) % n] = W[i, (i - 1) % n] = 1 / 3
    return W


def _metropolis(n: int, edges: list[tuple[int, int]]) -> np.ndarray:
    """Symmetric doubly stochastic weights; peers without edges get a row of e_i."""
    deg = np.zeros(n, dtype=int)
    for u, v in edges:
        deg[u] += 1
        deg[v] += 1
    W = np.zeros((n, n))
    for u, v in edges:
        W[u, v] = W[v, u] = 1 / (1 + max(deg[u], deg[v]))
    W += np.diag(1 - W.sum(axis=1))
    return W


# Peer 5 is isolated; degrees are 1, 3, 2, 2, 2, 0.
EDGES = [(0, 1), (1, 2), (2, 3), (3, 4), (4, 1)]
DEGREES = np.array([1, 3, 2, 2, 2, 0])


def _values(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "layer.lora_A": torch.randn(n, 4, 16, generator=g),
        "layer.lora_B": torch.randn(n, 16, 4, generator=g),
        "head.bias": torch.randn(n, 3, generator=g),
    }


def _numel(values: dict[str, torch.Tensor]) -> int:
    return sum(v[0].numel() for v in values.values())


def _dist_to(values: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> float:
    """sqrt(sum_i ||x_i - target||^2): how far the peers are from a common point."""
    return sum(float((v - target[k]).pow(2).sum()) for k, v in values.items()) ** 0.5


def _mean(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.mean(dim=0) for k, v in values.items()}


# --------------------------------------------------------------------------- CompressedGossip


def test_identity_compression_equals_exact_gossip() -> None:
    W = _metropolis(6, EDGES)
    x = _values(6)
    cg, exact = CompressedGossip(W, Identity()), SimulatedGossip(W)
    for _ in range(3):
        got, want = cg.mix(x), exact.mix(x)
        for k in x:
            assert torch.equal(got[k], want[k])
        assert np.array_equal(cg.last_bytes, 4 * _numel(x) * DEGREES)
        x = got


def test_bytes_per_peer_for_quantized_and_half_messages() -> None:
    W = _metropolis(6, EDGES)
    x = {"w": torch.randn(6, 8, 100)}
    cg = CompressedGossip(W, Quantize(4, granularity="row"))
    cg.mix(x)
    assert np.array_equal(cg.last_bytes, (400 + 8 * 8) * DEGREES)
    cg = CompressedGossip(W, Cast("fp16"))
    cg.mix(x)
    assert np.array_equal(cg.last_bytes, 2 * 800 * DEGREES)
    assert CompressedGossip(W, Identity()).last_bytes.tolist() == [0] * 6  # nothing sent yet


def test_isolated_peer_sends_nothing_and_is_untouched() -> None:
    W = _metropolis(6, EDGES)
    x = _values(6)
    for gossip in (
        CompressedGossip(W, Quantize(2)),
        CompressedGossip(W, Quantize(2), error_feedback=True),
        ChocoGossip(W, Quantize(2)),
    ):
        out = gossip.mix(x)
        assert gossip.last_bytes[5] == 0
        for k in x:
            assert torch.equal(out[k][5], x[k][5])


def test_own_value_enters_the_mix_exactly() -> None:
    eps = 1e-3
    W = np.array([[1 - eps, eps], [eps, 1 - eps]])
    c = Quantize(1, rounding="nearest", granularity="row")  # coarse and deterministic
    x = {"w": torch.randn(2, 5, 40, generator=torch.Generator().manual_seed(0))}
    out = CompressedGossip(W, c).mix(x)["w"]
    x0, x1 = x["w"][0], x["w"][1]
    dec1 = c.decode(c.encode(x1))
    torch.testing.assert_close(out[0], (1 - eps) * x0 + eps * dec1, atol=1e-6, rtol=0)
    # So peer 0 moves only by eps-sized terms, far less than quantizing its own value would.
    own_error = float((c.decode(c.encode(x0)) - x0).abs().max())
    moved = float((out[0] - x0).abs().max())
    assert moved < 4 * eps * float(x["w"].abs().max()) < 0.1 * own_error


def test_error_feedback_sends_what_it_owes() -> None:
    """With the same input every round, the sum of what was sent tracks the sum of the inputs:
    the difference is the current residual, which stays bounded instead of growing."""
    W = np.full((2, 2), 0.5)
    x = {"w": torch.randn(2, 3, 20, generator=torch.Generator().manual_seed(1))}
    x1 = x["w"][1]
    step = float(x1.max(dim=1).values.sub(x1.min(dim=1).values).max())  # 1-bit: one step/row
    rounds = 150

    def run(error_feedback: bool) -> tuple[float, float]:
        gossip = CompressedGossip(W, Quantize(1, rounding="nearest"), error_feedback=error_feedback)
        sent_sum = torch.zeros_like(x1)
        worst_residual = 0.0
        for _ in range(rounds):
            out = gossip.mix(x)["w"]
            sent_sum += (out[0] - 0.5 * x["w"][0]) / 0.5  # what peer 0 decoded from peer 1
            if error_feedback:
                residual = gossip.state_dict()["residual.w"][1]
                worst_residual = max(worst_residual, float(residual.abs().max()))
        return float((sent_sum - rounds * x1).abs().max()), worst_residual

    gap_ef, worst_residual = run(True)
    gap_plain, _ = run(False)
    assert worst_residual <= 2 * step
    assert gap_ef <= 2 * step + 1e-3 * rounds  # bounded (plus float error of the recovery)
    assert gap_plain > 10 * gap_ef  # without feedback the rounding bias piles up


def test_determinism_and_checkpoint_resume() -> None:
    W = _ring(5)
    x = _values(5, seed=2)

    def make(cls, seed=4):
        if cls is CompressedGossip:
            return cls(W, Quantize(2), error_feedback=True, seed=seed)
        return cls(W, Quantize(2), gamma=0.4, seed=seed)

    for cls in (CompressedGossip, ChocoGossip):
        a, b, c = make(cls), make(cls), make(cls, seed=5)
        xa, xb, xc = x, x, x
        for _ in range(3):
            xa, xb, xc = a.mix(xa), b.mix(xb), c.mix(xc)
        assert all(torch.equal(xa[k], xb[k]) for k in x)
        assert not all(torch.equal(xa[k], xc[k]) for k in x)
        # Resume from a checkpoint: a fresh object continues exactly like the original.
        state = {k: v.clone() for k, v in a.state_dict().items()}
        assert all(isinstance(v, torch.Tensor) for v in state.values())
        resumed = make(cls, seed=99)
        resumed.load_state_dict(state)
        ya, yr = xa, xa
        for _ in range(2):
            ya, yr = a.mix(ya), resumed.mix(yr)
        assert all(torch.equal(ya[k], yr[k]) for k in x)


def test_load_state_rejects_unknown_keys() -> None:
    with pytest.raises(ValueError, match="unexpected key"):
        CompressedGossip(_ring(3), Identity()).load_state_dict({"xhat.w": torch.zeros(3)})


def test_output_keeps_input_dtype_and_shape() -> None:
    x = {"w": torch.randn(4, 3, 5).to(torch.bfloat16)}
    out = CompressedGossip(_ring(4), Quantize(4)).mix(x)
    assert out["w"].dtype == torch.bfloat16 and out["w"].shape == (4, 3, 5)


def test_non_square_mixing_is_rejected() -> None:
    with pytest.raises(TopologyError, match="square"):
        CompressedGossip(np.ones((2, 3)) / 3, Identity())


# --------------------------------------------------------------------------- CHOCO


def test_choco_identity_gamma_one_is_plain_gossip() -> None:
    W = _metropolis(6, EDGES)
    x = _values(6)
    choco, exact = ChocoGossip(W, Identity(), gamma=1.0), SimulatedGossip(W)
    xc, xe = x, x
    for _ in range(5):
        xc, xe = choco.mix(xc), exact.mix(xe)
        for k in x:
            torch.testing.assert_close(xc[k], xe[k], atol=1e-5, rtol=0)
        assert np.array_equal(choco.last_bytes, 4 * _numel(x) * DEGREES)


@pytest.mark.parametrize(
    "compressor",
    [Quantize(2), Quantize(1, granularity="tensor"), Quantize(4, rounding="nearest"), Cast()],
    ids=["q2-stochastic", "q1-tensor", "q4-nearest", "fp16"],
)
def test_choco_preserves_the_network_average(compressor) -> None:
    W = _ring(6)
    x = _values(6, seed=3)
    mean0 = _mean(x)
    choco = ChocoGossip(W, compressor, gamma=0.5, seed=1)
    for _ in range(12):
        x = choco.mix(x)
        # Up to float32 rounding, which scales with the values (1-bit tensor-wise messages are
        # too coarse for gamma=0.5 and make the peers diverge, yet the average still holds).
        scale = max(float(v.abs().max()) for v in x.values())
        for k, m in _mean(x).items():
            torch.testing.assert_close(m, mean0[k], atol=1e-6 * max(scale, 1.0), rtol=0)


def test_choco_reaches_the_average_where_quantized_gossip_stalls() -> None:
    """2-bit row-wise messages on a ring of 8, 120 rounds. Plain quantized gossip keeps
    injecting noise the size of each row's range (it does not shrink as peers agree) and lets the
    average drift, so its error to the true average stalls; CHOCO's compressed differences vanish
    at consensus. (Plain stochastic gossip can even end in exact consensus, at a wrong point,
    once every peer sits on its own quantization grid: hence the error to the true average.)"""
    n, rounds = 8, 120
    W = _ring(n)
    x0 = {"w": torch.randn(n, 6, 32, generator=torch.Generator().manual_seed(0))}
    target = _mean(x0)
    c = make_compressor(2, rounding="stochastic", granularity="row")
    choco, plain = ChocoGossip(W, c, gamma=0.5, seed=0), CompressedGossip(W, c, seed=0)
    xc, xp = x0, x0
    choco_err, plain_err = [], []
    for r in range(rounds):
        xc, xp = choco.mix(xc), plain.mix(xp)
        if r in (39, rounds - 1):
            choco_err.append(_dist_to(xc, target))
            plain_err.append(_dist_to(xp, target))
    start = _dist_to(x0, target)
    assert choco_err[1] < choco_err[0]  # still shrinking
    assert choco_err[1] < 1e-3 * start
    assert _dist_to(xc, _mean(xc)) < 1e-3 * start  # consensus distance too
    assert plain_err[1] > 100 * choco_err[1]
    assert plain_err[1] > 0.5 * plain_err[0]  # no longer improving
    # CHOCO's messages are still 2-bit packets: same bytes as plain quantized gossip.
    assert np.array_equal(choco.last_bytes, plain.last_bytes)


@pytest.mark.parametrize("gamma", [0, 0.0, 1.5, -0.2, True, float("nan")])
def test_choco_rejects_bad_gamma(gamma) -> None:
    with pytest.raises(ConfigError, match=r"comm\.gamma") as info:
        ChocoGossip(_ring(3), Identity(), gamma=gamma)
    assert "(0, 1]" in str(info.value)
