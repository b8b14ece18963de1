"""Combine rules: how a peer turns its own values and what it received into its new values.

Each rule is written once, as arithmetic over a block of rows that a peer combines: in the
simulation the block is every peer's stacked tensor ([n, ...]) and W is n x n; in a peer
process (`declora.network.distributed`) it is the peer's own values and its neighbours'
([1 + k, ...], own first) and W is the peer's row over them. Values are dicts name -> tensor:
LoRA factors `<module>.lora_A` ([.., r, in]) and `<module>.lora_B` ([.., out, r]); any other
key (a classification head, other PEFT methods' vectors) is averaged like the factors.

* `mix_rows`: X_i <- sum_j W_ij X_j (Dec-LoRA's factor averaging, exact messages).
* `mix_with_own_exact`: the same over decoded (compressed) messages, with each peer's own
  exact value in place of its decoded copy (plain compressed gossip, error feedback).
* `choco_step`: CHOCO-gossip's x_i + gamma * sum_j W_ij (xhat_j - xhat_i).
* `decaf_mix` / `decaf_combine`: DeCAF's product averaging + truncated SVD.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal

import numpy as np
import torch

#: The two LoRA factors, by the leaf of their canonical names.
LORA_FACTORS = frozenset({"lora_A", "lora_B"})
DecafMethod = Literal["auto", "dense", "lowrank"]

#: Largest number of elements the low-rank DeCAF path stacks at once (peers are chunked).
_LOWRANK_BUDGET = 1 << 26


# --------------------------------------------------------------------------- names and phases


def check_factors(factors: Iterable[str]) -> frozenset[str]:
    """A set of factor names, each 'lora_A' or 'lora_B'."""
    chosen = frozenset(factors)
    unknown = sorted(chosen - LORA_FACTORS)
    if unknown:
        raise ValueError(f"unknown LoRA factor(s) {unknown}; use 'lora_A' and/or 'lora_B'")
    return chosen


def factor_of(key: str) -> str | None:
    """'lora_A' or 'lora_B' for a LoRA factor's canonical name, None for anything else."""
    leaf = key.rpartition(".")[2]
    return leaf if leaf in LORA_FACTORS else None


# --------------------------------------------------------------------------- plain gossip


