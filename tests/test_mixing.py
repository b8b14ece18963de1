"""The combine rules of `declora.network.mixing`: plain averaging, DeCAF's product mixing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from declora.algorithms import make_algorithm
from declora.config.schema import load_config
from declora.network.mixing import (
    DecafGossip,
    choco_step,
    decaf_combine,
    decaf_mix,
    factor_of,
    mix_rows,
    mix_with_own_exact,
)
from declora.network.topology import build_topology


def plain_mix(values: dict[str, torch.Tensor], W: np.ndarray) -> dict[str, torch.Tensor]:
    Wt = torch.tensor(W, dtype=torch.float64)
    return {k: mix_rows(Wt, v.double()).to(v.dtype) for k, v in values.items()}


def _values(n: int, out: int, inp: int, r: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "enc.q.lora_A": torch.randn(n, r, inp, generator=gen),
        "enc.q.lora_B": torch.randn(n, out, r, generator=gen),
        "enc.v.lora_A": torch.randn(n, r, out, generator=gen),
        "enc.v.lora_B": torch.randn(n, inp, r, generator=gen),
        "head.weight": torch.randn(n, 3, out, generator=gen),
        "head.bias": torch.randn(n, 3, generator=gen),
    }


MODULES = ("enc.q", "enc.v")


def _products(values: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    return torch.bmm(values[f"{module}.lora_B"].double(), values[f"{module}.lora_A"].double())


def _ring(n: int) -> np.ndarray:
    return build_topology("ring", n, "metropolis").mixing


@pytest.mark.parametrize("method", ["dense", "lowrank"])
def test_decaf_keeps_the_rank(method):
    values = _values(5, 24, 18, 3)
    mixed = decaf_mix(values, _ring(5), MODULES, 3, method=method)
    for k, v in values.items():
        assert mixed[k].shape == v.shape and mixed[k].dtype == v.dtype
    for module in MODULES:
        prods = _products(mixed, module)
        ranks = torch.linalg.matrix_rank(prods, rtol=1e-5)
        assert ranks.tolist() == [3] * 5


@pytest.mark.parametrize("method", ["dense", "lowrank"])
@pytest.mark.parametrize("kind", ["ring", "star"])  # star: neighbourhoods of unequal size
def test_decaf_matches_a_numpy_truncated_svd(method, kind):
    n, r = 5, 3
    values = _values(n, 24, 18, r, seed=1)
    W = build_topology(kind, n, "metropolis").mixing
    mixed = decaf_mix(values, W, MODULES, r, method=method)
    for module in MODULES:
        B = values[f"{module}.lora_B"].double().numpy()
        A = values[f"{module}.lora_A"].double().numpy()
        M = np.einsum("ij,jor,jrk->iok", W, B, A)
        got = _products(mixed, module).numpy()
        for i in range(n):
            U, S, Vt = np.linalg.svd(M[i])
            expect = (U[:, :r] * S[:r]) @ Vt[:r]
            np.testing.assert_allclose(got[i], expect, atol=2e-5 * S[0], rtol=0)
            np.testing.assert_allclose(np.linalg.svd(got[i])[1][:r], S[:r], rtol=1e-5)


def test_dense_and_lowrank_paths_agree_factor_by_factor():
    """Signs are fixed, so both paths give the same factors, not just the same products."""
    values = _values(6, 40, 32, 4, seed=2)
    W = build_topology("complete", 6, "metropolis").mixing
    dense = decaf_mix(values, W, MODULES, method="dense")
    low = decaf_mix(values, W, MODULES, method="lowrank")
    for k in values:
        torch.testing.assert_close(dense[k], low[k], atol=1e-4, rtol=1e-4)


def test_lowrank_path_on_a_wide_layer_matches_dense():
    """The low-rank path never forms out x in; `auto` picks it when (k r) < min(out, in)."""
    gen = torch.Generator().manual_seed(3)
    n, r, out, inp = 4, 4, 256, 192
    values = {
        "m.lora_A": torch.randn(n, r, inp, generator=gen) / inp**0.5,
        "m.lora_B": torch.randn(n, out, r, generator=gen),
    }
    W = _ring(n)
    auto = decaf_mix(values, W)
    dense = decaf_mix(values, W, method="dense")
    for k in values:
        torch.testing.assert_close(auto[k], dense[k], atol=1e-4, rtol=1e-4)


def test_split_keeps_a_orthonormal_and_puts_the_scale_in_b():
    """A = V^T has orthonormal rows (LoRA's init scale, whatever the product's size); each B
    column carries its direction's singular value."""
    mixed = decaf_mix(_values(4, 20, 16, 3, seed=4), _ring(4), MODULES)
    for module in MODULES:
        A, B = mixed[f"{module}.lora_A"], mixed[f"{module}.lora_B"]
        eye = torch.eye(A.shape[1]).expand(A.shape[0], -1, -1)
        torch.testing.assert_close(A @ A.transpose(1, 2), eye, atol=1e-5, rtol=1e-5)
        sigma = torch.linalg.svdvals(B @ A)[:, : A.shape[1]]
        torch.testing.assert_close(B.norm(dim=1), sigma, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["dense", "lowrank"])
