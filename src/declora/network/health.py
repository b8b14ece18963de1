"""Non-finite numbers stop a run where they appear, naming the round and the peer.

One infinite learning rate or one exploding step turns a peer's adapter into NaN, and the dense
gossip product then spreads it to every peer in one step (0 x NaN = NaN, so even peers that are
not neighbours are hit). Without a check such a run ends "complete" with NaN adapters and NaN
metrics. Two guards:

* `check_peers`: the round loop checks each peer's loss and parameters every round, before
  anything is mixed, evaluated or saved; a peer that turned non-finite raises `Diverged`, so
  the run ends `failed` with the round and the peer in its error and no NaN checkpoint or
  adapter is written.
* `MessageGuard`: a simulated communicator refuses a neighbour's non-finite message exactly as
  a real peer does (`declora.network.distributed.PeerGossip`): with `comm.on_peer_failure=error`
  it raises naming the receiving peer and the neighbour; with `skip` the receiver drops that
  neighbour for good and renormalises its weights over the rest, and the dropped neighbour,
  which the receiver no longer sends to, drops the receiver one exchange later (a real peer
  sees its silence as a failure).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from declora.errors import DecloraError

_ADVICE = "lower train.lr, keep train.max_grad_norm set, or use train.schedule=linear or cosine"


class Diverged(DecloraError):
    """A peer's loss or adapter became NaN or infinite: training diverged."""


class NonFiniteMessage(DecloraError):
    """A neighbour's message holds NaN or infinite values (what a real peer refuses)."""


def nonfinite_rows(values: Mapping[str, torch.Tensor]) -> dict[int, list[str]]:
    """Rows of stacked tensors ([n, ...], one row per peer) holding NaN or inf: row -> names."""
    bad: dict[int, list[str]] = {}
    for name, v in values.items():
        if not v.is_floating_point() or v.numel() == 0 or bool(torch.isfinite(v).all()):
            continue
        rows = ~torch.isfinite(v.reshape(v.shape[0], -1)).all(dim=1)
        for i in torch.nonzero(rows).flatten().tolist():
            bad.setdefault(int(i), []).append(name)
    return bad


def _names(names: Sequence[str]) -> str:
    shown = ", ".join(names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def check_losses(
    round_: int, loss: torch.Tensor, peers: Sequence[int], active: np.ndarray | None = None
) -> None:
    """Raise `Diverged` when an active peer's loss of one local step is NaN or infinite (a
    peer that sat the step out has NaN by convention and is not checked)."""
    flat = loss.detach().reshape(-1).float().cpu()
    if bool(torch.isfinite(flat).all()):
        return
    for i, value in enumerate(flat.tolist()):
        on = True if active is None else bool(active[i])
        if on and not np.isfinite(value):
            raise Diverged(
                f"round {round_}: peer {peers[i]} diverged: its training loss is {value}; {_ADVICE}"
            )


def check_peers(
    round_: int, values: Mapping[str, torch.Tensor], peers: Sequence[int], when: str
) -> None:
    """Raise `Diverged` naming the first peer (of `peers`, the rows of `values`) whose
    adapter holds a NaN or infinite value; `when` says at which point of the round."""
    bad = nonfinite_rows(values)
    if bad:
        row = min(bad)
        others = len(bad) - 1
        also = f" ({others} other peer{'s' if others > 1 else ''} too)" if others else ""
        raise Diverged(
            f"round {round_}: peer {peers[row]} diverged: its adapter holds NaN or infinite "
            f"values {when} (in {_names(bad[row])}){also}; {_ADVICE}"
        )


_SKIP_HINT = "set comm.on_peer_failure=skip to continue without it"


def refusal(
    W: np.ndarray | torch.Tensor,
    sender: int,
    names: Sequence[str],
    exchange: int | None = None,
    hint: str = _SKIP_HINT,
) -> NonFiniteMessage:
    """The error a real peer raises on a neighbour's non-finite message (error mode), for the
    first peer that receives from `sender` under W."""
    column = np.asarray(W.to_dense() if torch.is_tensor(W) else W)[:, sender]
    receiver = next((i for i, w in enumerate(column) if w != 0 and i != sender), sender)
    when = "" if exchange is None else f" (exchange {exchange})"
    return NonFiniteMessage(
        f"peer {receiver}: neighbour {sender} sent non-finite values{when}: in "
        f"{_names(list(names))}; {hint}"
    )


class MessageGuard:
    """For a simulated communicator: what real peers do with non-finite messages.

    `mixing(W, bad)` takes the round's matrix and the senders whose decoded message is
    non-finite this exchange, and returns the matrix the peers actually mix with (W itself
    while nothing was ever refused)."""

    def __init__(self, on_failure: str = "error") -> None:
        if on_failure not in ("error", "skip"):
            raise DecloraError(
                f"comm.on_peer_failure={on_failure!r} is unknown; choose error or skip"
            )
        self.on_failure = on_failure
        self.exchanges = 0
        self.dropped: set[tuple[int, int]] = set()  # (receiver, sender) pairs, for good
        self._silent: set[tuple[int, int]] = set()  # receivers that stopped sending, last time

    def mixing(self, W: np.ndarray, bad: Mapping[int, Sequence[str]]) -> np.ndarray:
        self.exchanges += 1
        n = W.shape[0]
        # a receiver that dropped a sender stopped sending to it: that sender now drops it
        for receiver, sender in self._silent:
            if W[sender, receiver] != 0:
                self.dropped.add((sender, receiver))
        self._silent = set()
        for sender in sorted(bad):
            for receiver in range(n):
                if receiver == sender or W[receiver, sender] == 0:
                    continue
                if (receiver, sender) in self.dropped:
                    continue
                if self.on_failure == "error":
                    raise refusal(W, sender, bad[sender], self.exchanges)
                self.dropped.add((receiver, sender))
                self._silent.add((receiver, sender))
        if not self.dropped:
            return W
        out = np.array(W, dtype=np.float64, copy=True)
        rows = sorted({r for r, _ in self.dropped})
        for receiver, sender in self.dropped:
            out[receiver, sender] = 0.0
        for r in rows:
            total = out[r].sum()
            if total > 0:
                out[r] /= total
            else:  # no weight left (W_ii = 0 and every source dropped): keep its own value
                out[r] = 0.0
                out[r, r] = 1.0
        return out
