"""`declora run` inside torchrun: this process is one peer of a distributed Dec-LoRA run.

The same configuration, data partition (computed from the shared seed, no data moves), engine,
round loop and checkpoints as the simulation; only the gossip step and the network-wide numbers
go over torch.distributed. Files: rank 0 writes the run's `metrics.jsonl` (with the averaged
model's metrics when `eval.monitor` is on), `summary.json`, `report.md` and
`adapters/average/`; every peer writes `peers/peer-<i>/metrics.jsonl`, `adapters/peer-<i>/` and
its own checkpoints under `checkpoints/peer-<i>/`.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from declora.config.schema import RunConfig
from declora.engine import checkpoint as ckpt
from declora.engine.round_loop import LoopHooks, Result, train
from declora.errors import DecloraError
from declora.model.export import save_at_rank, save_peft_adapter
from declora.network import distributed as dd
from declora.network.auth import load_key
from declora.reporting.report import summary_rows, write_report
from declora.reporting.rundir import STATUS_FILE, RunDir, failure_text, write_json
from declora.reporting.trackers import Trackers, require
from declora.runners.build import (
    PeerSide,
    averaged_export,
    build_algorithm,
    make_evaluator,
    plan_ranks,
    prepare,
)
from declora.runners.launch import launched_as
from declora.runners.placement import refusal
from declora.runners.simulate import total_cpu_seconds, write_setup


def restarted() -> bool:
    """True when torchrun restarted the group after a failure."""
    return os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") not in ("", "0")


def _model_digest(model: torch.nn.Module) -> dict[str, Any]:
    """What identifies the frozen base: its class, size and a hash of a few of its weights."""
    h = hashlib.sha256()
    params = list(model.named_parameters())
    for _, p in params[:2] + params[-2:]:
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes()[: 1 << 20])
    return {
        "class": type(model).__name__,
        "parameters": sum(p.numel() for _, p in params),
        "weights_sha256": h.hexdigest()[:16],
    }


def _data_digest(prep: Any) -> dict[str, Any]:
    h = hashlib.sha256()
    for ex in prep.train_examples:
        h.update(np.asarray(ex["input_ids"], dtype=np.int64).tobytes())
        if "label" in ex:
            h.update(int(ex["label"]).to_bytes(4, "little", signed=True))
    return {
        "train_examples": len(prep.train_examples),
        "test_examples": len(prep.test_examples),
        "train_sha256": h.hexdigest()[:16],
        "part_sizes": [len(p) for p in prep.parts],
    }


def fingerprint(cfg: RunConfig, prep: Any) -> dict[str, Any]:
    """What every peer must agree on: config (without per-machine keys), model, data, adapter
    shapes. Paths are left out (they may differ between machines); contents are hashed."""
    resolved = cfg.model_dump(mode="json")
    resolved["train"].pop("threads", None)
    for key in ("path", "test_path"):
        resolved["data"].pop(key, None)
    resolved["comm"].pop("auth_key_file", None)  # a path per machine; the secret is proved
    if Path(cfg.model.name).exists():
        resolved["model"].pop("name", None)
    return {
        "config": resolved,
        "model": _model_digest(prep.model),
        "data": _data_digest(prep),
        "adapter": {k: list(v.shape) for k, v in prep.init.items()},
    }


def _open_rundir(out: Path, proc: dd.PeerProcess, resume: bool, overwrite: bool) -> str:
    """Rank 0 creates (or reopens) the run directory; returns an error message or ''."""
    if not proc.leader:
        return ""
    try:
        if resume and restarted() and not (out / STATUS_FILE).is_file():
            RunDir.create(out, overwrite=overwrite)  # the first attempt died before creating it
        elif resume:
            RunDir.reopen(out)
        else:
            RunDir.create(out, overwrite=overwrite)
    except DecloraError as exc:
        return str(exc)
    return ""


def run_peer(
    cfg: RunConfig,
    out: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> tuple[dd.PeerProcess, Result]:
    """Run this process's peer; every peer returns when the whole run is written."""
    proc = dd.start(cfg.comm.backend, cfg.comm.timeout_s)
    resume = resume or restarted()
    error = refusal(cfg, proc.world)
    prep, key = None, None
    if not error:
        try:
            if proc.leader or cfg.log.peers:
                require(cfg.log)  # a missing tracker extra stops every peer, before any work
            key = load_key(cfg.comm.auth_key_file)  # before any work: a bad key stops all
            prep = prepare(cfg)
        except DecloraError as exc:
            error = str(exc)
    dd.prove_membership(key, proc, failed=bool(error))  # before the run directory exists
    resume = dd.agree_to_resume(resume, proc)
    if not error:
        error = _open_rundir(out, proc, resume, overwrite)
    dd.handshake(None if error else fingerprint(cfg, prep), proc, error=error)
    assert prep is not None
    rank = proc.rank
    rundir = RunDir(out)
    peer_dir = rundir.sub(f"peers/peer-{rank}")
    if proc.leader:
        write_setup(rundir, prep)
        if launch := launched_as():  # what continues the run, for `declora report`
            rundir.set_status("running", launch=launch)
    name = cfg.algorithm.name
    trackers = Trackers.for_peer(cfg, out, rank=rank, leader=proc.leader, resume=resume)
    torch.manual_seed(cfg.seed + rank)
    skip = cfg.comm.on_peer_failure == "skip"
    # collectives wait for the slowest peer's evaluation too: a generous bound, not comm.timeout_s
    slack = max(cfg.comm.timeout_s, dd.STARTUP_S)
    network = dd.PeerNetwork(proc, monitor=cfg.eval.monitor, timeout_s=slack, local=skip)
    run = build_algorithm(
        prep,
        name,
        out / "checkpoints" / f"peer-{rank}",
        resume=resume,
        side=PeerSide(proc, network),
    )
    engine, gossip, checkpoints = run.engine, run.parts.communicator, run.parts.checkpoints
    network.clocks = {
        "compute": lambda: engine.seconds,
        "comm": lambda: gossip.seconds,
        "comm_wait": lambda: gossip.wait_seconds,
        # what the round loop waited for: all of it, unless comm.overlap hid it behind compute
        "comm_blocked": lambda: getattr(gossip, "blocked_seconds", gossip.seconds),
    }
    if checkpoints is not None:
        checkpoints.keep = max(2, checkpoints.keep)  # peers must share a round to resume from
        if resume:
            try:  # an agent's restart may start over; a --resume asked for may not
                at = dd.agree_on_resume(ckpt.rounds(checkpoints.root), proc, strict=not restarted())
            except DecloraError as exc:
                if proc.leader:
                    rundir.set_status("failed", error=failure_text(exc))
                raise
            checkpoints.at = at

    def on_record(rec: dict[str, Any]) -> None:
        peer_dir.append_metrics(_peer_view(rec))
        if proc.leader:
            rundir.append_metrics(_network_view(rec))
            trackers.log(name, _network_view(rec))
        if cfg.log.peers:
            trackers.log(f"peer-{rank}", _peer_view(rec))

    def on_restore(records: list[dict[str, Any]]) -> None:
        peer_dir.rewrite_metrics([_peer_view(r) for r in records])
        if proc.leader:
            rundir.rewrite_metrics([_network_view(r) for r in records])

    try:
        result = train(
            run.parts,
            prep.train_examples,
            run.settings,
            LoopHooks(on_record, on_restore, progress=progress and proc.leader),
        )
    except BaseException as exc:
        if proc.leader:
            rundir.set_status("failed", error=failure_text(exc))
        raise
    kind = prep.peft_task_type
    own = {k: v[0] for k, v in result.final.items()}
    mine = (plan_ranks(cfg, 1, rank) or (prep.spec.r,))[0]  # lora.ranks: its true rank
    save_at_rank(
        out / "adapters" / f"peer-{rank}",
        prep.spec,
        own,
        mine,
        prep.model_path,
        kind,
        model=prep.model,
    )
    lost = sorted(getattr(gossip, "failed", ()))  # comm.on_peer_failure=skip: who went silent
    if lost:
        print(
            f"peer {rank}: finished without neighbour(s) {', '.join(map(str, lost))}, which "
            "stopped answering (comm.on_peer_failure=skip)",
            file=sys.stderr,
            flush=True,
        )
    write_json(
        peer_dir.path / "wire.json",
        {"bytes_on_wire": gossip.bytes_on_wire, "lost_neighbours": lost},
    )
    if network.monitor:
        avg = network.average(own)
        if proc.leader:
            avg_spec, avg = averaged_export(cfg, prep.spec, avg)
            save_peft_adapter(
                out / "adapters" / "average",
                avg_spec,
                avg,
                prep.model_path,
                kind,
                model=prep.model,
            )
    if not network.local:
        dd.barrier("waiting for every peer to save its adapter", slack)
    if proc.leader:
        _finish(rundir, prep, result, proc)
        trackers.peer_table(name, result.peer_metrics)
    trackers.end(out, name if proc.leader else None)  # rank 0 attaches the report and plots
    if not network.local:
        dd.barrier("waiting for the summary", slack)
    return proc, result