def test_decaf_reproduces_the_product_when_peers_agree(method):
    one = _values(1, 24, 18, 3, seed=5)
    values = {k: v.expand(4, *v.shape[1:]).clone() for k, v in one.items()}
    mixed = decaf_mix(values, _ring(4), MODULES, method=method)
    for module in MODULES:
        expect = _products(values, module)
        torch.testing.assert_close(
            _products(mixed, module), expect, atol=5e-5, rtol=1e-4
        )  # float32 QR + SVD
        # every peer gets the same factors, so the peers agree on the factors too
        for key in (f"{module}.lora_A", f"{module}.lora_B"):
            torch.testing.assert_close(
                mixed[key], mixed[key][:1].expand_as(mixed[key]), atol=5e-5, rtol=1e-4
            )
    torch.testing.assert_close(mixed["head.weight"], values["head.weight"])


@pytest.mark.parametrize("method", ["dense", "lowrank"])
def test_decaf_with_identity_keeps_each_peers_product(method):
    values = _values(4, 24, 18, 3, seed=6)
    mixed = decaf_mix(values, np.eye(4), MODULES, method=method)
    for module in MODULES:
        torch.testing.assert_close(
            _products(mixed, module), _products(values, module), atol=1e-5, rtol=1e-5
        )
    for k in ("head.weight", "head.bias"):
        torch.testing.assert_close(mixed[k], values[k])


def test_head_is_mixed_like_plain_gossip():
    values = _values(5, 12, 10, 2, seed=7)
    W = _ring(5)
    mixed = decaf_mix(values, W, MODULES)
    plain = plain_mix(values, W)
    for k in ("head.weight", "head.bias"):
        torch.testing.assert_close(mixed[k], plain[k])
    Wt = torch.tensor(W, dtype=torch.float32)
    torch.testing.assert_close(plain["head.bias"], Wt @ values["head.bias"])


def test_zero_product_keeps_lora_init_instead_of_killing_a():
    """B = 0 everywhere (LoRA's init): the product is 0, B stays 0 and A becomes the
    factor-averaged A, so training can still start (A = 0 would stop it for good)."""
    values = _values(4, 12, 10, 2, seed=8)
    for module in MODULES:
        values[f"{module}.lora_B"].zero_()
    W = _ring(4)
    mixed = decaf_mix(values, W, MODULES)
    plain = plain_mix(values, W)
    for module in MODULES:
        assert float(mixed[f"{module}.lora_B"].abs().max()) == 0.0
        torch.testing.assert_close(mixed[f"{module}.lora_A"], plain[f"{module}.lora_A"])


def test_rank_deficient_average_keeps_exact_product():
    """A product of rank < r is reproduced exactly; the spare directions stay trainable."""
    gen = torch.Generator().manual_seed(9)
    B = torch.zeros(1, 12, 3)
    B[0, :, 0] = torch.randn(12, generator=gen)  # rank 1
    values = {"m.lora_A": torch.randn(1, 3, 10, generator=gen), "m.lora_B": B}
    values = {k: v.expand(3, *v.shape[1:]).clone() for k, v in values.items()}
    mixed = decaf_mix(values, _ring(3), method="dense")
    torch.testing.assert_close(_products(mixed, "m"), _products(values, "m"), atol=1e-5, rtol=1e-5)
    assert (mixed["m.lora_A"].norm(dim=2) > 0).all()  # no dead row of A


def test_decaf_combine_is_one_row_of_decaf_mix():
    """A peer with only its neighbours' values computes exactly its row of the simulation."""
    n = 6
    values = _values(n, 24, 18, 3, seed=10)
    W = _ring(n)
    mixed = decaf_mix(values, W, MODULES)
    for i in (0, 3):
        nbrs = [j for j in range(n) if j != i and W[i, j] > 0]
        got = decaf_combine(
            {k: v[i] for k, v in values.items()},
            {j: {k: v[j] for k, v in values.items()} for j in nbrs},
            {j: float(W[i, j]) for j in nbrs},
        )
        for k in values:
            torch.testing.assert_close(got[k], mixed[k][i], atol=1e-6, rtol=1e-5)


