"""`declora sweep`: a grid of configurations x seeds, run as separate processes, resumable,
summarised as mean and standard deviation over seeds.

Each cell (one grid point, one seed) is an ordinary run directory under `OUT/cells/`, so every
number in the summary can be traced to its config.yaml and metrics. A cell whose run is
complete is never rerun; an interrupted one continues from its checkpoints. Every cell's
configuration is validated before the first one starts.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from declora.config.schema import RunConfig, load_config
from declora.errors import ConfigError, DecloraError
from declora.reporting.rundir import RunDir, busy


def split_values(text: str) -> list[str]:
    """`a,b,[1,2]` -> ['a', 'b', '[1,2]']: commas inside brackets or braces stay."""
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return [v.strip() for v in out if v.strip()]


def parse_grid(items: Sequence[str]) -> dict[str, list[str]]:
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not key or not split_values(values):
            raise ConfigError(f"--grid {item!r} must look like key=value1,value2")
        if key == "seed":
            raise ConfigError("--grid seed=... is not needed: use --seeds N")
        if key in grid:
            raise ConfigError(f"--grid {key} is given twice; list all its values once")
        grid[key] = split_values(values)
    return grid


def slug(text: str) -> str:
    """A folder name for `text`; a long one is cut and keeps a hash of the whole, so two cells
    that differ only past the cut still get different folders."""
    name = re.sub(r"[^A-Za-z0-9_.=+-]+", "_", text)
    if len(name) <= 80:
        return name
    return name[:71] + "-" + hashlib.sha1(text.encode()).hexdigest()[:8]


@dataclass(frozen=True)
class Cell:
    point: tuple[tuple[str, str], ...]  # (key, value) per grid key
    seed: int

    @property
    def sets(self) -> list[str]:
        return [f"{k}={v}" for k, v in self.point] + [f"seed={self.seed}"]

    @property
    def name(self) -> str:
        parts = [f"{k.rpartition('.')[2]}={v}" for k, v in self.point]
        return slug("__".join([*parts, f"seed={self.seed}"]))


def cells(grid: dict[str, list[str]], seeds: Sequence[int]) -> list[Cell]:
    keys = list(grid)
    out = []
    for values in itertools.product(*(grid[k] for k in keys)):
        for s in seeds:
            out.append(Cell(tuple(zip(keys, values, strict=True)), s))
    return out


def validate(base: Path | None, base_sets: Sequence[str], todo: Sequence[Cell]) -> list[RunConfig]:
    """Every cell's config, and the data and model it names, checked before anything runs
    (one error names the cell)."""
    from declora.runners.build import check_inputs

    cfgs = []
    for c in todo:
        try:
            cfg = load_config(base, [*base_sets, *c.sets])
            check_inputs(cfg)
        except DecloraError as exc:
            raise type(exc)(f"sweep cell {c.name}: {exc}") from None
        cfgs.append(cfg)
    return cfgs


def cell_status(path: Path) -> str | None:
    """A cell's recorded status; "damaged" when its run.json cannot be read (it is run again
    from scratch: nothing in it can be trusted)."""
    try:
        return RunDir(path).status() if (path / "run.json").is_file() else None
    except DecloraError:
        return "damaged"


def cell_tags(cell: Cell, base_tags: dict[str, str], out: Path) -> str:
    """`log.tags=...` for a cell: the base config's tags plus its grid values, its seed and the
    sweep's folder name, so an experiment tracker can filter and group the grid."""
    tags = {**base_tags, **dict(cell.point), "seed": str(cell.seed), "sweep": out.name}
    return "log.tags=" + json.dumps(tags)  # JSON is YAML: --set reads it back as a mapping


def _resumable(target: Path) -> bool:
    """An interrupted cell continues from its checkpoints; one that writes none (or whose
    config cannot be read) is run again from scratch."""
    try:
        cfg = load_config(target / "config.yaml")
    except DecloraError:
        return False
    return cfg.train.checkpoint_every != 0


def run_cell(
    cell: Cell, base: Path | None, base_sets: Sequence[str], out: Path, threads: int
) -> tuple[Cell, int, str]:
    """One cell in its own process; resumes an interrupted cell from its checkpoints."""
    target = out / "cells" / cell.name
    holder = busy(target) if target.is_dir() else None
    if holder:  # another sweep (or a user) runs this cell right now: leave it alone
        return cell, 2, f"skipped: {holder}"
    status = cell_status(target)
    cmd = [sys.executable, "-m", "declora", "run", "--quiet"]
    if status in ("running", "failed") and _resumable(target):
        cmd += ["--resume", str(target)]
    else:
        cmd += ["--out", str(target), "--overwrite"]
        if base is not None:
            cmd += ["--config", str(base)]
        tags = cell_tags(cell, load_config(base, base_sets).log.tags, out)
        for s in [*base_sets, *cell.sets, f"train.threads={threads}", tags]:
            cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    code, err = _run_child(cmd, env)
    tail = (err or "").strip().splitlines()[-1:] or [""]
    return cell, code, tail[0]


# the cells' processes running now, so that a stopped sweep can stop them (they would run on
# as orphans, holding their folders, while the sweep looks stopped)
_CHILDREN: set[subprocess.Popen[str]] = set()
_CHILDREN_LOCK = threading.Lock()


