"""The run directory: what a run leaves behind, written so a crash never looks like a result.

`run.json` says `"status": "running"` from the first byte written and only turns `"complete"`
as the very last step; metrics are appended one JSON line per evaluation as they happen.

One process at a time writes a run directory: `create` and `reopen` take an exclusive OS lock
(`fcntl.flock` on `.lock` inside the folder) that is held until the run ends (its status turns
`complete` or `failed`) or its process dies, when the kernel drops it: a lock is never stale.
A second run, `--overwrite` or `--resume` into a folder that is in use is refused with the
holder's process id, host and command.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

from declora import __version__
from declora.errors import DecloraError

try:  # POSIX; without it (Windows) runs are not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

STATUS_FILE = "run.json"
LOCK_FILE = ".lock"
FINAL_STATUSES = ("complete", "failed")

_HELD: dict[Path, int] = {}  # run directory (resolved) -> descriptor holding its lock


class RunDirBusy(DecloraError):
    """Another live process writes this run directory."""


def finite_json(obj: Any) -> Any:
    """`obj` with every non-finite float replaced by None: JSON has no NaN or infinity, and a
    bare `NaN` token makes a file that strict readers (jq, JavaScript, Go) refuse."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_json(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """Strict JSON text (non-finite numbers as null)."""
    return json.dumps(finite_json(obj), allow_nan=False, **kwargs)


def write_json(path: Path, data: Any) -> None:
    """Write atomically: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def failure_text(exc: BaseException) -> str:
    """What run.json records as the error that stopped a run (500 characters at most); Ctrl-C's
    KeyboardInterrupt carries no message of its own, so it gets one."""
    text = str(exc) or ("interrupted (Ctrl-C)" if isinstance(exc, KeyboardInterrupt) else "")
    return f"{type(exc).__name__}: {text}"[:500]


def read_record(path: Path, what: str = STATUS_FILE) -> dict[str, Any] | None:
    """A JSON object file of a run directory, None when absent; a damaged one is one error."""
    f = path / what
    if not f.is_file():
        return None
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DecloraError(
            f"{str(f)!r} is not valid JSON ({type(exc).__name__}: {str(exc)[:80]}); it was not "
            "written by declora or was damaged"
        ) from None
    except OSError as exc:
        raise DecloraError(f"cannot read {str(f)!r}: {exc.strerror}") from None
    if not isinstance(data, dict):
        raise DecloraError(
            f"{str(f)!r} holds a JSON {type(data).__name__}, not an object; it was not written "
            "by declora or was damaged"
        )
    return data


# ------------------------------------------------------------------ the lock


def _holder(fd: int) -> str:
    """Who holds a lock, from what the holder wrote into the lock file."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode("utf-8"))
        return f"process {info['pid']} on {info['host']} since {info['since']} ({info['command']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it has not said which yet)"


def _busy(path: Path, who: str) -> RunDirBusy:
    """The refusal to touch a run directory that `who` (what `_holder` says) holds."""
    return RunDirBusy(
        f"run directory {str(path)!r} is in use by {who}; wait for that run to end "
        "(or stop it) before --resume or --overwrite, or choose another --out"
    )


def lock(path: Path) -> None:
    """Take the run directory's exclusive lock for this process, or raise `RunDirBusy`."""
    key = path.resolve()
    if key in _HELD:
        raise RunDirBusy(f"run directory {str(path)!r} is already in use by this process")
    if fcntl is None:  # pragma: no cover
        return
    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        err = _busy(path, _holder(fd))
        os.close(fd)
        raise err from None
    me = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["declora", *sys.argv[1:]])[:300],
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    _HELD[key] = fd


def unlock(path: Path) -> None:
    """Drop this process's lock on the run directory (nothing when it holds none). The lock
    file stays: deleting it would let two processes lock two different files."""
    fd = _HELD.pop(path.resolve(), None)
    if fd is not None:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def busy(path: Path) -> str | None:
    """Who holds the run directory's lock, when another process does, as the message that
    refuses to touch it; else None. Creates nothing."""
    who = lock_holder(path)
    return None if who is None else str(_busy(path, who))


def lock_holder(path: Path) -> str | None:
    """The process that holds the run directory's lock ("process PID on HOST since ... (its
    command)"), when another process does; else None. Creates nothing."""
    if fcntl is None or path.resolve() in _HELD:
        return None
    try:
        fd = os.open(path / LOCK_FILE, os.O_RDWR)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder(fd)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
    return None