def mix_rows(W: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Rows of W times the block x ([m, ...] -> [rows of W, ...]): exact factor averaging."""
    flat = x.reshape(x.shape[0], -1)
    return (W.to(flat.dtype) @ flat).reshape(W.shape[0], *x.shape[1:])


def mix_with_own_exact(
    W: torch.Tensor,
    own_weight: torch.Tensor,
    exact: torch.Tensor,
    decoded: torch.Tensor,
    own_index: torch.Tensor,
) -> torch.Tensor:
    """sum_{j != i} W_ij dec_j + W_ii x_i: every neighbour's decoded message, but the peer's own
    exact value. `decoded` is the block of decoded messages; `exact` the computing peers' own
    values ([rows, ...]); `own_index` where each computing peer's own message sits in the block.
    Computed as W @ dec + W_ii (x - dec_own): with a lossless compressor the correction is 0."""
    flat_x = exact.reshape(exact.shape[0], -1)
    flat_d = decoded.reshape(decoded.shape[0], -1)
    own = own_weight.to(flat_x.device).unsqueeze(1)
    mixed = W.to(flat_x.device) @ flat_d + own * (flat_x - flat_d[own_index])
    return mixed.reshape(exact.shape)


def choco_step(
    W: torch.Tensor,
    x: torch.Tensor,
    xhat: torch.Tensor,
    own_index: torch.Tensor,
    gamma: float,
) -> torch.Tensor:
    """CHOCO's consensus step x_i + gamma * sum_j W_ij (xhat_j - xhat_i) over the block of
    public copies `xhat`; rows of W sum to one, so the sum is (W xhat)_i - xhat_i."""
    flat_x = x.reshape(x.shape[0], -1)
    flat_h = xhat.reshape(xhat.shape[0], -1)
    mixed = flat_x + gamma * (W.to(flat_x.device) @ flat_h - flat_h[own_index])
    return mixed.reshape(x.shape)


def _matrix(W: np.ndarray | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """W as a dense torch matrix in the values' dtype and on their device."""
    if not torch.is_tensor(W):
        W = torch.as_tensor(np.asarray(W, dtype=np.float64))
    return W.to(device=like.device, dtype=like.dtype)


def _plain(values: Mapping[str, torch.Tensor], W: np.ndarray) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in values.items():
        flat = v.reshape(v.shape[0], -1)
        out[k] = (_matrix(W, flat) @ flat).reshape(v.shape)
    return out


# --------------------------------------------------------------------------- DeCAF


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """SVD and QR need float32 or float64; half precision is promoted."""
    return torch.promote_types(dtype, torch.float32)


def _split(
    U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int, fill: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factor M = U diag(S) Vh (batched, S descending) back to rank `rank`: B = U_r S_r,
    A = V_r^T.

    A keeps orthonormal rows, close to LoRA's init scale, and the update's size lives in B.
    The balanced split (B = U sqrt(S), A = sqrt(S) V^T) shrinks A while B A is small, so B's
    gradient (which is proportional to A) becomes tiny and B learns far slower than in
    Dec-LoRA at the same learning rate (about 15x early on, on the demo job).

    Signs are fixed (largest-magnitude entry of each row of A positive), so peers that hold the
    same product get the same factors. Directions with a (numerically) zero singular value would
    leave a dead pair (zero B column and zero A row: neither gets a gradient again), so there B's
    column is 0 and A's row is taken from `fill` (the peer's factor-averaged A): the product is
    unchanged and the direction can still learn, as at LoRA's init."""
    keep = min(rank, S.shape[-1])
    U, S, Vh = U[..., :keep], S[..., :keep], Vh[..., :keep, :]
    pivot = Vh.abs().argmax(dim=-1, keepdim=True)
    sign = torch.sign(torch.gather(Vh, -1, pivot)).squeeze(-1)
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    B = U * (S.clamp(min=0) * sign).unsqueeze(-2)
    A = sign.unsqueeze(-1) * Vh
    m, out, inp = B.shape[0], B.shape[-2], A.shape[-1]
    if keep < rank:  # fewer directions than the rank: pad with dead ones
        B = torch.cat([B, B.new_zeros(m, out, rank - keep)], dim=-1)
        A = torch.cat([A, A.new_zeros(m, rank - keep, inp)], dim=-2)
        S = torch.cat([S, S.new_zeros(m, rank - keep)], dim=-1)
    tol = max(out, inp) * torch.finfo(S.dtype).eps
    floor = tol * S.max(dim=-1, keepdim=True).values
    dead = torch.le(S, floor)
    if bool(dead.any()):
        B = B.masked_fill(dead.unsqueeze(-2), 0.0)
        A = torch.where(dead.unsqueeze(-1), fill.to(A.dtype), A)
    return B, A


def _decaf_dense(
    Bs: torch.Tensor, As: torch.Tensor, w: torch.Tensor, rank: int, fill: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Form M = sum_k w_k B_k A_k ([m, out, in]) and take its full SVD: for small layers."""
    M = torch.einsum("mk,mkor,mkri->moi", w, Bs, As)
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return _split(U, S, Vh, rank, fill)


def _decaf_lowrank(
    Bs: torch.Tensor, As: torch.Tensor, w: torch.Tensor, rank: int, fill: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same SVD without forming the out x in product.

    M = [w_1 B_1, ..., w_k B_k] [A_1; ...; A_k] = Bc Ac has rank <= k r. With Bc = Qb Rb and
    Ac^T = Qa Ra (thin QR), M = Qb (Rb Ra^T) Qa^T, so the SVD of the small core Rb Ra^T
    ([<= k r, <= k r]) gives M's: U = Qb U_c, V = Qa V_c. Cost O((out + in) (k r)^2), which is
    what makes DeCAF usable on LLaMA-size layers."""
    m, k, out, r = Bs.shape
    Bc = (Bs * w[..., None, None]).permute(0, 2, 1, 3).reshape(m, out, k * r)
    Ac = As.reshape(m, k * r, As.shape[-1])
    Qb, Rb = torch.linalg.qr(Bc)
    Qa, Ra = torch.linalg.qr(Ac.transpose(1, 2))
    Uc, S, Vch = torch.linalg.svd(Rb @ Ra.transpose(1, 2), full_matrices=False)
    keep = min(rank, S.shape[-1])
    U = Qb @ Uc[..., :keep]
    Vh = Vch[..., :keep, :] @ Qa.transpose(1, 2)
    return _split(U, S[..., :keep], Vh, rank, fill)


def _decaf_rows(
    A: torch.Tensor,
    B: torch.Tensor,
    idx: torch.Tensor,
    w: torch.Tensor,
    rank: int,
    method: DecafMethod,
    fill: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeCAF for m peers from the stacked factors A [p, r, in], B [p, out, r]: peer row t
    combines the peers idx[t] ([m, k]) with weights w[t] ([m, k]). Peers are processed in
    chunks so the gathered neighbourhoods stay within a memory budget. `fill` ([m, rank, in])
    gives the A rows of dead directions (default: the factor-averaged A when rank is r).
    Returns B [m, out, rank], A [m, rank, in] in the factors' dtype."""
    if method not in ("auto", "dense", "lowrank"):
        raise ValueError(f"unknown DeCAF method {method!r}; use auto, dense or lowrank")
    dtype = A.dtype
    ct = _compute_dtype(dtype)
    (m, k), r, out, inp = idx.shape, A.shape[-2], B.shape[-2], A.shape[-1]
    if method == "auto":
        method = "lowrank" if k * r < min(out, inp) else "dense"
    solve = _decaf_lowrank if method == "lowrank" else _decaf_dense
    per_peer = k * r * (out + inp) + (out * inp if method == "dense" else (k * r) ** 2)
    chunk = max(1, _LOWRANK_BUDGET // max(1, per_peer))
    Bo, Ao = [], []
    for lo in range(0, m, chunk):
        sel, wc = idx[lo : lo + chunk], w[lo : lo + chunk].to(ct)
        As, Bs = A[sel].to(ct), B[sel].to(ct)
        if fill is not None:
            fill_c = fill[lo : lo + chunk].to(ct)
        else:
            fill_c = torch.einsum("mk,mkri->mri", wc, As)
            if r != rank:  # another output rank: no factor-averaged rows to reuse
                fill_c = fill_c.new_zeros(fill_c.shape[0], rank, inp)
        b, a = solve(Bs, As, wc, rank, fill_c)
        Bo.append(b)
        Ao.append(a)
    return torch.cat(Bo).to(dtype), torch.cat(Ao).to(dtype)


def _lora_modules(keys: Iterable[str], lora_modules: Iterable[str] | None) -> list[str]:
    """The modules whose factors are mixed as products; both factors must be present."""
    keys = set(keys)
    if lora_modules is None:
        lora_modules = sorted(k[: -len(".lora_A")] for k in keys if k.endswith(".lora_A"))
    found = []
    for name in lora_modules:
        has = (f"{name}.lora_A" in keys, f"{name}.lora_B" in keys)
        if has == (False, False):
            continue
        if not all(has):
            raise ValueError(f"DeCAF mixes products, so it needs both factors of {name!r}")
        found.append(name)
    return found


def _support(W: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per peer, the peers it receives from (W_ij != 0, itself always first), padded to the
    largest count with itself at weight 0: index [n, k] and weight [n, k]."""
    n = W.shape[0]
    rows = [[i] + [int(j) for j in np.flatnonzero(W[i]) if j != i] for i in range(n)]
    k = max(len(r) for r in rows)
    idx = np.array([r + [r[0]] * (k - len(r)) for r in rows], dtype=np.int64)
    wts = np.take_along_axis(W, idx, axis=1).copy()
    for i, r in enumerate(rows):
        wts[i, len(r) :] = 0.0
    return idx, wts


def decaf_mix(
    values: Mapping[str, torch.Tensor],
    W: np.ndarray | torch.Tensor,
    lora_modules: Iterable[str] | None = None,
    rank: int | None = None,
    *,
    method: DecafMethod = "auto",
) -> dict[str, torch.Tensor]:
    """DeCAF's gossip step for all peers: B_i A_i <- rank-`rank` truncated SVD of
    sum_j W_ij B_j A_j, split as B = U S, A = V^T; other keys W @ X.

    `lora_modules` defaults to every module with both factors in `values`; `rank` to the
    factors' own rank. `method`: "dense" takes the SVD of each [out, in] product, "lowrank"
    works from QR of each peer's neighbourhood's stacked factors (only W's nonzeros are used),
    "auto" picks lowrank when (neighbours + 1) * r < min(out, in)."""
    W_np = (W.detach().cpu().numpy() if torch.is_tensor(W) else np.asarray(W)).astype(np.float64)
    modules = _lora_modules(values, lora_modules)
    product_keys = {f"{m}.lora_{f}" for m in modules for f in "AB"}
    out = _plain({k: v for k, v in values.items() if k not in product_keys}, W_np)
    if not modules:
        return {k: out[k] for k in values}
    idx_np, wts_np = _support(W_np)
    for name in modules:
        A, B = values[f"{name}.lora_A"], values[f"{name}.lora_B"]
        if A.shape[0] != W_np.shape[0]:
            raise ValueError(f"{name!r} holds {A.shape[0]} peers but W is {W_np.shape}")
        idx = torch.as_tensor(idx_np, device=A.device)
        w = torch.as_tensor(wts_np, device=A.device)
        newB, newA = _decaf_rows(A, B, idx, w, rank or A.shape[-2], method)
        out[f"{name}.lora_A"], out[f"{name}.lora_B"] = newA, newB
    return {k: out[k] for k in values}


def decaf_combine(
    own: Mapping[str, torch.Tensor],
    neighbours: Mapping[int, Mapping[str, torch.Tensor]],
    weights: Mapping[int, float],
    rank: int | None = None,
    *,
    self_weight: float | None = None,
    method: DecafMethod = "auto",
    pad_to: int | None = None,
) -> dict[str, torch.Tensor]:
    """DeCAF for one peer that holds only its own and its neighbours' values (no peer axis):
    what a peer in its own process computes after receiving. `weights[j]` is W_ij; the peer's
    own weight W_ii defaults to 1 - sum_j W_ij (rows of W sum to 1). Same arithmetic as
    `decaf_mix`, so simulation and distributed runs agree."""
    if set(neighbours) != set(weights):
        raise ValueError(
            f"weights are for peers {sorted(weights)} but values came from {sorted(neighbours)}"
        )
    ids = sorted(neighbours)
    own_w = 1.0 - float(sum(weights.values())) if self_weight is None else float(self_weight)
    if own_w < -1e-9:
        raise ValueError(f"the peer's own weight is {own_w:.6g}; weights must be >= 0")
    w_row = [own_w] + [float(weights[j]) for j in ids]
    # the simulator pads every peer's neighbourhood to the round's largest one (itself at
    # weight 0); padding the same way gives the same QR and SVD shapes, hence its rounding
    pad = max(0, (pad_to or 0) - len(w_row))
    w_row += [0.0] * pad
    stacked = {}
    for k, v in own.items():
        for j in ids:
            if k not in neighbours[j] or neighbours[j][k].shape != v.shape:
                raise ValueError(f"peer {j} sent no {k!r} of shape {tuple(v.shape)}")
        stacked[k] = torch.stack(
            [v] + [neighbours[j][k].to(v.device, v.dtype) for j in ids] + [v] * pad
        )
    modules = _lora_modules(own, None)
    product_keys = {f"{m}.lora_{f}" for m in modules for f in "AB"}
    result: dict[str, torch.Tensor] = {}
    for k, v in stacked.items():
        if k not in product_keys:
            w = torch.tensor(w_row, dtype=v.dtype, device=v.device)
            result[k] = torch.tensordot(w, v, dims=1)
    for name in modules:
        A, B = stacked[f"{name}.lora_A"], stacked[f"{name}.lora_B"]
        idx = torch.arange(len(w_row), device=A.device).unsqueeze(0)
        w = torch.tensor([w_row], dtype=torch.float64, device=A.device)
        newB, newA = _decaf_rows(A, B, idx, w, rank or A.shape[-2], method)
        result[f"{name}.lora_A"], result[f"{name}.lora_B"] = newA[0], newB[0]
    return {k: result[k] for k in own}


class RuleGossip:
    """A stateless simulated communicator (the round loop's `mix(values) -> values`) for a
    combine rule of exact messages over the stacked tensors; subclasses give the rule
    (`combine`) and how their state is called in errors. `set_mixing` swaps in the matrix of
    the next round (dynamic networks). A peer that receives nothing in a round (W_ii = 1:
    offline, or left out of the pairing) keeps its values exactly."""

    what = "gossip"
    last_bytes: np.ndarray | None = None  # exact messages: counted by the loop from the plan

    def set_mixing(self, mixing: np.ndarray) -> None:
        W = np.asarray(mixing, dtype=np.float64)
        if W.shape != (self.n, self.n):
            raise ValueError(f"expected a {self.n} x {self.n} mixing matrix, got {W.shape}")
        self.mixing = W
        off = (W != 0) & ~np.eye(self.n, dtype=bool)
        self.alone = np.flatnonzero(~off.any(axis=1))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}  # stateless: the matrix is a function of the round

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"unexpected keys {sorted(state)[:3]} in a {self.what} state")

    def combine(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def mix(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if len(self.alone) == self.n:
            return dict(values)
        out = self.combine(values)
        if len(self.alone):
            for k, v in values.items():
                idx = torch.as_tensor(self.alone, device=v.device)
                out[k][idx] = v[idx]
        return out


class DecafGossip(RuleGossip):
    """DeCAF in simulation; bytes on the wire are the same as Dec-LoRA's (both factors). A
    peer that receives nothing keeps its factors exactly: re-factoring its own product would
    change them for nothing."""

    what = "DeCAF gossip"

    def __init__(
        self,
        mixing: np.ndarray,
        lora_modules: Iterable[str] | None = None,
        rank: int | None = None,
        *,
        method: DecafMethod = "auto",
    ) -> None:
        self.lora_modules = None if lora_modules is None else tuple(lora_modules)
        self.rank, self.method = rank, method
        self.n = np.asarray(mixing).shape[0]
        self.set_mixing(mixing)

    def combine(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return decaf_mix(values, self.mixing, self.lora_modules, self.rank, method=self.method)


# --------------------------------------------------------------------------- mixed ranks
#
# With `lora.ranks`, peer i trains at its own rank r_i. Every block below holds the factors at
# the largest rank R, zero beyond each sender's rank (A's rows >= r_j, B's columns >= r_j);
# a peer sends only its r_j leading rows / columns and the receiver zero-pads them.

HeteroRule = Literal["pad-truncate", "svd"]


def _have(ranks: torch.Tensor, r: int, dtype: torch.dtype) -> torch.Tensor:
    """[p, r]: 1 where a peer holds that rank slot (slot < its rank)."""
    return (torch.arange(r, device=ranks.device).unsqueeze(0) < ranks.unsqueeze(1)).to(dtype)


def _gathered(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum_k w[t, k] x[idx[t, k]] for every output row t: [m, ...]."""
    flat = x.reshape(x.shape[0], -1)
    out = torch.einsum("mk,mkd->md", w.to(flat.dtype), flat[idx])
    return out.reshape(idx.shape[0], *x.shape[1:])


def pad_truncate_block(
    x: torch.Tensor,
    leaf: str,
    idx: torch.Tensor,
    w: torch.Tensor,
    in_ranks: torch.Tensor,
    out_ranks: torch.Tensor,
) -> torch.Tensor:
    """HetLoRA-style combine of one factor (`leaf` lora_A or lora_B) over a block [p, ...]:
    every received factor is zero-padded to the own rank or cut to its leading r_i rows of A /
    columns of B, and each rank slot is averaged over the peers that hold it, with their
    weights renormalised: X_i[s] = sum_{j: r_j > s} W_ij X_j[s] / sum_{j: r_j > s} W_ij.
    Plain W would pull the slots that few neighbours have toward zero every round (a rank-16
    peer among rank-2 neighbours would lose its extra directions); with equal ranks this is
    exactly sum_j W_ij X_j. Output row t combines block rows idx[t] with weights w[t]."""
    r = x.shape[-2] if leaf == "lora_A" else x.shape[-1]
    have = _have(in_ranks, r, x.dtype)  # [p, r]
    num = _gathered(x, idx, w)
    den = torch.einsum("mk,mkr->mr", w.to(x.dtype), have[idx])  # [m, r]
    own = x[idx[:, 0]]
    keep = _have(out_ranks, r, x.dtype).bool() & (den > 0)
    if leaf == "lora_A":
        mixed = num / den.clamp(min=1e-30).unsqueeze(-1)
        keep_x = keep.unsqueeze(-1)
    else:
        mixed = num / den.clamp(min=1e-30).unsqueeze(-2)
        keep_x = keep.unsqueeze(-2)
    out = torch.where(keep_x, mixed, own)  # a slot nobody weighted keeps the own value
    return _masked(out, leaf, out_ranks)


def _masked(x: torch.Tensor, leaf: str, ranks: torch.Tensor) -> torch.Tensor:
    """Zero each row's rank slots beyond its rank."""
    r = x.shape[-2] if leaf == "lora_A" else x.shape[-1]
    m = _have(ranks, r, x.dtype)
    return x * (m.unsqueeze(-1) if leaf == "lora_A" else m.unsqueeze(-2))


def hetero_block(
    block: Mapping[str, torch.Tensor],
    idx: torch.Tensor,
    w: torch.Tensor,
    in_ranks: torch.Tensor,
    out_ranks: torch.Tensor,
    rule: HeteroRule,
) -> dict[str, torch.Tensor]:
    """The combine for mixed ranks over a block of rows (all peers in simulation, the own and
    the neighbours' values in a peer process): output row t combines block rows idx[t] (its own
    first) with weights w[t]. Tensors other than LoRA factors are averaged with W.

    * pad-truncate: `pad_truncate_block` on A and on B.
    * svd: DeCAF's product mixing at each peer's own rank, sum_j W_ij B_j A_j re-factored by a
      truncated SVD through the low-rank core (QR of the stacked factors, never an out x in
      matrix) into B = U S, A = V^T (`_decaf_rows`); a dead direction's A row comes from the
      pad-truncate A. The optimizer state of re-factored peers is then stale (the algorithm
      clears it, as for DeCAF)."""
    if rule not in ("pad-truncate", "svd"):
        raise ValueError(f"unknown mixed-rank rule {rule!r}; use pad-truncate or svd")
    out: dict[str, torch.Tensor] = {}
    modules = _lora_modules(block, None)
    for k, v in block.items():
        leaf = factor_of(k)
        if leaf is None:
            out[k] = _gathered(v, idx, w)
        elif rule == "pad-truncate" or k.rpartition(".")[0] not in modules:
            out[k] = pad_truncate_block(v, leaf, idx, w, in_ranks, out_ranks)
    if rule == "svd":
        for name in modules:
            A, B = block[f"{name}.lora_A"], block[f"{name}.lora_B"]
            fill = pad_truncate_block(A, "lora_A", idx, w, in_ranks, out_ranks)
            newA, newB = torch.zeros_like(fill), B.new_zeros(idx.shape[0], *B.shape[1:])
            for g in sorted(set(out_ranks.tolist())):
                rows = torch.nonzero(out_ranks == g).flatten()
                b, a = _decaf_rows(A, B, idx[rows], w[rows].double(), g, "lowrank", fill[rows, :g])
                newA[rows, :g], newB[rows, :, :g] = a, b
            out[f"{name}.lora_A"], out[f"{name}.lora_B"] = newA, newB
    return {k: out[k] for k in block}


def hetero_mix(
    values: Mapping[str, torch.Tensor],
    W: np.ndarray,
    ranks: Iterable[int],
    rule: HeteroRule,
) -> dict[str, torch.Tensor]:
    """`hetero_block` for every peer of a simulation: the block is the stacked tensors, peer
    i's row combines itself and the peers it receives from (W's nonzeros, padded as DeCAF's)."""
    W_np = np.asarray(W, dtype=np.float64)
    first = next(iter(values.values()))
    idx_np, wts_np = _support(W_np)
    idx = torch.as_tensor(idx_np, device=first.device)
    w = torch.as_tensor(wts_np, device=first.device)
    r = torch.as_tensor(list(ranks), device=first.device)
    return hetero_block(values, idx, w, r, r, rule)


def hetero_combine(
    own: Mapping[str, torch.Tensor],
    neighbours: Mapping[int, Mapping[str, torch.Tensor]],
    weights: Mapping[int, float],
    ranks: Mapping[int, int],
    own_rank: int,
    rule: HeteroRule,
    *,
    self_weight: float,
    pad_to: int | None = None,
) -> dict[str, torch.Tensor]:
    """`hetero_block` for one peer that holds its own values (at the largest rank, zero beyond
    `own_rank`) and its neighbours' (already zero-padded to the same shapes): what a peer in its
    own process computes after receiving. Padded like the simulator's neighbourhoods (itself at
    weight 0 up to `pad_to`), so both give the same arithmetic."""
    ids = sorted(neighbours)
    w_row = [float(self_weight)] + [float(weights[j]) for j in ids]
    pad = max(0, (pad_to or 0) - len(w_row))
    w_row += [0.0] * pad
    block = {}
    for k, v in own.items():
        for j in ids:
            if k not in neighbours[j] or neighbours[j][k].shape != v.shape:
                raise ValueError(f"peer {j} sent no {k!r} of shape {tuple(v.shape)}")
        block[k] = torch.stack(
            [v] + [neighbours[j][k].to(v.device, v.dtype) for j in ids] + [v] * pad
        )
    dev = next(iter(own.values())).device
    in_ranks = torch.tensor([own_rank] + [ranks[j] for j in ids] + [own_rank] * pad, device=dev)
    idx = torch.arange(len(w_row), device=dev).unsqueeze(0)
    w = torch.tensor([w_row], dtype=torch.float64, device=dev)
    out = hetero_block(block, idx, w, in_ranks, torch.tensor([own_rank], device=dev), rule)
    return {k: v[0] for k, v in out.items()}
