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