_PEER_KEYS = (
    "round",
    "examples_per_peer",
    "peer",
    "peer_train_loss",
    "peer_bytes_sent",
    "peer_compute_seconds",
    "peer_comm_seconds",
    "peer_comm_wait_seconds",
    "peer_comm_blocked_seconds",
    "robust_flagged_share",  # whom this peer's robust rule flagged (comm.robust)
    "robust_flags",
    "robust_excluded",
    "robust_removed",
    "robust_stale",
)


def _peer_view(rec: dict[str, Any]) -> dict[str, Any]:
    out = {k: rec[k] for k in _PEER_KEYS if k in rec}
    out["wall_seconds"] = rec.get("wall_seconds")
    return out


def _network_view(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in rec.items() if k not in _PEER_KEYS[2:]}


def _finish(rundir: RunDir, prep: Any, result: Result, proc: dd.PeerProcess) -> None:
    """Rank 0's summary: the averaged model (if monitored), the peers' metrics, wire bytes."""
    cfg = prep.cfg
    rundir.write_json("peer_metrics.json", result.peer_metrics)
    if result.extras:
        rundir.write_json("samples.json", result.extras)
    wire, lost = [], []  # what each peer wrote (with comm.on_peer_failure=skip: if it has)
    for i in range(proc.world):
        f = rundir.path / "peers" / f"peer-{i}" / "wire.json"
        written = json.loads(f.read_text()) if f.is_file() else {}
        wire.append(written.get("bytes_on_wire"))
        lost.append(written.get("lost_neighbours"))
    ev = make_evaluator(prep)
    name = cfg.algorithm.name
    rows = summary_rows(
        {name: result},
        name,
        ev.columns,
        ev.primary,
        ev.higher_is_better,
        peers=proc.world,
    )
    rundir.write_json(
        "summary.json",
        {
            "main": name,
            "task": cfg.task,
            "columns": list(ev.columns),
            "rows": rows,
            "distributed": {
                "processes": proc.world,
                "bytes_on_wire_per_peer": wire,
                "lost_neighbours_per_peer": lost,
            },
        },
    )
    write_report(rundir, prep, {name: result}, rows)
    rundir.set_status(
        "complete",
        machine=f"{platform.machine()}, {torch.get_num_threads()} threads per peer",
        processes=proc.world,
        wall_seconds=round(result.wall_seconds, 1),
        cpu_seconds=total_cpu_seconds([result]),  # this process's (rank 0's)
        finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
