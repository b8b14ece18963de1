"""Experiment trackers: one hook sends a run to TensorBoard, MLflow and W&B alike.

The runners call a `Trackers` fan-out at three moments: when an algorithm starts (the config as
hyperparameters), on every evaluated round (the very record written to `metrics.jsonl`, step =
round), and at the end (each peer's final metrics as a table; `report.md`, the plots, the summary
and the config as artifacts). The round loop itself knows nothing about trackers: it only calls
its `on_record` callback. Each tracker is an optional extra, imported only when a run asks for it,
and `require` refuses a missing one before the run starts.

One tracker run per algorithm (Dec-LoRA and each baseline; in distributed runs, optionally one per
peer), all in one group named after the run directory, so a tracker shows them side by side.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import math
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from declora.errors import DecloraError

if TYPE_CHECKING:
    from declora.config.schema import LogConfig, RunConfig

Record = Mapping[str, Any]
Scalar = str | int | float | bool

# What each tracker imports with its default settings; all come with `declora[<tracker>]`.
NEEDS: dict[str, tuple[str, ...]] = {
    "tensorboard": ("tensorboard",),
    "mlflow": ("mlflow", "sqlalchemy", "alembic"),  # the default store is a SQLite file
    "wandb": ("wandb",),
}
ARTIFACTS = ("report.md", "summary.json", "config.yaml")  # plus every *.png of the run directory
STATE_FILE = "trackers.json"  # tracker run ids, so a resumed run continues the same runs


class TrackerError(DecloraError):
    """A tracker that was asked for is not installed."""


def require(log: LogConfig) -> None:
    """Refuse, before any work, a tracker whose package is missing: one line naming the extra."""
    for name in log.to:
        modules = NEEDS[name]
        if name == "mlflow" and log.mlflow_uri and not log.mlflow_uri.startswith("sqlite"):
            modules = ("mlflow",)  # a tracking server or another store needs no SQLAlchemy here
        missing = [m for m in modules if importlib.util.find_spec(m) is None]
        if missing:
            raise TrackerError(
                f"log.to={name} needs the {missing[0]} package: pip install 'declora[{name}]'"
            )


def metrics_of(rec: Record) -> dict[str, float]:
    """The numbers of a record (everything but its round), named as in metrics.jsonl."""
    return {
        k: float(v)
        for k, v in rec.items()
        if k != "round" and isinstance(v, int | float) and not isinstance(v, bool)
    }


def flat_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, Scalar]:
    """Dotted keys with scalar values (what hyperparameter tables take): lists and None as JSON."""
    out: dict[str, Scalar] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flat_params(value, f"{name}."))
        elif isinstance(value, str | int | float | bool):
            out[name] = value
        else:
            out[name] = json.dumps(value)
    return out


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A per-peer table as Markdown (TensorBoard's text tab renders it)."""
    if not rows:
        return ""
    cols = ["peer", *rows[0]]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---:|" * len(cols)]
    for i, row in enumerate(rows):
        cells = [str(i)] + [_cell(row.get(c)) for c in cols[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


@dataclass
class RunInfo:
    """What identifies one tracker run: its key in this process (an algorithm or `peer-<i>`)."""

    key: str
    name: str  # shown in the tracker: "<group>/<key>"
    group: str
    tags: dict[str, str]
    config: dict[str, Any]
    params: dict[str, Scalar]
    metrics: tuple[str, ...]  # the headline metrics (TensorBoard's hparams tab)
    resumed: bool = False


class Tracker(Protocol):
    """One tracking backend; every method gets the key of the run it is about."""

    name: str

    def start(self, run: RunInfo, state: dict[str, str]) -> None: ...
    def log(self, key: str, metrics: dict[str, float], step: int) -> None: ...
    def table(self, key: str, name: str, rows: Sequence[Mapping[str, Any]], step: int) -> None: ...
    def artifacts(self, key: str, files: Sequence[Path], step: int) -> None: ...
    def finish(self, failed: bool) -> None: ...


class TensorBoardTracker:
    """torch's SummaryWriter: one event folder per run, `<root>/<key>`."""

    name = "tensorboard"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.runs: dict[str, RunInfo] = {}
        self.writers: dict[str, Any] = {}

    def start(self, run: RunInfo, state: dict[str, str]) -> None:
        self.runs[run.key] = run
        if not run.resumed:  # a resumed run opens its writer at its first new round
            self._writer(run.key, None)

    def _writer(self, key: str, step: int | None) -> Any:
        if key in self.writers:
            return self.writers[key]
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        run = self.runs[key]
        if run.resumed:
            _after_existing_event_files(self.root / key)
        # resumed: drop what the interrupted attempt logged from this round on (it is recomputed)
        w = SummaryWriter(str(self.root / key), purge_step=step if run.resumed else None)
        if not run.resumed:
            exp, ssi, sei = hparams(run.params, dict.fromkeys(run.metrics, 0.0))
            for summary in (exp, ssi, sei):
                w.file_writer.add_summary(summary)
            tags = ", ".join(f"{k}={v}" for k, v in run.tags.items())
            w.add_text("run", f"{run.name} ({tags})")
        self.writers[key] = w
        return w

    def log(self, key: str, metrics: dict[str, float], step: int) -> None:
        w = self._writer(key, step)
        for k, v in metrics.items():
            w.add_scalar(k, v, step)
        w.flush()  # so a running TensorBoard shows every evaluated round as it happens

    def table(self, key: str, name: str, rows: Sequence[Mapping[str, Any]], step: int) -> None:
        w = self._writer(key, step)
        w.add_text(name, markdown_table(rows), step)
        w.flush()

    def artifacts(self, key: str, files: Sequence[Path], step: int) -> None:
        import numpy as np
        from PIL import Image

        w = self._writer(key, step)
        for f in files:
            if f.suffix == ".png":
                with Image.open(f) as im:
                    pixels = np.asarray(im.convert("RGB"))
                w.add_image(f"plots/{f.stem}", pixels, step, dataformats="HWC")
            elif f.suffix == ".md":
                w.add_text(f.stem, f.read_text(encoding="utf-8"), step)
            else:
                w.add_text(f.name, "```\n" + f.read_text(encoding="utf-8") + "\n```", step)
        w.flush()

    def finish(self, failed: bool) -> None:
        for w in self.writers.values():
            w.close()
        self.writers.clear()


def _after_existing_event_files(folder: Path, longest_wait: float = 2.0) -> None:
    """Wait, if needed, into the second after the newest event file of `folder`.

    TensorBoard reads a folder's event files in name order, and a name is
    `events.out.tfevents.<whole second>.<host>.<pid>...`. A resume within the same second as the
    interrupted attempt's file would sort by host and pid, which can put the new file (and the
    purge it starts with) first, so the dropped rounds come back. A file stamped more than
    `longest_wait` ahead (another host's clock) is not waited for.
    """
    stamps = []
    for f in folder.glob("events.out.tfevents.*"):
        part = f.name.split(".")[3]
        if part.isdigit():
            stamps.append(int(part))
    if stamps:
        wait = max(stamps) + 1 - time.time()
        if 0 < wait <= longest_wait:
            time.sleep(wait)


class MlflowTracker:
    """An MLflow client on a tracking URI (default: a SQLite file): one experiment, one run per
    key, tagged with its group and algorithm."""

    name = "mlflow"

    def __init__(self, uri: str, experiment: str, artifact_root: Path | None) -> None:
        from mlflow.tracking import MlflowClient

        self.run_ids: dict[str, str] = {}
        # A new SQLite store creates its tables when the client opens it; peers or sweep cells
        # opening the same file at once would race on that, so opening is serialised by a lock.
        with _file_lock(_sqlite_path(uri)):
            self.client = MlflowClient(tracking_uri=uri)
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                location = artifact_root.resolve().as_uri() if artifact_root else None
                # the kind makes MLflow's UI open on training runs, not on GenAI traces
                kind = {"mlflow.experimentKind": "custom_model_development"}
                self.experiment_id = self.client.create_experiment(experiment, location, kind)
            else:
                self.experiment_id = exp.experiment_id

    def start(self, run: RunInfo, state: dict[str, str]) -> None:
        from mlflow.entities import Param

        known = state.get(run.key) if run.resumed else None
        if known:
            self.client.update_run(known, status="RUNNING")
            self.run_ids[run.key] = known
            return
        tags = {**run.tags, "declora.group": run.group}
        created = self.client.create_run(self.experiment_id, tags=tags, run_name=run.name)
        run_id = created.info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in run.params.items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run_id, params=params[i : i + 100])
        self.client.log_dict(run_id, run.config, "config.json")
        self.run_ids[run.key] = state[run.key] = run_id

    def log(self, key: str, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        batch = [Metric(k, v, stamp, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_ids[key], metrics=batch)

    def table(self, key: str, name: str, rows: Sequence[Mapping[str, Any]], step: int) -> None:
        columns: dict[str, list[Any]] = {"peer": list(range(len(rows)))}
        for col in rows[0] if rows else {}:
            columns[col] = [r.get(col) for r in rows]
        self.client.log_table(self.run_ids[key], columns, f"{name}.json")

    def artifacts(self, key: str, files: Sequence[Path], step: int) -> None:
        for f in files:
            self.client.log_artifact(self.run_ids[key], str(f), "report")

    def finish(self, failed: bool) -> None:
        for run_id in self.run_ids.values():
            self.client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")
        self.run_ids.clear()


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


@contextmanager
def _file_lock(path: Path | None) -> Iterator[None]:
    """An exclusive lock on `<path>.lock` for the block (nothing to lock without a path)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock (one process per store is then the safe use)
        fcntl = None
    if path is None or fcntl is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class WandbTracker:
    """Weights & Biases: one run per key in the group; honours WANDB_MODE (offline writes a
    folder that `wandb sync` uploads later)."""

    name = "wandb"

    def __init__(self, root: Path, project: str) -> None:
        self.root, self.project = root, project
        self.runs: dict[str, Any] = {}

    def start(self, run: RunInfo, state: dict[str, str]) -> None:
        import wandb

        self.root.mkdir(parents=True, exist_ok=True)
        extra: dict[str, Any] = {}
        if run.resumed and run.key in state:
            extra = {"id": state[run.key], "resume": "allow"}
        tags = [f"{k}={v}"[:64] for k, v in run.tags.items()]
        handle = wandb.init(
            dir=str(self.root),
            project=self.project,
            group=run.group,
            name=run.name,
            job_type=run.key,
            tags=tags,
            config=run.config,
            reinit="create_new",  # Dec-LoRA and its baselines are open at the same time
            settings=wandb.Settings(console="off"),
            **extra,
        )
        self.runs[run.key] = handle
        state[run.key] = handle.id

    def log(self, key: str, metrics: dict[str, float], step: int) -> None:
        self.runs[key].log(metrics, step=step)

    def table(self, key: str, name: str, rows: Sequence[Mapping[str, Any]], step: int) -> None:
        import wandb

        cols = ["peer", *(rows[0] if rows else {})]
        data = [[i, *(r.get(c) for c in cols[1:])] for i, r in enumerate(rows)]
        self.runs[key].log({name: wandb.Table(columns=cols, data=data)}, step=step)

    def artifacts(self, key: str, files: Sequence[Path], step: int) -> None:
        import wandb

        run = self.runs[key]
        images = {f"plots/{f.stem}": wandb.Image(str(f)) for f in files if f.suffix == ".png"}
        if images:
            run.log(images, step=step)
        for f in files:
            if f.suffix != ".png":  # a copy, not a link: the run folder must stand alone
                dest = Path(run.dir) / "report" / f.name
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, dest)
                run.save(str(dest), base_path=run.dir, policy="now")

    def finish(self, failed: bool) -> None:
        for run in self.runs.values():
            run.finish(exit_code=1 if failed else 0)
        self.runs.clear()


def headline_metrics(cfg: RunConfig) -> tuple[str, ...]:
    task = ("perplexity", "loss", "answer_f1") if cfg.task == "causal-lm" else ("accuracy",)
    if cfg.task != "causal-lm":
        task += ("macro_f1",)
    return (*task, "train_loss", "consensus_distance", "bytes_sent")


@dataclass
class Trackers:
    """The fan-out the runners call; with `log.to` empty every call does nothing."""

    trackers: list[Tracker]
    group: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    metrics: tuple[str, ...] = ()
    resumed: bool = False
    state_file: Path | None = None
    steps: dict[str, int] = field(default_factory=dict)  # last logged round per key
    state: dict[str, dict[str, str]] = field(default_factory=dict)  # tracker -> key -> run id
    ended: bool = False

    @classmethod
    def open(
        cls,
        cfg: RunConfig,
        run_dir: str | Path,
        *,
        resume: bool = False,
        enabled: bool = True,
        state_file: str | Path | None = None,
    ) -> Trackers:
        """The trackers of `cfg.log` for the run in `run_dir` (none when `enabled` is false:
        a distributed peer that logs nothing). `state_file` keeps the tracker run ids so that
        `--resume` continues the same runs; default `<run_dir>/trackers.json`."""
        log = cfg.log
        if not log.to or not enabled:
            return cls([])
        require(log)
        run_dir = Path(run_dir)
        base = Path(log.dir) if log.dir else run_dir
        group = log.group or run_dir.resolve().name
        made: list[Tracker] = []
        for name in log.to:
            if name == "tensorboard":
                made.append(TensorBoardTracker(base / "tensorboard" / (group if log.dir else "")))
            elif name == "mlflow":
                base.mkdir(parents=True, exist_ok=True)
                uri = log.mlflow_uri or f"sqlite:///{(base / 'mlflow.db').resolve()}"
                made.append(MlflowTracker(uri, log.project, base / "mlartifacts"))
            elif name == "wandb":
                made.append(WandbTracker(base, log.project))
        state_path = Path(state_file) if state_file else run_dir / STATE_FILE
        state = json.loads(state_path.read_text()) if resume and state_path.is_file() else {}
        out = cls(
            made,
            group=group,
            tags=dict(log.tags),
            config=cfg.to_dict(),
            metrics=headline_metrics(cfg),
            resumed=resume,
            state_file=state_path,
            state=state,
        )
        atexit.register(out._at_exit)
        return out

    @classmethod
    def for_peer(
        cls, cfg: RunConfig, run_dir: str | Path, *, rank: int, leader: bool, resume: bool = False
    ) -> Trackers:
        """A distributed peer's trackers: rank 0 logs the network-wide run
        (`<group>/<algorithm>`), and with `log.peers` every peer also its own
        (`<group>/peer-<rank>`); each process keeps its own tracker run ids."""
        own = Path(run_dir) / "peers" / f"peer-{rank}" / STATE_FILE
        t = cls.open(
            cfg,
            run_dir,
            resume=resume,
            enabled=leader or cfg.log.peers,
            state_file=None if leader else own,
        )
        name = cfg.algorithm.name
        if leader:
            t.start(name)
        if cfg.log.peers:
            t.start(f"peer-{rank}", algorithm=name, peer=str(rank))
        return t

    @classmethod
    def none(cls) -> Trackers:
        """No tracker: every call does nothing (what a run without `log.to` gets)."""
        return cls([])

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def start(self, key: str, **tags: str) -> None:
        """Open the tracker run `key` (an algorithm, or `peer-<i>`) with the config as its
        hyperparameters; `log` does it on first use."""
        if key in self.steps or not self.trackers:
            return
        run = RunInfo(
            key=key,
            name=f"{self.group}/{key}",
            group=self.group,
            tags={"group": self.group, "algorithm": key, **tags, **self.tags},
            config=self.config,
            params={"run.algorithm": key, **flat_params(self.config)},  # the config is shared
            metrics=self.metrics,
            resumed=self.resumed,
        )
        for t in self.trackers:
            t.start(run, self.state.setdefault(t.name, {}))
        self.steps[key] = 0
        self._save_state()

    def log(self, key: str, rec: Record) -> None:
        """One evaluated round of run `key`, at step = its round."""
        if not self.trackers:
            return
        self.start(key)
        step = int(rec["round"])
        metrics = {k: v for k, v in metrics_of(rec).items() if not math.isinf(v)}
        for t in self.trackers:
            t.log(key, metrics, step)
        self.steps[key] = step

    def on_record(
        self, key: str, then: Callable[[dict[str, Any]], None] | None = None
    ) -> Callable[[dict[str, Any]], None]:
        """The round loop's `on_record` callback: `then(rec)` (e.g. metrics.jsonl), then log."""
        self.start(key)

        def hook(rec: dict[str, Any]) -> None:
            if then is not None:
                then(rec)
            self.log(key, rec)

        return hook

    def peer_table(self, key: str, rows: Sequence[Mapping[str, Any]]) -> None:
        """Each peer's own metrics at the final round, as one table."""
        if not self.trackers or not rows:
            return
        self.start(key)
        for t in self.trackers:
            t.table(key, "peer_metrics", rows, self.steps[key])

    def end(self, run_dir: str | Path | None = None, main: str | None = None) -> None:
        """Attach the run's report, plots, summary and config to run `main`, close every run."""
        if not self.trackers or self.ended:
            return
        if run_dir is not None and main is not None and main in self.steps:
            d = Path(run_dir)
            files = [d / f for f in ARTIFACTS if (d / f).is_file()] + sorted(d.glob("*.png"))
            for t in self.trackers:
                t.artifacts(main, files, self.steps[main])
        self._finish(failed=False)

    def _finish(self, failed: bool) -> None:
        """Close every tracker even if one fails; then raise the first failure (unless the
        run failed already: its own error is the one to see)."""
        self.ended = True
        errors = []
        for t in self.trackers:
            try:
                t.finish(failed)
            except Exception as exc:
                errors.append(exc)
        if errors and not failed:
            raise errors[0]

    def _at_exit(self) -> None:
        """A run that died before `end` marks its tracker runs failed, not running forever."""
        if self.trackers and not self.ended:
            self._finish(failed=True)

    def _save_state(self) -> None:
        if self.state_file is not None and self.state_file.parent.is_dir():
            tmp = self.state_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.state, indent=2) + "\n")
            tmp.replace(self.state_file)
