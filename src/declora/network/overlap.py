"""Gossip that overlaps compute (`comm.overlap=true`): one round stale, exactly defined.

Synchronous Dec-LoRA computes, then waits for its neighbours, then mixes:

    y_i^t = local_steps(x_i^{t-1}),    x_i^t = sum_j W_ij y_j^t

With overlap, a peer sends its value x_i^{t-1} at the start of round t and trains at once; the
neighbours' x_j^{t-1} arrive while it computes, and their mix is applied as a correction when
its local steps end:

    y_i^t = local_steps(x_i^{t-1}),    x_i^t = y_i^t + (sum_j W_ij x_j^{t-1} - x_i^{t-1})

that is x^t = W x^{t-1} + (y^t - x^{t-1}): the gossip and the local update are both computed
from the same x^{t-1} (the form of D-PSGD in Lian et al. 2017, whose communication and
computation run in parallel by construction). Without training it is plain gossip
(x^t = W x^{t-1}); the correction sums to zero over the peers for a doubly stochastic W, so
the network average moves only by the local updates. `sum_j W_ij x_j` is whatever the wrapped
communicator computes (exact, quantized, error feedback, CHOCO, a robust rule), with the
matrix of round t. A round sends one message per neighbour, as before: x^0 .. x^{T-1}.

Because a round's exchange starts and ends inside the round, a checkpoint after round t holds
no message in flight: resume is exact with nothing more than the synchronous state.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Protocol

import numpy as np
import torch


class Mixer(Protocol):
    """The wrapped communicator (the round loop's `Communicator`)."""

    last_bytes: np.ndarray | None

    def mix(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...
    def set_mixing(self, mixing: np.ndarray) -> None: ...
    def state_dict(self) -> dict[str, torch.Tensor]: ...
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


class OverlappedGossip:
    """A communicator whose exchange of round t runs while round t's local steps do.

    `start(x)` hands the values a round begins with to the wrapped communicator: in a
    background thread when `background` (real peers: the transport's sends and receives
    proceed during compute), or deferred to `mix` (simulation: the same arithmetic, so the
    equality tests between the two hold). `mix(y)` waits for that exchange and returns
    y + (mixed - x). Only the round loop's thread uses the process group outside `start` ..
    `mix`, and nothing else uses it in between, so the transport is never used by two threads
    at once."""

    def __init__(self, inner: Mixer, *, background: bool) -> None:
        self.inner, self.background = inner, background
        self._sent: dict[str, torch.Tensor] | None = None
        self._mixed: dict[str, torch.Tensor] | None = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self.blocked_seconds = 0.0  # the round loop waited for the exchange (not hidden)

    # -- the Communicator contract, passed through
    @property
    def last_bytes(self) -> np.ndarray | None:
        return self.inner.last_bytes

    def set_mixing(self, mixing: np.ndarray) -> None:
        if self._sent is not None:
            raise RuntimeError("the mixing matrix changed while an exchange was in flight")
        self.inner.set_mixing(mixing)

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self._sent is not None:
            raise RuntimeError("a checkpoint was taken while an exchange was in flight")
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.inner.load_state_dict(state)

    def round_metrics(self) -> dict[str, Any]:
        metrics = getattr(self.inner, "round_metrics", None)
        return metrics() if metrics is not None else {}

    @property
    def seconds(self) -> float:
        """Time spent in the exchange (encode, transfer, decode, mix), hidden or not."""
        return float(getattr(self.inner, "seconds", 0.0))

    @property
    def wait_seconds(self) -> float:
        return float(getattr(self.inner, "wait_seconds", 0.0))

    @property
    def failed(self) -> set[int]:
        """Neighbours given up on (comm.on_peer_failure=skip)."""
        return set(getattr(self.inner, "failed", ()))

    @property
    def bytes_on_wire(self) -> int:
        return int(getattr(self.inner, "bytes_on_wire", 0))

    # -- the overlap
    def start(self, values: dict[str, torch.Tensor]) -> None:
        """Send the values this round starts from (x^{t-1}); returns at once."""
        if self._sent is not None:
            raise RuntimeError("start() twice without mix(): one exchange per round")
        self._sent = {k: v.detach().clone() for k, v in values.items()}
        self._mixed, self._error = None, None
        if self.background:
            self._thread = threading.Thread(
                target=self._exchange, name="declora-gossip", daemon=True
            )
            self._thread.start()

    def _exchange(self) -> None:
        assert self._sent is not None
        try:
            self._mixed = self.inner.mix(self._sent)
        except BaseException as exc:  # re-raised in the round loop's thread by `mix`
            self._error = exc

    def mix(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """values (y^t, after the local steps) + the mix of what was sent minus what was sent."""
        if self._sent is None:
            raise RuntimeError("mix() without start(): the round sent nothing")
        began = time.perf_counter()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        else:
            self._exchange()
        self.blocked_seconds += time.perf_counter() - began
        sent, mixed, error = self._sent, self._mixed, self._error
        self._sent, self._mixed, self._error = None, None, None
        if error is not None:
            raise error
        assert mixed is not None
        return {k: v + (mixed[k].to(v.dtype) - sent[k].to(v.dtype)) for k, v in values.items()}

    def close(self) -> None:
        """Wait for an exchange still in flight (a run that stops early)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._sent = None