def _run_child(cmd: list[str], env: dict[str, str]) -> tuple[int, str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    with _CHILDREN_LOCK:
        _CHILDREN.add(proc)
    try:
        _, err = proc.communicate()
    finally:
        with _CHILDREN_LOCK:
            _CHILDREN.discard(proc)
    return proc.returncode, err


def stop_cells(signum: int | None, grace_s: float = 60.0, own_s: float = 10.0) -> int:
    """Pass a stop on to the cells still running (each records it in its run.json and frees
    its folder, to be resumed by the next sweep) and wait for them; one that outlasts
    `grace_s` is killed. `signum` None (Ctrl-C, which the terminal also sent the cells) first
    gives them `own_s` to stop on their own, then sends SIGTERM: a second Ctrl-C could cut
    their record short. Returns how many were running."""
    with _CHILDREN_LOCK:
        procs = [p for p in _CHILDREN if p.poll() is None]
    if signum is None:
        deadline = time.monotonic() + own_s
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
        signum = signal.SIGTERM
    for p in procs:
        if p.poll() is not None:
            continue
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(signum)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return len(procs)


CellTask = tuple[Cell, "Path | None", Sequence[str], Path]  # cell, base YAML, base sets, out


def run_cells(
    tasks: Sequence[CellTask], jobs: int = 1, echo: Callable[[str], None] = print
) -> tuple[list[str], int]:
    """Run the tasks whose cell is not complete yet, `jobs` processes at a time, in the given
    order; return the failed cells' names (prefixed by their OUT folder's name when the tasks
    span several) and how many ran. The sweep and the paper-reproduction suite both use it."""
    todo = [t for t in tasks if cell_status(t[3] / "cells" / t[0].name) != "complete"]
    echo(f"{len(tasks)} cells, {len(tasks) - len(todo)} already complete, {len(todo)} to run")
    threads = max(1, (os.cpu_count() or 1) // max(1, jobs))
    failed = []
    start = time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=max(1, jobs))
    try:
        futures = [pool.submit(run_cell, *t, threads) for t in todo]
        for i, (fut, t) in enumerate(zip(futures, todo, strict=True), 1):
            cell, code, tail = fut.result()
            label = cell.name if len({x[3] for x in tasks}) == 1 else f"{t[3].name}/{cell.name}"
            mark = "ok" if code == 0 else f"FAILED ({tail})"
            echo(f"[{i}/{len(todo)}] {label}: {mark} ({time.perf_counter() - start:.0f} s)")
            if code != 0:
                failed.append(label)
    except KeyboardInterrupt as exc:  # Ctrl-C or a stop signal: no new cell, stop the running
        pool.shutdown(wait=False, cancel_futures=True)
        stop_cells(getattr(exc, "signum", None))
        raise
    finally:
        pool.shutdown(wait=True)
    return failed, len(todo)


def run_sweep(
    base: Path | None,
    grid: dict[str, list[str]],
    seeds: Sequence[int],
    out: Path,
    *,
    base_sets: Sequence[str] = (),
    jobs: int = 1,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every cell that is not complete yet, then write the result tables."""
    all_cells = cells(grid, seeds)
    validate(base, base_sets, all_cells)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(
        json.dumps(
            {
                "base": str(base) if base else None,
                "base_sets": list(base_sets),
                "grid": grid,
                "seeds": list(seeds),
            },
            indent=2,
        )
    )
    failed, ran = run_cells([(c, base, base_sets, out) for c in all_cells], jobs, echo)
    table = collect(out, all_cells, list(grid))
    return {"cells": len(all_cells), "ran": ran, "failed": failed, **table}


def collect(out: Path, all_cells: Sequence[Cell], keys: Sequence[str]) -> dict[str, Any]:
    """results.csv (one row per cell and summary row) and results.md (mean +- std)."""
    raw: list[dict[str, Any]] = []
    columns: list[str] = []
    for c in all_cells:
        path = out / "cells" / c.name
        if cell_status(path) != "complete":
            continue
        summary = json.loads((path / "summary.json").read_text())
        cols = list(summary.get("columns") or [])
        columns += [x for x in cols if x not in columns]
        primary = cols[0] if cols else "accuracy"
        for row in summary["rows"]:
            rec = {k: v for k, v in c.point}
            rec.update(seed=c.seed, run=row["label"], cell=c.name)
            for col in cols:
                rec[col] = row.get(col)
            rec[f"best_{primary}"] = row.get(f"best_{primary}")
            rec["bytes_per_peer"] = row.get("bytes_per_peer")
            rec["wall_seconds"] = row.get("wall_seconds")
            raw.append(rec)
    fields = [*keys, "seed", "run", *columns]
    extra = sorted({k for r in raw for k in r} - set(fields) - {"cell"})
    with open(out / "results.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=[*fields, *extra, "cell"])
        w.writeheader()
        w.writerows(raw)
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in raw:
        groups.setdefault((*(r[k] for k in keys), r["run"]), []).append(r)
    metrics = [*columns, *[e for e in extra if e.startswith("best_")], "bytes_per_peer"]
    lines = [
        "| " + " | ".join([*keys, "run", "seeds", *metrics]) + " |",
        "|" + "---|" * (len(keys) + 2 + len(metrics)),
    ]
    agg = []
    for key, rows in groups.items():
        cells_txt = []
        item: dict[str, Any] = dict(zip([*keys, "run"], key, strict=True))
        for m in metrics:
            vals = np.array([r[m] for r in rows if r.get(m) is not None], dtype=float)
            if not len(vals):
                cells_txt.append("-")
                continue
            item[m] = float(vals.mean())
            item[f"{m}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
            if m == "bytes_per_peer":
                cells_txt.append(f"{vals.mean() / 1e6:.2f} MB")
            else:
                cells_txt.append(f"{vals.mean():.4f} ± {item[f'{m}_std']:.4f}")
        agg.append(item)
        lines.append("| " + " | ".join([*map(str, key), str(len(rows)), *cells_txt]) + " |")
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps(agg, indent=2))
    return {"markdown": text, "rows": agg}