def test_decaf_combine_checks_what_it_received():
    own = {k: v[0] for k, v in _values(2, 8, 6, 2).items()}
    with pytest.raises(ValueError, match="weights are for peers"):
        decaf_combine(own, {1: own}, {2: 0.5})
    with pytest.raises(ValueError, match="peer 1 sent no"):
        decaf_combine(own, {1: {k: v for k, v in own.items() if k != "head.bias"}}, {1: 0.5})
    with pytest.raises(ValueError, match="own weight"):
        decaf_combine(own, {1: own}, {1: 1.5})


def test_decaf_needs_both_factors():
    values = _values(3, 8, 6, 2)
    del values["enc.q.lora_A"]
    with pytest.raises(ValueError, match="needs both factors"):
        decaf_mix(values, _ring(3), MODULES)


def test_decaf_in_half_precision_returns_half():
    values = {k: v.to(torch.bfloat16) for k, v in _values(3, 16, 12, 2, seed=11).items()}
    mixed = decaf_mix(values, _ring(3), MODULES)
    assert all(v.dtype == torch.bfloat16 for v in mixed.values())
    ref = decaf_mix({k: v.float() for k, v in values.items()}, _ring(3), MODULES)
    for k in values:
        torch.testing.assert_close(mixed[k].float(), ref[k], atol=0.05, rtol=0.05)


def test_decaf_communicator_is_decaf_mix():
    values = _values(4, 12, 10, 2, seed=12)
    W = _ring(4)
    expect = decaf_mix(values, W, MODULES)
    got = DecafGossip(W, MODULES).mix(values)
    for k in values:
        torch.testing.assert_close(got[k], expect[k])


def test_one_peer_block_gives_that_peers_row_of_the_simulation():
    """The same rule on a peer's own block (own values first, then what it received) gives its
    row of the all-peers computation: what lets the transport and the simulator share it."""
    values = _values(5, 6, 4, 2, seed=3)
    W = torch.tensor(_ring(5), dtype=torch.float32)
    noisy = {k: v + 0.01 * torch.randn_like(v) for k, v in values.items()}
    everyone = torch.arange(5)
    for k, x in values.items():
        full = mix_with_own_exact(W, torch.diagonal(W), x, noisy[k], everyone)
        step = choco_step(W, x, noisy[k], everyone, 0.5)
        for i in (0, 2):
            nbrs = [i] + [j for j in range(5) if j != i and W[i, j] > 0]
            row = W[i, nbrs].unsqueeze(0)
            own = torch.zeros(1, dtype=torch.long)
            one = mix_with_own_exact(row, row[:, 0], x[i : i + 1], noisy[k][nbrs], own)
            torch.testing.assert_close(one[0], full[i], atol=1e-6, rtol=1e-5)
            one_step = choco_step(row, x[i : i + 1], noisy[k][nbrs], own, 0.5)
            torch.testing.assert_close(one_step[0], step[i], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(mix_rows(W, x), (W @ x.reshape(5, -1)).reshape(x.shape))


def test_frozen_a_mixing_b_alone_is_product_mixing():
    """FFA-LoRA: with every A equal, sum_j W_ij B_j times A is sum_j W_ij B_j A_j exactly."""
    values = {k: v.double() for k, v in _values(5, 24, 18, 3, seed=13).items()}
    for module in MODULES:
        a = values[f"{module}.lora_A"]
        values[f"{module}.lora_A"] = a[:1].expand_as(a).clone()
    keys = make_algorithm("ffa", load_config()).sent_keys(values)
    assert keys == {"enc.q.lora_B", "enc.v.lora_B", "head.weight", "head.bias"}
    W = _ring(5)
    mixed = {**values, **plain_mix({k: values[k] for k in keys}, W)}
    Wd = torch.tensor(W, dtype=torch.float64)
    for module in MODULES:
        expect = torch.einsum("ij,jok->iok", Wd, _products(values, module))
        torch.testing.assert_close(_products(mixed, module), expect, atol=1e-12, rtol=1e-6)
    sent = sum(values[k][0].numel() for k in keys if k.endswith("lora_B"))
    total = sum(values[k][0].numel() for k in values if factor_of(k))
    assert sent * 2 == total  # half the LoRA bytes (q and v are transposed shapes here)


def test_consensus_distance_counts_the_lora_scale():
    """The update a peer applies is s B A; disagreement is measured on that, so at alpha=32 a
    rank-2 adapter (s = 16) disagrees 4x more than the bare product says."""
    from declora.network.simulated import consensus_distance

    values = _values(4, 6, 5, 2, seed=21)
    bare = consensus_distance(values, MODULES)
    assert bare > 0
    assert consensus_distance(values, MODULES, 16.0) == pytest.approx(16.0 * bare, rel=1e-5)
