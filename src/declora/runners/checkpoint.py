"""Checkpoints: everything a round loop needs to continue bit for bit, in safetensors + JSON.

A checkpoint is a folder `round-000012/` holding `state.safetensors` (every tensor: adapters,
optimizer moments, generator states, data orders) and `meta.json` (everything else: round,
metrics so far, learning-rate schedule, numpy generator states, and the size and SHA-256 of the
tensor file). It is written into a temporary sibling and renamed into place, so a crash leaves
either the whole checkpoint or none; a damaged one (truncated, changed) is refused with a clear
error instead of being half-loaded. Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from declora.errors import DecloraError

FORMAT = 1
STATE_FILE = "state.safetensors"
META_FILE = "meta.json"
_ROUND_DIR = re.compile(r"^round-(\d{6,})$")
_TENSOR = "__tensor__"
_INT_KEYS = "__int_keys__"


class CheckpointError(DecloraError):
    """A checkpoint is missing, damaged or belongs to another run."""


def round_dir(root: Path, round_: int) -> Path:
    return root / f"round-{round_:06d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------ nested state <-> tensors


def flatten(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Move every tensor of a nested dict/list into `tensors` and return a JSON-able copy with
    references in its place. Integer dict keys (optimizer states) are kept as integers."""
    if isinstance(obj, torch.Tensor):
        key = prefix
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {_TENSOR: key}
    if isinstance(obj, np.ndarray):
        return flatten(torch.from_numpy(np.ascontiguousarray(obj)), prefix, tensors)
    if isinstance(obj, dict):
        out = {str(k): flatten(v, f"{prefix}.{k}", tensors) for k, v in obj.items()}
        if obj and all(isinstance(k, int) for k in obj):
            return {_INT_KEYS: out}
        return out
    if isinstance(obj, list | tuple):
        return [flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, np.integer | np.floating | np.bool_):
        return obj.item()
    return obj


def unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `flatten`."""
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR}:
            key = obj[_TENSOR]
            if key not in tensors:
                raise CheckpointError(f"checkpoint tensor {key!r} is missing from {STATE_FILE}")
            return tensors[key]
        if set(obj) == {_INT_KEYS}:
            return {int(k): unflatten(v, tensors) for k, v in obj[_INT_KEYS].items()}
        return {k: unflatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unflatten(v, tensors) for v in obj]
    return obj


# ------------------------------------------------------------------ one checkpoint on disk


@dataclass
class Checkpoint:
    """A loaded checkpoint: its round, its JSON state (tensors put back in place) and where."""

    path: Path
    round: int
    state: dict[str, Any]


def save(root: Path, round_: int, state: dict[str, Any], *, fingerprint: str, keep: int) -> Path:
    """Write `state` (nested dicts/lists of tensors, numbers, strings) as round `round_` under
    `root`, atomically; then delete all but the newest `keep` checkpoints."""
    root.mkdir(parents=True, exist_ok=True)
    final = round_dir(root, round_)
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    tensors: dict[str, torch.Tensor] = {}
    body = flatten(state, "s", tensors)
    save_file(tensors, str(tmp / STATE_FILE))
    meta = {
        "format": FORMAT,
        "round": round_,
        "fingerprint": fingerprint,
        "state_bytes": (tmp / STATE_FILE).stat().st_size,
        "state_sha256": _sha256(tmp / STATE_FILE),
        "state": body,
    }
    (tmp / META_FILE).write_text(json.dumps(meta), encoding="utf-8")
    for f in (tmp / STATE_FILE, tmp / META_FILE):
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():  # a rerun of the same round (after a resume) replaces it
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in rounds(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(round_dir(root, old), ignore_errors=True)
    return final


def rounds(root: Path) -> list[int]:
    """Rounds of the complete checkpoints under `root` (renamed into place), oldest first."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _ROUND_DIR.match(p.name)
        if m and p.is_dir():
            found.append(int(m.group(1)))
    return sorted(found)


