"""What a round costs on a capped link: 2 hosts x 2 peers over network namespaces (not a test).

    sudo .venv/bin/python benchmarks/network.py [--rates 0 100 10 1]
        [--settings fp32 fp16 q4 q2-ef fp32-overlap q4-overlap] [--rounds 3]
        [--out runs/bench-network] [--record rows.jsonl] [--plot round_time.png] [--plot-only]

Makes two hosts on a bridge (`benchmarks/hosts.py`; rate 0 = no cap, else `tc` htb on each
host's link, both directions; no delay emulation, this kernel has no netem), runs the demo job
(MiniLM, ring of 4, monitoring off, one evaluation at the end) with `declora launch --nnodes 2`
on both, and reads back per round: seconds of local steps (compute) and of the gossip step
(encode, exchange, decode, mix; "waiting" is the part spent waiting for neighbours), the slowest
peer's; and the bytes that crossed host 0's link from the kernel's interface counters (both
directions, whole run: start-up handshake and rendezvous included) against the accounting.
Needs root and iproute2.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.hosts import Hosts, has_netem, unavailable

SETTINGS: dict[str, list[str]] = {
    "fp32": [],
    "fp16": ["comm.bits=16"],
    "q4": ["comm.bits=4"],
    "q2-ef": ["comm.bits=2", "comm.error_feedback=true"],
    # comm.overlap: the exchange runs in a thread during the next local steps (one round stale)
    "fp32-overlap": ["comm.overlap=true"],
    "q4-overlap": ["comm.bits=4", "comm.overlap=true"],
}


def run_one(rate: float, setting: str, rounds: int, out: Path, port: int) -> dict:
    sets = [
        "topology.peers=4",
        f"train.rounds={rounds}",
        f"eval.every={rounds}",
        "eval.monitor=false",
        "eval.peers=never",
        "train.checkpoint_every=0",
        "baselines=[]",
        *SETTINGS[setting],
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with Hosts(2, rate_mbit=rate or None) as hosts:
        endpoint = f"{hosts.address(0)}:{port}"
        procs = []
        before = hosts.counters(0)
        start = time.perf_counter()
        for i in range(2):
            cmd = [sys.executable, "-m", "declora", "launch", "--peers", "2", "--nnodes", "2"]
            cmd += ["--node-rank", str(i), "--rdzv-endpoint", endpoint, "--rdzv-timeout", "120"]
            cmd += ["--", "--quiet", "--out", str(out), "--overwrite"]
            cmd += [a for s in sets for a in ("--set", s)]
            procs.append(hosts.popen(i, cmd, env=env, stderr=subprocess.PIPE, text=True))
        errs = [p.communicate(timeout=3600)[1] for p in procs]
        wall = time.perf_counter() - start
        after = hosts.counters(0)
    for p, err in zip(procs, errs, strict=True):
        if p.returncode != 0:
            raise SystemExit(f"{setting} at {rate} Mbit/s failed:\n{err[-3000:]}")
    per_peer = []
    for i in range(4):
        lines = (out / "peers" / f"peer-{i}" / "metrics.jsonl").read_text().splitlines()
        per_peer.append(json.loads(lines[-1]))
    crossed = sum(after[k] - before[k] for k in ("tx_bytes", "rx_bytes"))
    compute = max(p["peer_compute_seconds"] for p in per_peer) / rounds
    comm = max(p["peer_comm_seconds"] for p in per_peer) / rounds
    wait = max(p["peer_comm_wait_seconds"] for p in per_peer) / rounds
    # what the round loop waited for the gossip (all of it unless overlapped) and the
    # loop's own clock: a round as the peers lived it, overlap or not
    blocked = max(p["peer_comm_blocked_seconds"] for p in per_peer) / rounds
    loop = max(p["wall_seconds"] for p in per_peer) / rounds
    return {
        "link_mbit": rate or None,
        "setting": setting,
        "rounds": rounds,
        "compute_s_per_round": round(compute, 3),
        "gossip_s_per_round": round(comm, 3),
        "waiting_s_per_round": round(wait, 3),
        "blocked_s_per_round": round(blocked, 3),
        "round_s": round(loop, 3),
        "round_over_compute": round(loop / compute, 3),
        "accounted_bytes_all_peers": int(sum(p["peer_bytes_sent"] for p in per_peer)),
        "link_bytes_host0": int(crossed),
        "wall_seconds": round(wall, 1),
    }


def plot(rows: list[dict], path: Path) -> None:
    """Seconds per round against the link's rate, one line per gossip setting (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    unlimited = 1000.0  # where "no cap" sits on the axis
    for setting in dict.fromkeys(r["setting"] for r in rows):
        mine = sorted(
            (r["link_mbit"] or unlimited, r["round_s"]) for r in rows if r["setting"] == setting
        )
        style = "--" if setting.endswith("overlap") else "-"
        ax.plot(*zip(*mine, strict=True), style, marker="o", label=setting)
    computes = [r["compute_s_per_round"] for r in rows]
    ax.axhline(float(np.median(computes)), color="grey", lw=0.8, label="local steps alone")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("link rate per host, Mbit/s (1000 = no cap)")
    ax.set_ylabel("seconds per round (slowest peer)")
    ax.set_title("4 peers on 2 hosts, MiniLM demo job")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", type=float, nargs="+", default=[0, 100, 10, 1])
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("runs/bench-network"))
    ap.add_argument(
        "--record", type=Path, default=None, help="also append the rows to this JSONL file"
    )
    ap.add_argument("--plot", type=Path, default=None, help="write the round-time plot here")
    ap.add_argument(
        "--plot-only", action="store_true", help="plot the rows of --record, run nothing"
    )
    args = ap.parse_args()
    if args.plot_only:
        rows = [json.loads(x) for x in args.record.read_text().splitlines() if x]
        plot(rows, args.plot)
        return
    why = unavailable()
    if why:
        raise SystemExit(f"needs network namespaces: {why}")
    print(f"netem (delay emulation) available: {has_netem()}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for k, rate in enumerate(args.rates):
        for j, setting in enumerate(args.settings):
            run = args.out / f"{setting}-{rate:g}"
            row = run_one(rate, setting, args.rounds, run, 29400 + k * 10 + j)
            rows.append(row)
            print(json.dumps(row), flush=True)
    (args.out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if args.record:  # the raw rows behind the README's table, with when and where
        stamp = {"date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count()}
        with args.record.open("a") as f:
            f.writelines(json.dumps({**r, **stamp}) + "\n" for r in rows)
    if args.plot:
        plot(rows, args.plot)
    print()
    print(
        "| link | gossip | compute s/round | gossip s/round | of which waiting | "
        "gossip not hidden s/round | round s | round / compute | "
        "accounted bytes (all peers) | bytes over host 0's link |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        link = "unlimited" if r["link_mbit"] is None else f"{r['link_mbit']:g} Mbit/s"
        print(
            f"| {link} | {r['setting']} | {r['compute_s_per_round']:.3f} | "
            f"{r['gossip_s_per_round']:.3f} | {r['waiting_s_per_round']:.3f} | "
            f"{r['blocked_s_per_round']:.3f} | {r['round_s']:.3f} | "
            f"{r['round_over_compute']:.2f}x | {r['accounted_bytes_all_peers'] / 1e6:.3f} MB | "
            f"{r['link_bytes_host0'] / 1e6:.3f} MB |"
        )


if __name__ == "__main__":
    main()