def peer_folders(path: Path) -> int:
    """How many peer processes wrote into this run directory (`peers/peer-<i>`): 0 for a
    simulated run, whose one process holds every peer."""
    return len(list(path.glob("peers/peer-*")))


def machine_options(nnodes: str, endpoint: str | None) -> str:
    """The options besides `--peers` that a multi-machine launch is started again with on
    every machine, each with its own rank; empty for one machine (`nnodes` "1")."""
    if nnodes == "1":
        return ""
    return f" --nnodes {nnodes} --node-rank <its rank> --rdzv-endpoint {endpoint}"


def resume_command(path: Path, peers: int = 0, machines: str = "") -> str:
    """The command that continues the run in `path`: `declora run --resume` for a simulated
    run (`peers` 0), else a launch of that many peer processes (`machines`: the multi-machine
    options, each machine with its own rank)."""
    if not peers:
        return f"declora run --resume {path}"
    return f"declora launch --peers {peers}{machines} -- --resume {path}"


def continue_hint(path: Path) -> str:
    """ "continue it with: ..." for the run in `path`, from what its launch recorded in run.json
    (`launch`: peers on peer 0's machine, machines, rendezvous endpoint; every machine starts
    again), else from its folders (a peer folder per process on this machine)."""
    try:
        launch = (read_record(path) or {}).get("launch")
    except DecloraError:  # a damaged run.json: its folders still tell
        launch = None
    if isinstance(launch, dict) and isinstance(launch.get("peers"), int) and launch["peers"] > 0:
        machines = machine_options(str(launch.get("nnodes", "1")), launch.get("rdzv_endpoint"))
        return launch_hint(path, launch["peers"], machines)
    return f"continue it with: {resume_command(path, peer_folders(path))}"


def launch_hint(path: Path, peers: int, machines: str) -> str:
    """ "continue it with: declora launch ..." for a distributed run; across machines (some
    `machines` options) every machine starts again."""
    every = "by starting every machine again " if machines else ""
    return f"continue it {every}with: {resume_command(path, peers, machines)}"


def resume_mismatch(path: Path, distributed: bool) -> str | None:
    """Why `path` cannot be continued this way, else None: a distributed run's folder resumed
    by one simulating process, or a simulated run's by peer processes. Neither finds its own
    kind of checkpoint, so it would start again from round 0 while calling itself resumed."""
    peers = peer_folders(path)
    if not distributed and peers:
        return (
            f"--resume {str(path)!r} is a distributed run (one process per peer); "
            f"{continue_hint(path)}"
        )
    if distributed and not peers and any(path.glob("checkpoints/round-*")):
        return (
            f"--resume {str(path)!r} is a simulated run (one process, every peer in its "
            f"checkpoints); continue it with: {resume_command(path)}"
        )
    return None


def record_lost_run(path: Path, error: str, *, over_failed: bool = False) -> bool:
    """Record as failed, with `error`, a run whose run.json still says "running" although no
    process holds its folder: one whose processes were ended before they could say so (a
    launcher stopping a distributed run's peers). With `over_failed`, a recorded failure gives
    way too (kept as "peer_error"): a stop's true cause, when a peer recorded its neighbours'
    going as its own. True if it wrote."""
    data = read_record(path)
    if data is None or lock_holder(path) is not None:
        return False
    status = data.get("status")
    if not (status == "running" or (over_failed and status == "failed")):
        return False
    if status == "failed" and data.get("error") not in (None, error):
        data["peer_error"] = data["error"]
    data.update(status="failed", error=error)
    write_json(path / STATUS_FILE, data)
    return True


def _entries(path: Path) -> list[Path]:
    """What a run directory holds, apart from its lock file."""
    return [p for p in path.iterdir() if p.name != LOCK_FILE]


def _writable_parent(path: Path) -> None:
    """The nearest existing ancestor of `path` must be a directory this user may write."""
    parent = path
    while not parent.exists():
        if parent.parent == parent:
            break
        parent = parent.parent
    if not parent.is_dir():
        raise DecloraError(
            f"cannot create run directory {str(path)!r}: {str(parent)!r} is a file, not a directory"
        )
    if parent != path and not os.access(parent, os.W_OK | os.X_OK):
        raise DecloraError(
            f"cannot create run directory {str(path)!r}: no permission to write in {str(parent)!r}"
        )


