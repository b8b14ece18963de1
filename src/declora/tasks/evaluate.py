"""Held-out classification metrics of the averaged model and of each peer's own model."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from declora.model.adapters import average
from declora.tasks.metrics import classification_metrics
from declora.tasks.task import Example

if TYPE_CHECKING:
    from declora.engine.round_loop import Engine


def peers_outputs(engine: Engine, batches: Sequence[Sequence[Example]]) -> torch.Tensor:
    """Each peer's own model on `batches`, concatenated over examples: [n, examples, ...].

    Where every peer holds the same adapters (FedAvg after its exact average), the first peer
    alone is run and its outputs stand for all: n times less work for the same model. Outputs
    can differ from a run of every peer only in float rounding (other batch shapes)."""
    same = engine.n > 1 and all(
        bool(torch.equal(v, v[:1].expand_as(v))) for v in engine.stacked().values()
    )
    out = torch.cat([engine.outputs_all_peers(b, peers=1 if same else None) for b in batches], 1)
    return out.expand(engine.n, *out.shape[1:]) if same else out


class Evaluator:
    """Held-out classification metrics of the averaged model and of each peer's own model."""

    primary = "accuracy"
    columns = ("accuracy", "macro_f1")
    higher_is_better = True

    def __init__(
        self,
        test: Sequence[Example],
        num_classes: int,
        *,
        binary_f1: bool = False,
        batch_size: int = 128,
        max_examples: int | None = None,
        final_max_examples: int | None = None,
        peer_max_examples: int | None = None,
        seed: int = 0,
        label_mix: np.ndarray | None = None,
    ) -> None:
        """`label_mix` ([peers, classes], rows summing to 1): each evaluated peer's own class
        proportions, for the personalized score (`personal_accuracy`)."""
        self.test, self.num_classes, self.binary_f1 = test, num_classes, binary_f1
        self.label_mix = label_mix
        self.batch_size = batch_size
        order = np.random.default_rng(seed).permutation(len(test))
        self.avg_idx = self._by_length(order[: max_examples or len(test)])
        self.final_idx = self._by_length(order[: final_max_examples or len(test)])
        self.peer_idx = self._by_length(order[: peer_max_examples or len(test)])

    def _by_length(self, idx: np.ndarray) -> np.ndarray:
        """Evaluation order by length, so batches carry little padding (metrics ignore order)."""
        return np.array(sorted(idx, key=lambda i: len(self.test[i]["input_ids"])), dtype=np.int64)

    def _labels(self, idx: np.ndarray) -> np.ndarray:
        return np.array([self.test[i]["label"] for i in idx])

    def _batches(self, idx: np.ndarray, size: int) -> list[list[Example]]:
        return [[self.test[i] for i in idx[s : s + size]] for s in range(0, len(idx), size)]

    def average(self, engine: Engine, *, final: bool = False) -> dict[str, float]:
        idx = self.final_idx if final else self.avg_idx
        return self.score(engine, average(engine.stacked()), idx)

    def logits(
        self, engine: Engine, values: dict[str, torch.Tensor], idx: np.ndarray | None = None
    ) -> tuple[torch.Tensor, np.ndarray]:
        """One model's (`values`, unstacked adapters) outputs on the examples `idx` (default:
        the final score's), with their labels: for analyses that compare two models example
        by example, on the batches the metrics use."""
        idx = self.final_idx if idx is None else idx
        batches = self._batches(idx, self.batch_size)
        return torch.cat([engine.outputs_single(values, b) for b in batches]), self._labels(idx)

    def score(
        self, engine: Engine, values: dict[str, torch.Tensor], idx: np.ndarray
    ) -> dict[str, float]:
        """Metrics of one model (`values`, unstacked adapters) on the examples `idx`."""
        logits, labels = self.logits(engine, values, idx)
        preds = logits.argmax(-1).numpy()
        out = classification_metrics(preds, labels, self.num_classes, binary_f1=self.binary_f1)
        return {**out, "eval_examples": len(idx)}

    def peers(self, engine: Engine) -> list[dict[str, float]]:
        size = max(1, self.batch_size // max(1, min(engine.n, 8)))
        logits = peers_outputs(engine, self._batches(self.peer_idx, size))
        preds = logits.argmax(-1).numpy()
        labels = self._labels(self.peer_idx)
        out = [
            classification_metrics(p, labels, self.num_classes, binary_f1=self.binary_f1)
            for p in preds
        ]
        if self.label_mix is not None and len(self.label_mix) == len(out):
            for metrics, p, mix in zip(out, preds, self.label_mix, strict=True):
                metrics["personal_accuracy"] = personal_accuracy(p, labels, mix)
        return out

    def extras(self, engine: Engine) -> dict[str, Any]:
        return {}


def personal_accuracy(preds: np.ndarray, labels: np.ndarray, mix: np.ndarray) -> float:
    """A peer's accuracy on held-out examples drawn with its own label mix: its accuracy on
    each class of the evaluation sample, weighted by that class's share of the peer's training
    data. This is the expected accuracy on a test set resampled class by class to the peer's
    proportions, computed from one shared sample (no extra forward passes, no resampling
    noise). Classes absent from the sample count as 0 weight (the rest renormalised)."""
    correct = preds == labels
    total, weight = 0.0, 0.0
    for c, share in enumerate(mix):
        seen = labels == c
        if share > 0 and seen.any():
            total += float(share) * float(correct[seen].mean())
            weight += float(share)
    return total / weight if weight > 0 else float("nan")


def summarize_peers(per_peer: list[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key in per_peer[0]:
        vals = np.array([m[key] for m in per_peer])
        out[f"peers_{key}"] = float(vals.mean())
        out[f"peers_{key}_min"] = float(vals.min())
        out[f"peers_{key}_max"] = float(vals.max())
    return out


class ValidationEvaluator(Evaluator):
    """Per-round scores on a validation split; the test split is scored once, at the end.

    Rounds are compared on validation only (the same `max_examples` subsample every round, so
    the best round is picked on equal footing). At the final round the final averaged model,
    the best-validation model (its adapters kept from the round that scored best, earliest on
    ties) and, with several peers, each peer's own model are scored on test, under `test_*`,
    `val_best_test_*` and `peers_test_*`. Nothing is chosen on test. With `best_path` the kept
    adapters survive an interrupted run (a resumed run replays rounds exactly, so the file and
    the replay agree); a fresh run (`resume` False) discards a stale file.
    """

    columns = (
        "accuracy",
        "macro_f1",
        "test_accuracy",
        "test_macro_f1",
        "val_best_round",
        "val_best_test_accuracy",
    )

    def __init__(
        self,
        val: Sequence[Example],
        test: Sequence[Example],
        num_classes: int,
        *,
        binary_f1: bool = False,
        batch_size: int = 128,
        max_examples: int | None = None,
        final_max_examples: int | None = None,
        peer_max_examples: int | None = None,
        seed: int = 0,
        label_mix: np.ndarray | None = None,
        best_path: Path | None = None,
        resume: bool = False,
        final_test: bool = True,
    ) -> None:
        """`final_test` False: the final adapters are scored on validation only (no `test_*`
        keys); the best-validation ones and the peers are still scored on test."""
        self.final_test = final_test
        common = dict(binary_f1=binary_f1, batch_size=batch_size, seed=seed, label_mix=label_mix)
        super().__init__(
            val,
            num_classes,
            max_examples=max_examples,
            final_max_examples=max_examples,
            peer_max_examples=peer_max_examples,
            **common,  # type: ignore[arg-type]
        )
        self.test_eval = Evaluator(
            test,
            num_classes,
            max_examples=final_max_examples,
            final_max_examples=final_max_examples,
            peer_max_examples=peer_max_examples,
            **common,  # type: ignore[arg-type]
        )
        self.best_path = best_path
        self.best_score = -math.inf
        self.best_values: dict[str, torch.Tensor] | None = None
        if best_path is not None and best_path.is_file():
            if resume:
                with safe_open(str(best_path), framework="pt") as f:
                    self.best_score = float(f.metadata()["score"])
                    self.best_values = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            else:
                best_path.unlink()

    def average(self, engine: Engine, *, final: bool = False) -> dict[str, float]:
        values = average(engine.stacked())
        out = self.score(engine, values, self.avg_idx)
        if out[self.primary] > self.best_score:
            self._keep(out[self.primary], values)
        if not final:
            return out
        assert self.best_values is not None  # set by this or an earlier round
        idx = self.test_eval.final_idx
        out["val_best_accuracy"] = self.best_score
        if self.final_test:
            out.update(_prefixed("test_", self.test_eval.score(engine, values, idx)))
        best = self.test_eval.score(engine, self.best_values, idx)
        out.update(_prefixed("val_best_test_", best))
        if engine.n > 1:
            per_peer = [_prefixed("test_", m) for m in self.test_eval.peers(engine)]
            out.update(summarize_peers(per_peer))
        return out

    def _keep(self, score: float, values: dict[str, torch.Tensor]) -> None:
        self.best_score = score
        self.best_values = {k: v.detach().clone() for k, v in values.items()}
        if self.best_path is None:
            return
        self.best_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.best_path.with_suffix(".tmp")
        save_file(
            {k: v.contiguous() for k, v in self.best_values.items()},
            str(tmp),
            metadata={"score": repr(float(score))},
        )
        os.replace(tmp, self.best_path)


def _prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}{k}": v for k, v in metrics.items()}


def mark_best_round(records: list[dict[str, Any]], key: str = "accuracy") -> bool:
    """Write `val_best_round` into the final record of a run with a validation split: the
    earliest evaluated round whose validation `key` equals the best one (the round whose
    adapters `ValidationEvaluator` kept). Done from the records, which a resumed run restores,
    because the evaluator does not see round numbers. False when there is nothing to mark."""
    if not records or "val_best_accuracy" not in records[-1]:
        return False
    best = records[-1]["val_best_accuracy"]
    records[-1]["val_best_round"] = next(r["round"] for r in records if r.get(key) == best)
    return True
