"""The run directory: what a run leaves behind, written so a crash never looks like a result.

`run.json` says `"status": "running"` from the first byte written and only turns `"complete"`
as the very last step; metrics are appended one JSON line per evaluation as they happen.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from declora import __version__
from declora.errors import DecloraError

STATUS_FILE = "run.json"


def write_json(path: Path, data: Any) -> None:
    """Write atomically: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class RunDir:
    """One run's output folder."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls, path: str | Path, *, overwrite: bool = False) -> RunDir:
        p = Path(path)
        if p.exists() and not p.is_dir():
            raise DecloraError(f"--out {str(p)!r} exists and is a file, not a directory")
        if p.is_dir() and any(p.iterdir()):
            if not overwrite:
                raise DecloraError(
                    f"run directory {str(p)!r} already exists and is not empty; "
                    "pass --overwrite to replace it or choose another --out"
                )
            if not (p / STATUS_FILE).is_file():
                raise DecloraError(
                    f"refusing to overwrite {str(p)!r}: it is not a declora run directory "
                    f"(no {STATUS_FILE})"
                )
            shutil.rmtree(p)
        p.mkdir(parents=True, exist_ok=True)
        rd = cls(p)
        rd.set_status("running", started=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        return rd

    @classmethod
    def reopen(cls, path: str | Path) -> RunDir:
        """An interrupted run's folder, to be continued from its checkpoints."""
        p = Path(path)
        rd = cls(p)
        status = rd.status() if p.is_dir() else None
        if status is None:
            raise DecloraError(
                f"--resume {str(p)!r} is not a declora run directory (no {STATUS_FILE})"
            )
        if status == "complete":
            raise DecloraError(f"run {str(p)!r} is already complete; there is nothing to resume")
        data = json.loads((p / STATUS_FILE).read_text())
        if "error" in data:  # what stopped the last attempt stays on record, not as current
            data["previous_error"] = data.pop("error")
            write_json(p / STATUS_FILE, data)
        rd.set_status("running", resumed=int(data.get("resumed", 0)) + 1)
        return rd

    def rewrite_metrics(self, records: list[dict[str, Any]]) -> None:
        """Metrics as they were at a checkpoint (later lines are recomputed by the resumed run)."""
        self.write_text("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))

    def sub(self, name: str) -> RunDir:
        p = self.path / name
        p.mkdir(parents=True, exist_ok=True)
        return RunDir(p)

    def set_status(self, status: str, **extra: Any) -> None:
        f = self.path / STATUS_FILE
        data = json.loads(f.read_text()) if f.is_file() else {"declora_version": __version__}
        data.update(status=status, **extra)
        write_json(f, data)

    def status(self) -> str | None:
        f = self.path / STATUS_FILE
        return json.loads(f.read_text()).get("status") if f.is_file() else None

    def write_text(self, name: str, text: str) -> Path:
        f = self.path / name
        tmp = f.with_suffix(f.suffix + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, f)
        return f

    def write_json(self, name: str, data: Any) -> Path:
        f = self.path / name
        write_json(f, data)
        return f

    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    f = Path(path) / "metrics.jsonl"
    if not f.is_file():
        return []
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