class RunDir:
    """One run's output folder."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @staticmethod
    def preflight(path: str | Path, *, overwrite: bool = False, resume: bool = False) -> None:
        """Refuse an output folder that `create` (or `reopen`) would refuse, before the slow
        part of a run (loading data and model) instead of after it."""
        p = Path(path)
        holder = busy(p) if p.is_dir() else None
        if holder:
            raise RunDirBusy(holder)
        if resume:
            if read_record(p) is None:
                raise DecloraError(
                    f"--resume {str(p)!r} is not a declora run directory (no {STATUS_FILE})"
                )
        else:
            RunDir._check_target(p, overwrite)
            _writable_parent(p)

    @staticmethod
    def _check_target(p: Path, overwrite: bool) -> None:
        if p.exists() and not p.is_dir():
            raise DecloraError(f"--out {str(p)!r} exists and is a file, not a directory")
        if p.is_dir() and _entries(p):
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

    @classmethod
    def create(cls, path: str | Path, *, overwrite: bool = False) -> RunDir:
        """A new run directory (an old run's replaced with `overwrite`), locked by this
        process until its status turns final."""
        p = Path(path)
        holder = busy(p) if p.is_dir() else None
        if holder:
            raise RunDirBusy(holder)
        cls._check_target(p, overwrite)
        _writable_parent(p)
        try:
            p.mkdir(parents=True, exist_ok=True)
            lock(p)
        except OSError as exc:
            raise DecloraError(
                f"cannot create run directory {str(p)!r}: {exc.strerror or exc}"
            ) from None
        try:
            cls._check_target(p, overwrite)  # again, now that no one else can write it
            for entry in _entries(p):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            rd = cls(p)
            rd.set_status("running", started=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        except BaseException:
            unlock(p)
            raise
        return rd

    @classmethod
    def reopen(cls, path: str | Path) -> RunDir:
        """An interrupted run's folder, to be continued from its checkpoints; locked by this
        process first, so a run that is still going is never touched."""
        p = Path(path)
        if not p.is_dir() or not (p / STATUS_FILE).is_file():
            raise DecloraError(
                f"--resume {str(p)!r} is not a declora run directory (no {STATUS_FILE})"
            )
        try:
            lock(p)
        except OSError as exc:
            raise DecloraError(f"cannot lock run directory {str(p)!r}: {exc.strerror}") from None
        try:
            data = read_record(p)
            if data is None:
                raise DecloraError(
                    f"--resume {str(p)!r} is not a declora run directory (no {STATUS_FILE})"
                )
            if data.get("status") == "complete":
                raise DecloraError(
                    f"run {str(p)!r} is already complete; there is nothing to resume"
                )
            if "error" in data:  # what stopped the last attempt stays on record, not as current
                data["previous_error"] = data.pop("error")
                write_json(p / STATUS_FILE, data)
            rd = cls(p)
            rd.set_status("running", resumed=int(data.get("resumed", 0)) + 1)
        except BaseException:
            unlock(p)
            raise
        return rd

    def rewrite_metrics(self, records: list[dict[str, Any]]) -> None:
        """Metrics as they were at a checkpoint (later lines are recomputed by the resumed run)."""
        self.write_text("metrics.jsonl", "".join(dumps(r) + "\n" for r in records))

    def sub(self, name: str) -> RunDir:
        p = self.path / name
        p.mkdir(parents=True, exist_ok=True)
        return RunDir(p)

    def set_status(self, status: str, **extra: Any) -> None:
        """Record the run's status; a final one (complete, failed) also releases the lock."""
        f = self.path / STATUS_FILE
        data = read_record(self.path) if f.is_file() else None
        data = data if data is not None else {"declora_version": __version__}
        data.update(status=status, **extra)
        try:
            write_json(f, data)
        finally:
            if status in FINAL_STATUSES:
                unlock(self.path)

    def status(self) -> str | None:
        """The recorded status; None when this is no run directory (no run.json)."""
        data = read_record(self.path)
        return None if data is None else data.get("status")

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
            fh.write(dumps(record) + "\n")
            fh.flush()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    f = Path(path) / "metrics.jsonl"
    if not f.is_file():
        return []
    try:
        return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DecloraError(f"{str(f)!r} is not valid JSON lines ({exc})") from None