def load(path: Path, *, fingerprint: str | None = None) -> Checkpoint:
    """Read one checkpoint folder, checking it is whole and belongs to this run."""
    meta_file, state_file = path / META_FILE, path / STATE_FILE
    for f in (meta_file, state_file):
        if not f.is_file():
            raise CheckpointError(f"checkpoint {str(path)!r} is incomplete: {f.name} is missing")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is damaged: {META_FILE} is not valid JSON ({exc})"
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has an unknown format "
            f"({meta.get('format') if isinstance(meta, dict) else type(meta).__name__}); "
            f"this declora reads format {FORMAT}"
        )
    size = state_file.stat().st_size
    if size != meta.get("state_bytes"):
        raise CheckpointError(
            f"checkpoint {str(path)!r} is damaged: {STATE_FILE} has {size} bytes but was "
            f"written with {meta.get('state_bytes')} (truncated?); delete this folder to resume "
            "from the previous checkpoint"
        )
    if _sha256(state_file) != meta.get("state_sha256"):
        raise CheckpointError(
            f"checkpoint {str(path)!r} is damaged: {STATE_FILE} does not match its recorded "
            "SHA-256; delete this folder to resume from the previous checkpoint"
        )
    if fingerprint is not None and meta.get("fingerprint") != fingerprint:
        raise CheckpointError(
            f"checkpoint {str(path)!r} was written by a run with another configuration or "
            "setup; resume with the configuration it was written with"
        )
    try:
        tensors = load_file(str(state_file))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} is damaged: {exc}") from None
    return Checkpoint(path, int(meta["round"]), unflatten(meta["state"], tensors))


def latest(root: Path, *, fingerprint: str | None = None) -> Checkpoint | None:
    """The newest complete checkpoint under `root`, or None when there is none."""
    found = rounds(root)
    return load(round_dir(root, found[-1]), fingerprint=fingerprint) if found else None


def fingerprint_of(parts: Iterable[object]) -> str:
    """A short stable digest of JSON-able parts (config, shapes, data sizes)."""
    text = json.dumps(list(parts), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ------------------------------------------------------------------ what the round loop holds


def optimizers_of(engine: object) -> tuple[list, list]:
    """The optimizers and learning-rate schedulers of an engine (one, or one per peer)."""
    if hasattr(engine, "optimizers"):
        return list(engine.optimizers), list(engine.schedulers)  # type: ignore[attr-defined]
    return [engine.optimizer], [engine.scheduler]  # type: ignore[attr-defined]


def engine_state(engine: object) -> dict[str, Any]:
    opts, scheds = optimizers_of(engine)
    return {
        "values": dict(engine.stacked()),  # type: ignore[attr-defined]
        "optimizers": [o.state_dict() for o in opts],
        "schedulers": [s.state_dict() for s in scheds],
    }


def load_engine_state(engine: object, state: dict[str, Any]) -> None:
    opts, scheds = optimizers_of(engine)
    if len(opts) != len(state["optimizers"]):
        raise CheckpointError(
            f"checkpoint holds {len(state['optimizers'])} optimizers, this engine has {len(opts)}"
        )
    engine.load_stacked(state["values"])  # type: ignore[attr-defined]
    for o, s in zip(opts, state["optimizers"], strict=True):
        o.load_state_dict(s)
    for sch, s in zip(scheds, state["schedulers"], strict=True):
        sch.load_state_dict(s)


def sampler_state(sampler: Any) -> dict[str, Any]:
    return {
        "rng": sampler.rng.bit_generator.state,
        "order": torch.from_numpy(sampler.order.copy()),
        "pos": int(sampler.pos),
        "epoch": int(sampler.epoch),
    }


def load_sampler_state(sampler: Any, state: dict[str, Any]) -> None:
    sampler.rng.bit_generator.state = state["rng"]
    sampler.order = state["order"].numpy().astype(np.int64)
    sampler.pos = int(state["pos"])
    sampler.epoch = int(state["epoch"])
