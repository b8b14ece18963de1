"""What one round of staleness costs in accuracy (comm.overlap), in simulation (not a test).

    python benchmarks/overlap.py [--seeds 0 1 2] [--settings sync overlap q4 q4-overlap]
        [--out runs/bench-overlap-sim] [--rows docs/results/data/overlap.jsonl] [--report-only]

The demo job (MiniLM, ring of 10, Dirichlet 0.5, 72 rounds) with Dec-LoRA only, synchronous
against overlapped gossip (fp32, and 4-bit with stochastic rounding), per seed. The simulation
does exactly what real peers do (test_distributed holds them equal), so the accuracy here is
the accuracy of an overlapped multi-host run; its seconds per round come from
benchmarks/network.py. Resumable: a (setting, seed) with a row in `--rows` is not run again;
each finished run appends its row at once (commit them). One run at a time, one thread.
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

from declora.reporting.paired import paired_gap

ROOT = Path(__file__).resolve().parents[1]
SETTINGS: dict[str, list[str]] = {
    "sync": [],
    "overlap": ["comm.overlap=true"],
    "q4": ["comm.bits=4"],
    "q4-overlap": ["comm.bits=4", "comm.overlap=true"],
}
PAIRS = {"overlap": "sync", "q4-overlap": "q4"}  # overlapped setting -> its synchronous twin
THRESHOLD = 0.60  # time to accuracy: the first evaluated round at or above it


def run_one(setting: str, seed: int, out: Path) -> dict:
    sets = [f"seed={seed}", "baselines=[]", *SETTINGS[setting]]
    cmd = [sys.executable, "-m", "declora", "run", "--quiet", "--out", str(out), "--overwrite"]
    cmd += [a for s in sets for a in ("--set", s)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"{setting} seed {seed} failed:\n{res.stderr[-3000:]}")
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["round"], r["accuracy"]) for r in recs if "accuracy" in r]
    reached = next((t for t, acc in curve if acc >= THRESHOLD), None)
    return {
        "setting": setting,
        "seed": seed,
        "accuracy": recs[-1]["accuracy"],
        "macro_f1": recs[-1].get("macro_f1"),
        "bytes_sent_per_peer": recs[-1]["bytes_sent"],
        "round_reaching_threshold": reached,
        "threshold": THRESHOLD,
        "curve": curve,
        "seconds": round(time.perf_counter() - start, 1),
        "date": time.strftime("%Y-%m-%d"),
    }


def report(rows: list[dict]) -> None:
    by = {(r["setting"], r["seed"]): r for r in rows}
    print("| gossip | seeds | accuracy (mean) | round reaching 0.60 (each seed) |")
    print("|---|---:|---:|---|")
    for s in SETTINGS:
        mine = [r for r in rows if r["setting"] == s]
        if mine:
            acc = np.mean([r["accuracy"] for r in mine])
            reached = ", ".join(str(r["round_reaching_threshold"]) for r in mine)
            print(f"| {s} | {len(mine)} | {acc:.4f} | {reached} |")
    print()
    for over, sync in PAIRS.items():
        seeds = sorted(k for (name, k) in by if name == over and (sync, k) in by)
        if not seeds:
            continue
        a = [by[(over, k)]["accuracy"] for k in seeds]
        b = [by[(sync, k)]["accuracy"] for k in seeds]
        gap = paired_gap(a, b, margin=1.0)
        each = ", ".join(f"{100 * (x - y):+.2f}" for x, y in zip(a, b, strict=True))
        print(f"{over} - {sync}: {each} points; {gap.shown()}, {gap.verdict} (margin 1 point)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-overlap-sim")
    ap.add_argument("--rows", type=Path, default=ROOT / "docs/results/data/overlap.jsonl")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    rows = [json.loads(x) for x in args.rows.read_text().splitlines()] if args.rows.exists() else []
    done = {(r["setting"], r["seed"]) for r in rows}
    if not args.report_only:
        for seed in args.seeds:  # seed-major: a partial study still pairs its settings
            for setting in args.settings:
                if (setting, seed) in done:
                    continue
                row = run_one(setting, seed, args.out / f"{setting}-s{seed}")
                rows.append(row)
                with args.rows.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)
    report(rows)


if __name__ == "__main__":
    main()
