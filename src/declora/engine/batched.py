"""The batched engine: n peers' adapters stacked on one frozen model, trained in one pass.

Every adapted linear becomes a `StackedLoraLinear` and every head linear a `StackedLinear`.
A local step concatenates the peers' batches peer-major, runs forward/backward once per chunk of
peers, clips each peer's gradient on its own, and takes one AdamW step over the stacked tensors;
AdamW is element-wise, so that is exactly n independent optimizers.

With `privacy` (a `declora.engine.privacy.DPSGD`), every step is a per-peer DP-SGD step:
per-example gradients from one pass over the Poisson-sampled examples of all peers, each
clipped, summed per peer, plus that peer's noise.

Two switches serve the follow-up algorithms and dynamic networks: `set_trainable` freezes a LoRA
factor (FFA-LoRA, ADF-LoRA phases), and `train_step(..., active=mask)` leaves offline peers and
stragglers that are done for the round exactly as they were.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from declora.engine.privacy import DPSGD
from declora.engine.state import TrainingState
from declora.model.adapters import AdapterSpec, OptimSettings, rank_mask, set_submodule
from declora.model.stacked import StackedLinear, StackedLoraLinear
from declora.network.mixing import LORA_FACTORS, check_factors, factor_of
from declora.tasks.task import Example, SingleAdapterOutputs, Task


def clip_per_peer(params: Sequence[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale each peer's gradient (its slice of every stacked tensor) to norm <= max_norm.

    Same rule as `torch.nn.utils.clip_grad_norm_`, applied per peer. Returns the norms (an
    empty tensor when no parameter has a gradient)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    n = grads[0].shape[0]
    sq = torch.zeros(n, dtype=torch.float32, device=grads[0].device)
    for g in grads:
        sq += g.detach().reshape(n, -1).float().pow(2).sum(dim=1)
    norms = sq.sqrt()
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype).view(n, *([1] * (g.dim() - 1))))
    return norms


def as_active_mask(active: Sequence[bool] | np.ndarray | None, n: int) -> np.ndarray | None:
    """A length-n boolean mask of the peers that step, or None when every peer does."""
    if active is None:
        return None
    mask = np.asarray(active)
    if mask.shape != (n,) or mask.dtype != np.bool_:
        raise ValueError(
            f"active must be a boolean sequence with one entry per peer ({n}); "
            f"got dtype {mask.dtype} and shape {mask.shape}"
        )
    return None if bool(mask.all()) else mask


def _index(group: list[int], device: torch.device) -> slice | torch.Tensor:
    """Which peers' parameters a pass uses: a slice when they are consecutive (a view, as
    without a mask), else an index tensor (the stacked layers index with either)."""
    if group == list(range(group[0], group[-1] + 1)):
        return slice(group[0], group[-1] + 1)
    return torch.tensor(group, dtype=torch.long, device=device)


class BatchedEngine(SingleAdapterOutputs, TrainingState):
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
        length_sort: bool = False,
        peer_weights: Sequence[float] | None = None,
        ranks: Sequence[int] | None = None,
        privacy: DPSGD | None = None,
        **optim: Any,
    ) -> None:
        """`peer_weights` scale each peer's updates (as a per-peer learning rate would);
        `ranks` gives each peer its own LoRA rank <= spec.r (`lora.ranks`): all peers are held
        at spec.r and a per-peer rank mask keeps the unused rows of A and columns of B at
        exactly zero (their gradients, hence their optimizer state, are then zero too);
        `privacy` makes every step a DP-SGD step (`declora.engine.privacy`; it replaces the
        per-peer clipping of `max_grad_norm`);
        `length_sort` runs each step as passes of `micro_batch` rows of all peers sorted by
        length (`_sorted_passes`): less padding, the same gradient up to float rounding;
        `optim` holds the fields of `OptimSettings` (lr, head_lr, optimizer, ...)."""
        self.model, self.spec, self.n, self.task = model, spec, n_peers, task
        if privacy is not None and len(privacy.peers) != n_peers:
            raise ValueError(f"DP-SGD for {len(privacy.peers)} peers on an engine of {n_peers}")
        self.privacy = privacy
        settings = OptimSettings(**optim)
        self.max_grad_norm = settings.max_grad_norm
        self.peer_chunk = peer_chunk or n_peers
        self.micro_batch = micro_batch
        self.length_sort = length_sort
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
        self.masks = self._rank_masks(ranks)
        self.load_stacked({k: v.unsqueeze(0).expand(n_peers, *v.shape) for k, v in init.items()})
        self.trainable: frozenset[str] = LORA_FACTORS
        head = set(self.head_param_names)
        self.optimizer, self.scheduler = settings.build(
            [p for k, p in self.params.items() if k not in head],
            [self.params[k] for k in self.head_param_names],
        )

    def _rank_masks(self, ranks: Sequence[int] | None) -> dict[str, torch.Tensor]:
        """Per factor, the mask that zeroes each peer's rank slots beyond its own rank (none
        when every peer is at spec.r)."""
        if ranks is None or all(r == self.spec.r for r in ranks):
            return {}
        if len(ranks) != self.n or not all(1 <= r <= self.spec.r for r in ranks):
            raise ValueError(f"expected {self.n} ranks in 1..{self.spec.r}, got {list(ranks)}")
        mask = rank_mask(tuple(ranks), self.spec.r)
        dev = next(iter(self.params.values())).device
        out = {}
        for k, p in self.params.items():
            f = factor_of(k)
            if f is not None:
                m = mask.unsqueeze(-1) if f == "lora_A" else mask.unsqueeze(1)
                out[k] = m.to(device=dev, dtype=p.dtype)
        return out

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

    def _select(self, peers: slice | torch.Tensor) -> None:
        for layer in self.layers:
            layer.peers = peers

    def _chunks(self, upto: int | None = None) -> list[tuple[int, int]]:
        c, n = self.peer_chunk, min(self.n, upto or self.n)
        return [(lo, min(lo + c, n)) for lo in range(0, n, c)]

    def set_trainable(self, factors: Iterable[str]) -> None:
        """Only these LoRA factors ('lora_A', 'lora_B') and the head get gradients from now on.

        Frozen tensors get no gradient (grad None), so the optimizer skips them: their values
        and their optimizer state (momentum, Adam moments and step) stay exactly as they were."""
        self.trainable = check_factors(factors)
        for k, p in self.params.items():
            factor = factor_of(k)
            p.requires_grad_(factor is None or factor in self.trainable)

    def train_step(
        self,
        peer_examples: Sequence[Sequence[Example]],
        active: Sequence[bool] | np.ndarray | None = None,
    ) -> torch.Tensor:
        """One local optimizer step for every active peer; returns each peer's mean loss.

        `active` (one bool per peer, default all) lets offline peers and stragglers that are
        done for the round sit out: their rows are not computed (their examples are ignored and
        may be empty) and their parameters and optimizer state slices are left bit-identical.
        Their loss is NaN (average with `torch.nanmean`). The learning-rate schedule follows
        the global step count, so it advances for everyone. AdamW keeps one `step` counter per
        stacked tensor, so its bias correction counts the steps of the whole network rather
        than those a peer took; SGD (with or without momentum) has no such counter and matches
        per-peer optimizers exactly."""
        if len(peer_examples) != self.n:
            raise ValueError(f"expected batches for {self.n} peers, got {len(peer_examples)}")
        mask = as_active_mask(active, self.n)
        peers = list(range(self.n)) if mask is None else np.flatnonzero(mask).tolist()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        if self.privacy is not None:
            return self._private_step(peer_examples, peers, mask)
        done: list[tuple[list[int], torch.Tensor]] = []
        device = next(iter(self.params.values())).device
        try:
            if self.length_sort:
                done.append((peers, self._sorted_passes(peer_examples, peers, device)))
            else:
                for s in range(0, len(peers), self.peer_chunk):
                    group = peers[s : s + self.peer_chunk]
                    self._select(_index(group, device))
                    if len(group) == 1 and self.micro_batch:
                        rows = peer_examples[group[0]]
                        if len(rows) > self.micro_batch:
                            done.append((group, self._accumulate(rows, self.micro_batch)))
                            continue
                    rows = [ex for i in group for ex in peer_examples[i]]
                    loss = self.task.peer_losses(self.model, self.task.collate(rows), len(group))
                    if loss.requires_grad:  # False only when nothing is trainable
                        loss.sum().backward()
                    done.append((group, loss.detach()))
        finally:
            self._select(slice(None))
        if self.max_grad_norm is not None:
            clip_per_peer(list(self.params.values()), self.max_grad_norm)
        if mask is None:
            self._weighted_step()
        else:
            self._step_keeping(np.flatnonzero(~mask).tolist())
        self.scheduler.step()
        if mask is None:
            return torch.cat([loss for _, loss in done])
        like = done[0][1] if done else torch.zeros(0)
        losses = torch.full((self.n,), float("nan"), dtype=like.dtype, device=like.device)
        for group, loss in done:
            losses[group] = loss
        return losses

    def _private_step(
        self, peer_examples: Sequence[Sequence[Example]], peers: list[int], mask: np.ndarray | None
    ) -> torch.Tensor:
        """One DP-SGD step of the `peers` (the active ones): per-example gradients, each
        clipped, summed per peer, plus the peer's noise, over the expected batch size.

        Per-example gradients come from autograd itself: in a pass every example runs on its
        own copy of its peer's adapter and head (`rows` of the stacked layers), so the gradient
        of each copy is that example's gradient. Examples of any peers, in any number (Poisson
        batches vary), share a pass of at most `micro_batch` rows."""
        dp = self.privacy
        assert dp is not None
        device = next(iter(self.params.values())).device
        names = [k for k, p in self.params.items() if p.requires_grad]
        sums = {k: torch.zeros_like(self.params[k]) for k in names}
        rows = [(i, ex) for i in peers for ex in peer_examples[i]]
        loss_sum = torch.zeros(self.n, dtype=torch.float32)
        count = torch.zeros(self.n, dtype=torch.float32)
        size = self.micro_batch or max(1, len(rows))
        for s in range(0, len(rows), size):
            part = rows[s : s + size]
            idx = torch.tensor([i for i, _ in part], dtype=torch.long, device=device)
            grads, losses = self.example_grads(part)
            sq = torch.zeros(len(part), dtype=torch.float32, device=device)
            for g in grads.values():
                sq += g.reshape(len(part), -1).float().pow(2).sum(dim=1)
            coef = dp.clip_factors(sq.sqrt())
            for k, g in grads.items():
                sums[k].index_add_(0, idx, g * coef.to(g.dtype).view(-1, *([1] * (g.dim() - 1))))
            loss_sum.index_add_(0, idx.cpu(), losses.float().cpu())
            count.index_add_(0, idx.cpu(), torch.ones(len(part)))
        with torch.no_grad():
            for i in peers:
                for k in names:
                    sums[k][i] += dp.noise(i, sums[k][i].shape, sums[k])
            for k in names:
                self.params[k].grad = sums[k] / dp.expected_batch
        if mask is None:
            self._weighted_step()
        else:
            self._step_keeping(np.flatnonzero(~mask).tolist())
        self.scheduler.step()
        losses = loss_sum / count  # NaN: inactive, or an empty Poisson batch
        return losses

    def example_grads(
        self, rows: Sequence[tuple[int, Example]]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Per-example gradients of the trainable tensors ([len(rows), ...] each) and losses
        of (peer, example) rows in one forward/backward pass: each example runs on its own
        copy of its peer's tensors, so the gradient of that copy is its own gradient."""
        device = next(iter(self.params.values())).device
        idx = torch.tensor([i for i, _ in rows], dtype=torch.long, device=device)
        copies = {
            k: p.detach()[idx].requires_grad_(p.requires_grad) for k, p in self.params.items()
        }
        self._set_rows(copies)
        try:
            batch = self.task.collate([ex for _, ex in rows])
            losses = self.task.peer_losses(self.model, batch, len(rows))  # one per example
            if losses.requires_grad:
                losses.sum().backward()
        finally:
            self._set_rows(None)
        grads = {k: c.grad for k, c in copies.items() if c.grad is not None}
        return grads, losses.detach()

    def _set_rows(self, copies: dict[str, torch.Tensor] | None) -> None:
        """Per-example copies for the stacked layers to compute with (None: back to stacks)."""
        c = copies or {}
        for name in self.spec.lora_modules:
            pair = (c[f"{name}.lora_A"], c[f"{name}.lora_B"]) if copies else None
            self.model.get_submodule(name).rows = pair
        for name in self.spec.head_modules:
            pair = (c[f"{name}.weight"], c.get(f"{name}.bias")) if copies else None
            self.model.get_submodule(name).rows = pair

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.privacy is not None:  # the noise generators continue where they were
            state["privacy"] = self.privacy.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self.privacy is not None:
            self.privacy.load_state_dict(state["privacy"])

    @torch.no_grad()
    def _step_keeping(self, frozen: list[int]) -> None:
        """The optimizer step, then put the `frozen` peers' rows back: their parameters and
        every per-element state tensor (a tensor of the parameter's shape). A state tensor that
        this step created gets zeros in their rows, which is how a fresh optimizer starts (SGD's
        momentum buffer and Adam's moments), so their first real step later is a first step."""
        idx = torch.tensor(frozen, dtype=torch.long)
        saved = []
        for p in self.params.values():
            if p.grad is None:
                continue  # the optimizer skips it
            rows = idx.to(p.device)
            state = self.optimizer.state.get(p, {})
            kept = {
                name: t[rows].clone()
                for name, t in state.items()
                if torch.is_tensor(t) and t.shape == p.shape
            }
            saved.append((p, rows, p[rows].clone(), kept))
        self._weighted_step()
        for p, rows, values, kept in saved:
            p[rows] = values
            for name, t in self.optimizer.state[p].items():
                if torch.is_tensor(t) and t.shape == p.shape:
                    t[rows] = kept.get(name, 0)

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

    def _sorted_passes(
        self, peer_examples: Sequence[Sequence[Example]], peers: list[int], device: torch.device
    ) -> torch.Tensor:
        """The `peers`' rows sorted by length (stable) and cut into passes of `micro_batch`
        rows; each row runs on its own peer's parameters (the stacked layers index them per
        row), so a pass pads only to its own longest row. Each row's loss enters its peer's
        mean with the task's row weight (1 a row; a causal LM's answer tokens), so the summed
        gradient is the unsorted step's. Returns each peer's mean loss, in `peers` order."""
        rows = sorted(
            ((i, ex) for i in peers for ex in peer_examples[i]),
            key=lambda row: len(row[1]["input_ids"]),
        )
        weight = torch.tensor([float(self.task.row_weight(ex)) for _, ex in rows], device=device)
        owner = torch.tensor([i for i, _ in rows], dtype=torch.long, device=device)
        per_peer = torch.zeros(self.n, device=device).index_add(0, owner, weight)
        share = weight / per_peer[owner].clamp(min=torch.finfo(weight.dtype).tiny)
        losses = torch.zeros(self.n, device=device)
        size = self.micro_batch or len(rows)
        for s in range(0, len(rows), size):
            part = slice(s, s + size)
            self._select(owner[part])
            batch = self.task.collate([ex for _, ex in rows[part]])
            per_row = self.task.peer_losses(self.model, batch, len(batch["labels"]))
            loss = per_row * share[part].to(per_row.dtype)
            if loss.requires_grad:  # False only when nothing is trainable
                loss.sum().backward()
            losses.index_add_(0, owner[part], loss.detach().float())
        return losses[peers]

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

    @torch.no_grad()
    def reset_optimizer_state(
        self, factors: frozenset[str], peers: np.ndarray | None = None
    ) -> None:
        """Forget the optimizer state (momentum, Adam moments) of these LoRA factors, on every
        peer or on the `peers` mask: state built for factors that have since changed basis.
        A peer's rows of every per-element state tensor become zeros, which is exactly how a
        fresh optimizer starts (SGD's momentum, Adam's moments); Adam's step count is shared by
        the stacked tensor and is reset only when every peer is."""
        everyone = peers is None or bool(np.all(peers))
        for name, p in self.params.items():
            if factor_of(name) not in factors:
                continue
            chosen = np.ones(self.n, dtype=bool) if peers is None else np.asarray(peers)
            rows = torch.as_tensor(np.flatnonzero(chosen), dtype=torch.long, device=p.device)
            for t in self.optimizer.state.get(p, {}).values():
                if torch.is_tensor(t) and t.shape == p.shape:
                    t[rows] = 0
                elif torch.is_tensor(t) and everyone:
                    t.zero_()  # Adam's step count

    def _optimizers(self) -> tuple[list, list]:
        return [self.optimizer], [self.scheduler]

    def momentum(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """SGD's momentum buffer of each of these tensors, stacked over peers like the tensor
        (zeros where no step has made one yet)."""
        out = {}
        for k in keys:
            p = self.params[k]
            buf = self.optimizer.state.get(p, {}).get("momentum_buffer")
            out[k] = torch.zeros_like(p) if buf is None else buf.detach()
        return out

    @torch.no_grad()
    def load_momentum(self, buffers: dict[str, torch.Tensor]) -> None:
        """Replace these tensors' momentum buffers (a zero buffer is what SGD's first step
        would start from, so creating one where none was is exact)."""
        for k, v in buffers.items():
            p = self.params[k]
            state = self.optimizer.state[p]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(p)
            state["momentum_buffer"].copy_(v)
            if k in self.masks:
                state["momentum_buffer"].mul_(self.masks[k])

    def stacked(self) -> dict[str, torch.Tensor]:
        return {k: p.detach() for k, p in self.params.items()}

    @torch.no_grad()
    def load_stacked(self, values: dict[str, torch.Tensor]) -> None:
        for k, v in values.items():
            self.params[k].copy_(v)
            if k in self.masks:  # a peer holds nothing beyond its own rank
                self.params[k].mul_(self.masks[k])

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
    def outputs_all_peers(
        self, examples: Sequence[Example], peers: int | None = None
    ) -> torch.Tensor:
        """Each peer's own model on the same examples: [n, len(examples), ...]; with `peers`,
        only the first `peers` of them."""
        self.model.eval()
        out = []
        try:
            for lo, hi in self._chunks(peers):
                self._select(slice(lo, hi))
                batch = self.task.collate(list(examples) * (hi - lo))
                res = self.task.outputs(self.model, batch)
                out.append(res.view(hi - lo, len(examples), *res.shape[1:]))
        finally:
            self._select(slice(None))
        return torch.cat(out)
