"""Checkpoints: everything a round loop needs to continue bit for bit, in safetensors + JSON.

A checkpoint is a folder `round-000012/` holding `state.safetensors` (every tensor: adapters,
optimizer moments, generator states, data orders), `meta.json` (everything else: round,
metrics so far, learning-rate schedule, numpy generator states) and `manifest.json` (the size
and SHA-256 of each of the other two). It is written into a temporary sibling and renamed into
place, so a crash leaves either the whole checkpoint or none. Loading checks every file against
the manifest and the structure of what it holds before anything is used: a truncated, edited
or foreign checkpoint is refused with an error that says what to do, never half-loaded.
Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from declora.errors import CheckpointError

FORMAT = 2  # 1 (declora before 0.2) hashed state.safetensors only
STATE_FILE = "state.safetensors"
META_FILE = "meta.json"
MANIFEST_FILE = "manifest.json"
COVERED = (STATE_FILE, META_FILE)  # what the manifest vouches for
_ROUND_DIR = re.compile(r"^round-(\d{6,})$")
_TENSOR = "__tensor__"
_INT_KEYS = "__int_keys__"


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
                raise CheckpointError(f"tensor {key!r} is missing from {STATE_FILE}")
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
    meta = {"format": FORMAT, "round": round_, "fingerprint": fingerprint, "state": body}
    (tmp / META_FILE).write_text(json.dumps(meta), encoding="utf-8")
    manifest = {
        "format": FORMAT,
        "files": {
            name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
            for name in COVERED
        },
    }
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    for name in (*COVERED, MANIFEST_FILE):
        with open(tmp / name, "rb") as fh:
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


def _advice(path: Path) -> str:
    """What to do about an unusable checkpoint: deleting it falls back to the previous one,
    or (with none left) starts this algorithm over; both are what `--resume` then does."""
    m = _ROUND_DIR.match(path.name)
    older = [r for r in rounds(path.parent) if m and r < int(m.group(1))]
    if older:
        return f"delete {str(path)!r} and --resume again to continue from round {older[-1]}"
    return (
        f"delete {str(path)!r} and --resume again to start this algorithm over from round 1 "
        "(there is no older checkpoint)"
    )


def _refuse(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {str(path)!r} is {problem}; {_advice(path)}")


def _json_file(path: Path, name: str) -> Any:
    try:
        return json.loads((path / name).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _refuse(path, f"damaged: {name} is not valid JSON ({exc})") from None


def _check_files(path: Path) -> None:
    """Every file of the checkpoint exists, is listed in the manifest and matches it."""
    for name in (*COVERED, MANIFEST_FILE):
        if not (path / name).is_file():
            raise _refuse(path, f"incomplete: {name} is missing")
    manifest = _json_file(path, MANIFEST_FILE)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise CheckpointError(
            f"checkpoint {str(path)!r} has an unknown format ({found}); this declora reads "
            f"format {FORMAT}: resume it with the declora that wrote it, or start the run again"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or set(files) != set(COVERED):
        raise _refuse(path, f"damaged: {MANIFEST_FILE} does not list {', '.join(COVERED)}")
    extra = sorted(p.name for p in path.iterdir() if p.name not in (*COVERED, MANIFEST_FILE))
    if extra:
        raise _refuse(path, f"changed: it holds {extra[0]!r}, which it was not written with")
    for name in COVERED:
        entry = files[name]
        if not isinstance(entry, dict):
            raise _refuse(path, f"damaged: {MANIFEST_FILE} has no size and hash of {name}")
        size = (path / name).stat().st_size
        if size != entry.get("bytes"):
            raise _refuse(
                path,
                f"damaged: {name} has {size} bytes but was written with {entry.get('bytes')} "
                "(truncated or edited?)",
            )
        if _sha256(path / name) != entry.get("sha256"):
            raise _refuse(
                path, f"damaged: {name} does not match its recorded SHA-256 (edited or corrupted)"
            )


def load(path: Path, *, fingerprint: str | None = None, also: Collection[str] = ()) -> Checkpoint:
    """Read one checkpoint folder, checking it is whole, well formed and belongs to this run
    (its fingerprint is `fingerprint`, or one of `also`: the same run as older declora
    versions fingerprinted it)."""
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if (path / META_FILE).is_file() and not (path / MANIFEST_FILE).is_file():
        meta = _json_file(path, META_FILE)
        if isinstance(meta, dict) and meta.get("format") == 1:
            raise CheckpointError(
                f"checkpoint {str(path)!r} has format 1 (an older declora, which did not check "
                f"all of its files); this declora reads format {FORMAT}: resume it with the "
                "declora that wrote it, or start the run again"
            )
    _check_files(path)
    meta = _json_file(path, META_FILE)
    m = _ROUND_DIR.match(path.name)
    if (
        not isinstance(meta, dict)
        or meta.get("format") != FORMAT
        or not isinstance(meta.get("round"), int)
        or not isinstance(meta.get("state"), dict)
        or not isinstance(meta.get("fingerprint"), str)
    ):
        raise _refuse(path, f"malformed: {META_FILE} lacks its round, fingerprint or state")
    if m and int(m.group(1)) != meta["round"]:
        raise _refuse(path, f"inconsistent: it holds round {meta['round']}, not {m.group(1)}")
    if fingerprint is not None and meta["fingerprint"] not in (fingerprint, *also):
        raise CheckpointError(
            f"checkpoint {str(path)!r} was written by a run with another configuration or "
            "setup; resume with the configuration it was written with"
        )
    try:
        tensors = load_file(str(path / STATE_FILE))
    except (SafetensorError, OSError) as exc:
        raise _refuse(path, f"damaged: {exc}") from None
    try:
        state = unflatten(meta["state"], tensors)
    except (CheckpointError, AttributeError, TypeError, ValueError) as exc:
        raise _refuse(path, f"malformed: {exc}") from None
    if "round" in state and state["round"] != meta["round"]:
        raise _refuse(path, f"inconsistent: its state is of round {state['round']}")
    return Checkpoint(path, meta["round"], state)


def unusable(path: Path, exc: BaseException) -> CheckpointError:
    """The error for a whole checkpoint whose contents do not fit this run (another declora
    version's layout, another engine): what went wrong and what to do."""
    return _refuse(path, f"not what this run can continue from ({type(exc).__name__}: {exc})")


def latest(
    root: Path, *, fingerprint: str | None = None, also: Collection[str] = ()
) -> Checkpoint | None:
    """The newest complete checkpoint under `root`, or None when there is none."""
    found = rounds(root)
    return load(round_dir(root, found[-1]), fingerprint=fingerprint, also=also) if found else None


def fingerprint_of(parts: Iterable[object]) -> str:
    """A short stable digest of JSON-able parts (config, shapes, data sizes)."""
    text = json.dumps(list(parts), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ------------------------------------------------------------------ what the round loop holds
