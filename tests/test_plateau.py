"""experiments/plateau.py: the verdict logic, the budget and LR rules, the plan of cells, and
(one tiny run pair) that a shorter constant-LR run is the start of a longer one."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from declora.config.schema import load_config
from tests.conftest import main_stopped_by_sigterm

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pl():
    spec = importlib.util.spec_from_file_location("plateau", ROOT / "experiments" / "plateau.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["plateau"] = mod  # dataclasses look their module up while being defined
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize(
    ("low", "high", "want"),
    [
        (-0.9, 0.9, "equivalent"),
        (0.2, 0.8, "equivalent"),  # inside the margin wins over "excludes 0"
        (-0.5, 1.5, "inconclusive"),
        (0.3, 2.0, "better"),
        (-3.0, -0.1, "worse"),
        (-1.0, 0.5, "inconclusive"),  # touching the margin is not inside it
    ],
)
def test_verdict_rules(pl, low, high, want):
    assert pl.verdict(low, high, margin=1.0) == want


def test_paired_gap_matches_a_hand_computed_t_interval(pl):
    a = [0.80, 0.82, 0.81, 0.79, 0.83]
    b = [0.78, 0.79, 0.80, 0.78, 0.80]
    gap = pl.paired_gap(a, b, margin=1.0)
    d = [2.0, 3.0, 1.0, 1.0, 3.0]  # points
    mean = sum(d) / 5
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 4)
    half = 2.7764451051977987 * sd / math.sqrt(5)  # t(0.975, 4)
    assert gap.mean == pytest.approx(mean)
    assert (gap.low, gap.high) == (pytest.approx(mean - half), pytest.approx(mean + half))
    assert gap.n == 5 and gap.verdict == "better"


def test_paired_gap_pairs_by_position_and_refuses_unpaired(pl):
    same = pl.paired_gap([0.7, 0.9, 0.6], [0.7, 0.9, 0.6])
    assert same.mean == 0 and same.low == 0 and same.verdict == "equivalent"
    # large seed-to-seed spread but a constant offset: pairing removes the spread
    shifted = pl.paired_gap([0.6, 0.9, 0.7], [0.61, 0.91, 0.71])
    assert shifted.verdict == "worse" and shifted.mean == pytest.approx(-1.0)
    assert pl.paired_gap([0.7], [0.6]).verdict == "inconclusive"
    with pytest.raises(ValueError):
        pl.paired_gap([0.7, 0.8], [0.6])


def test_plateau_round_is_where_the_smoothed_curve_stops_gaining(pl):
    accs = [0.60, 0.70, 0.75, 0.78, 0.79, 0.792, 0.791, 0.793]
    points = [(10 * (i + 1), a) for i, a in enumerate(accs)]
    # unsmoothed: from round 50 (0.79) the best later is 0.793: +0.3 < 0.5
    assert pl.plateau_round(points, 0.5, smooth=1) == 50
    # a curve still climbing by more than the gain ends at its last point
    climbing = [(i, 0.5 + 0.01 * i) for i in range(1, 6)]
    assert pl.plateau_round(climbing, 0.5, smooth=1) == 5
    # one noisy spike late on does not move the budget when smoothed over 3 points
    spiky = [*points, (90, 0.805), (100, 0.792), (110, 0.791)]
    assert pl.plateau_round(spiky, 0.5, smooth=1) == 90
    assert pl.plateau_round(spiky, 0.5, smooth=3) == 80


def test_pick_lr_prefers_the_better_then_the_smaller(pl):
    assert pl.pick_lr({"0.1": 0.80, "0.2": 0.82, "0.4": 0.81}) == "0.2"
    assert pl.pick_lr({"0.4": 0.82, "0.05": 0.82, "0.1": 0.7}) == "0.05"


def test_the_plan_of_cells(pl):
    size = 14_372
    rpe, every = pl.rounds_per_epoch(size), pl.eval_every(size)
    assert rpe == 360 and every == 36
    curve = pl.curve_cells("binary", size)
    assert [c.lr for c in curve] == list(pl.CURVE_LRS)
    assert all(c.arm == "centralized" and c.seed == 0 for c in curve)
    assert all(c.rounds * pl.PEERS * pl.BATCH >= size for c in curve)  # at least one epoch
    tune = pl.tune_cells("binary", 360, every, pl.tune_grid("0.05"))
    # centralized once, 3 arms x 2 partitions, each at the 3 LRs around the curve's best
    assert len(tune) == 7 * 3
    assert {c.lr for c in tune} == {"0.025", "0.05", "0.1"}
    assert len({c.cell().name for c in tune}) == len(tune)
    lrs = {k: "0.1" for k in pl.arm_settings()}
    main = pl.main_cells("binary", 360, every, lrs)
    assert len(main) == 7 * len(pl.SEEDS) == 35
    # seed 0 of the main table is the tuning run of the chosen LR: the same folder
    tune_names = {c.cell().name for c in tune}
    assert {c.cell().name for c in main if c.seed == 0} <= tune_names
    assert not {c.cell().name for c in main if c.seed != 0} & tune_names


def test_the_tuning_grid_is_the_curves_best_and_its_neighbours(pl):
    assert pl.CURVE_LRS == ("0.025", "0.05", "0.1", "0.2", "0.4")
    assert pl.tune_grid("0.1") == ("0.05", "0.1", "0.2")
    assert pl.tune_grid("0.025") == ("0.025", "0.05", "0.1")  # at an edge: the nearest 3
    assert pl.tune_grid("0.4") == ("0.1", "0.2", "0.4")
    assert pl.tune_grid("0.2", width=1) == ("0.2",)


def _curve_row(lr: str, best_round: int) -> dict:
    points = [[36 * (i + 1), 1440 * (i + 1), 0.8 + 0.001 * i, 10.0 * i] for i in range(20)]
    return dict(
        task="binary", stage="curve", arm="centralized", partition=None, lr=lr, seed=0,
        rounds=720, cell=f"curve-{lr}", curve=points, val_best_round=best_round,
        val_best_accuracy=0.9, val_best_test_accuracy=0.89, test_accuracy=0.85,
    )  # fmt: skip


def test_a_budget_run_is_taken_from_its_curve_run_only_when_that_is_exact(pl):
    tune = pl.tune_cells("binary", 612, 36, ("0.05",))
    central = next(c for c in tune if c.arm == "centralized")
    row = pl.truncated_curve_row(central, [_curve_row("0.05", 612)])
    assert row["cell"] == central.cell().name and row["stage"] == "tune"
    assert row["rounds"] == 612 and row["curve"][-1][0] == 612 and len(row["curve"]) == 17
    assert row["val_best_test_accuracy"] == 0.89 and row["val_accuracy"] == row["curve"][-1][2]
    assert row["test_accuracy"] is None  # the final round's test score is not known at 612
    assert row["derived_from"] == "curve-0.05"
    # its best round lies after the budget, another LR, or another arm: the run is needed
    assert pl.truncated_curve_row(central, [_curve_row("0.05", 648)]) is None
    assert pl.truncated_curve_row(central, [_curve_row("0.1", 36)]) is None
    other = next(c for c in tune if c.arm == "dec-lora-ring")
    assert pl.truncated_curve_row(other, [_curve_row("0.05", 36)]) is None
    lrs = {k: "0.05" for k in pl.arm_settings()}
    for c in pl.ablation_cells("binary", 612, 36, lrs):  # e.g. centralized at r=2
        assert pl.truncated_curve_row(c, [_curve_row("0.05", 36)]) is None, c.variant


def test_a_shorter_constant_lr_run_is_the_start_of_the_longer_one(tokenizer, tmp_path):
    """What lets a centralized budget run be read off its longer curve run."""
    from typer.testing import CliRunner

    from declora.cli import app
    from tests.conftest import run_metrics, write_ring_job

    job = write_ring_job(
        tmp_path,
        tokenizer,
        seed=1,
        rounds=6,
        algorithm={"name": "centralized"},
        train={"schedule": "constant", "checkpoint_every": 0},
        data={"val_size": 0.1},
    )
    runs = {}
    for rounds in (4, 6):
        out = tmp_path / f"r{rounds}"
        args = ["run", "--quiet", "--config", str(job / "job.yaml"), "--out", str(out)]
        res = CliRunner().invoke(app, [*args, "--set", f"train.rounds={rounds}"])
        assert res.exit_code == 0, res.output
        runs[rounds] = run_metrics(out)
    keys = ("round", "examples_per_peer", "train_loss", "accuracy", "macro_f1")
    short = [{k: r.get(k) for k in keys} for r in runs[4]]
    long = [{k: r.get(k) for k in keys} for r in runs[6] if r["round"] <= 4]
    assert [r["round"] for r in short] == [2, 4] and short == long


def test_every_planned_cell_is_a_valid_config(pl):
    lrs = {k: "0.2" for k in pl.arm_settings()}
    cells = [
        *pl.curve_cells("binary", 14_372),
        *pl.tune_cells("3class", 300, 30, pl.CURVE_LRS),
        *pl.main_cells("binary", 360, 36, lrs),
    ]
    for c in cells:
        cfg = load_config(None, [*pl.base_sets(c.task), *c.cell().sets])
        assert cfg.data.val_size == pl.VAL_SIZE
        assert cfg.train.rounds == c.rounds and cfg.seed == c.seed
        assert cfg.train.schedule == "constant" and cfg.baselines == []


def test_main_table_from_rows(pl):
    rows = []
    curve = [[36 * (i + 1), 1440 * (i + 1), 0.80 + 0.005 * min(i, 4), 1.0] for i in range(20)]
    for lr in pl.CURVE_LRS:
        rows.append(dict(task="binary", stage="curve", lr=lr, arm="centralized", curve=curve))
    budget = pl.budget_of(rows, "binary")[0]
    assert budget == 36 * 6  # +0.5 a point to 82, then flat; the 3-point mean lags by one
    for arm, part in pl.arm_settings():
        for lr in pl.CURVE_LRS:
            for seed in pl.SEEDS:
                score = 0.85 + 0.001 * seed + (0.0 if arm == "centralized" else -0.03)
                rows.append(
                    dict(
                        task="binary",
                        stage="main",
                        arm=arm,
                        partition=part,
                        lr=lr,
                        seed=seed,
                        rounds=budget,
                        val_best_accuracy=0.9 - abs(float(lr) - 0.1),
                        peers_val_accuracy=0.9 - abs(float(lr) - 0.1),
                        val_best_test_accuracy=score,
                        peers_test_accuracy=score,
                    )
                )
    # equal curves: the smallest LR wins, so arms are tuned on 0.025, 0.05 and 0.1; the
    # largest of those validates best, at the grid's edge, so 0.2 is tuned too: it validates
    # worse, and 0.1 gets the seeds
    rows = [r for r in rows if r["stage"] == "curve" or r["seed"] == 0 or r["lr"] == "0.1"]
    for r in rows:
        if r["stage"] == "main" and r["seed"] == 0:
            r["stage"] = "tune"
    assert set(pl.tuned_lrs(rows, "binary").values()) == {"0.1"}
    table = pl.main_table(rows, "binary")
    by = {(t["partition"], t["arm"], t["reference"]): t["gap"] for t in table}
    assert by[("iid", "dec-lora-ring", "centralized")].verdict == "worse"
    assert by[("iid", "dec-lora-ring", "centralized")].mean == pytest.approx(-3.0)
    assert by[("dir0.5", "dec-lora-ring", "fedavg")].verdict == "equivalent"
    text = pl.report(rows)
    assert "| iid | dec-lora-ring - centralized | 5 | -3.00 |" in text
    gap_lines = {x.split(" | ")[1]: x for x in text.splitlines() if x.startswith("| dir0.5 | ")}
    assert gap_lines["dec-lora-ring - centralized"].endswith("| worse | yes, below |")
    assert gap_lines["dec-lora-ring - fedavg"].endswith("| equivalent | no |")
    assert pl._excludes_zero(0.05, 0.58) == "yes, above"  # equivalent, and above 0
    # the main table leads the report: both tasks, each arm's score and its gap to centralized
    head = text.split("## The main table")[1].split("Progress")[0].split("\n## ")[0]
    by_arm = {x.split(" | ")[1]: x for x in head.splitlines() if x.startswith("| binary | ")}
    assert by_arm["centralized"].startswith("| binary | centralized | 0.1 | 5 | 0.852 ± 0.002 |")
    assert "| 0.822 ± 0.002 | 0.822 ± 0.002 | -3.00 |" in by_arm["fedavg (iid)"]
    assert by_arm["fedavg (iid)"].endswith("| worse |")
    assert "| 3class | not yet: waiting for its learning curves |" in head
    assert text.index("## The main table") < text.index("Learning curves")
    # time to accuracy: CPU seconds where a run recorded them, its wall clock (marked) if not
    for r in rows:
        if r["stage"] == "tune":
            cpu = [20.0, 40.0] if r["arm"] == "centralized" else [None, None]
            r["curve"] = [[36, 144, 0.79, 50.0, 1e6, cpu[0]], [72, 288, 0.9, 100.0, 2e6, cpu[1]]]
    lines = pl._time_to_accuracy(rows, "binary")
    cells = {x.split("|")[1].strip(): x.split("|")[2:-1] for x in lines if x.startswith("| ")}
    assert [c.strip() for c in cells.pop("centralized")] == ["1/1", "72", "2,880", "2.0 MB", "40"]
    cells.pop("arm")
    assert len(cells) == 6 and all(c[-1].strip() == "100 (wall)" for c in cells.values())


def test_plan_text_counts_runs_and_hours(pl):
    text = pl.plan_text("binary", 14_400, 20.0, 10.0)
    # 5 curve runs of 2 epochs; 7 settings x 3 LRs of 1 epoch; 7 settings x 4 more seeds;
    # 16 ablation rows x 3 seeds (one K=5 row at 5x the examples: 12 extra epochs)
    assert "budget 360 rounds (assumed: one epoch)" in text
    assert "curve: 5 runs (5 to run), 10 epochs, 2.0 h to run" in text
    # tune: 3 centralized epochs at 20 ex/s + 18 peer epochs at 10 ex/s
    hours = (3 * 14_400 / 20 + 18 * 14_400 / 10) / 3600
    assert f"tune: 21 runs (21 to run), 21 epochs, {hours:.1f} h to run" in text
    assert "main: 28 runs (28 to run), 28 epochs" in text
    assert "ablations: 60 runs (60 to run), 72 epochs" in text
    assert "total: 114 runs, 131 epochs" in text
    # rows that exist are not to run, and their budget replaces the assumed one
    rows = [
        dict(_curve_row(c.lr, 36), cell=c.cell().name) for c in pl.curve_cells("binary", 14_400)
    ]
    text = pl.plan_text("binary", 14_400, 20.0, 10.0, rows)
    assert "budget 576 rounds\n" in text  # the rising test curve's budget (1.6 epochs)
    assert "curve: 5 runs (0 to run), 10 epochs, 0.0 h to run" in text
    assert "tune: 21 runs (18 to run), 34 epochs" in text  # centralized: read off its curves


def test_the_plan_takes_its_speed_from_the_runs_that_recorded_cpu_time(pl):
    text = pl.plan_text("binary", 14_400, None, None, [])
    assert " h " not in text  # nothing measured, nothing given: runs and epochs only
    # two 10-peer runs of 360 rounds (14,400 examples) at 1,200 and 1,680 CPU-s: 10 ex/s
    point = [360, 1440, 0.8, 9.0, 0.0]
    rows = [dict(task="binary", stage="tune", arm="fedavg", partition="iid", rounds=360,
                 cell=f"c{i}", lr="0.05", seed=0, curve=[[*point, cpu]])
            for i, cpu in enumerate((1200, 1680))]  # fmt: skip
    text = pl.plan_text("binary", 14_400, None, None, rows)
    assert "at 10 ex/s (centralized) and 10 ex/s (peer arms)" in text
    assert "(the binary task's runs; centralized taken as the other)" in text
    main = 28 * 14_400 / 10 / 3600  # seeds 1-4 of 7 settings, one epoch each
    assert f"main: 28 runs (28 to run), 28 epochs, {main:.1f} h to run" in text
    three = pl.plan_text("3class", 30_000, None, None, rows)  # no 3-class run yet
    assert "(the other task's runs; centralized taken as the other)" in three


def test_the_plan_takes_the_speed_of_the_machine_that_ran_last(pl):
    """Rows of two machines: the estimate uses the newest timed run's machine only (where it
    has both kinds of run) and names it; a kind it has not run yet comes from the other kind."""
    point = [360, 1440, 0.8, 9.0, 0.0]

    def row(arm, cpu, machine, finished):
        return dict(task="binary", stage="tune", arm=arm, partition="iid", rounds=360, seed=0,
                    cell=f"{arm}-{cpu}", lr="0.05", curve=[[*point, cpu]], machine=machine,
                    finished=finished)  # fmt: skip

    slow, fast = "AMD EPYC, 2 cores, Linux x86_64, 1 thread", "Intel Xeon, 2 cores, 1 thread"
    rows = [
        row("fedavg", 1440, slow, "2026-12-03T10:00:00+0000"),  # 10 ex/s
        row("centralized", 720, slow, "2026-12-03T11:00:00+0000"),  # 20 ex/s
        row("fedavg", 720, fast, "2026-12-04T10:00:00+0000"),  # 20 ex/s
    ]
    text = pl.plan_text("binary", 14_400, None, None, rows)
    assert "at 20 ex/s (centralized) and 20 ex/s (peer arms)" in text
    assert "(the binary task's runs on Intel Xeon; centralized taken as the other)" in text
    rows.append(row("centralized", 360, fast, "2026-12-04T11:00:00+0000"))  # 40 ex/s
    text = pl.plan_text("binary", 14_400, None, None, rows)
    assert "at 40 ex/s (centralized) and 20 ex/s (peer arms)" in text
    assert "one thread (the binary task's runs on Intel Xeon)" in text
    rows[-1]["finished"] = rows[-2]["finished"] = "2026-12-02T00:00:00+0000"  # AMD is newest
    assert "at 20 ex/s (centralized) and 10 ex/s (peer arms)" in pl.plan_text(
        "binary", 14_400, None, None, rows
    )


def test_the_plan_takes_the_newest_stretch_of_one_machine_and_its_main_shaped_ablations(pl):
    """A machine name that comes back after another machine may be another generation of that
    CPU: only the stretch since the other machine's last run counts. Ablation runs of the main
    table's shape count too; those with other peers, batches or local steps do not."""
    point = [360, 1440, 0.8, 9.0, 0.0]

    def row(cpu, machine, finished, **extra):
        return dict(task="binary", stage="tune", arm="fedavg", partition="iid", rounds=360,
                    seed=0, cell=f"{cpu}-{finished}", lr="0.05", curve=[[*point, cpu]],
                    machine=machine, finished=finished, **extra)  # fmt: skip

    amd, intel = "AMD EPYC, 2 cores, Linux x86_64, 1 thread", "Intel Xeon, 2 cores, 1 thread"
    rows = [
        row(1440, amd, "2026-12-03T10:00:00+0000"),  # 10 ex/s: the older EPYC
        row(720, intel, "2026-12-04T10:00:00+0000"),  # 20 ex/s
        row(480, amd, "2026-12-05T10:00:00+0000", ablation="ranks", variant="dec-lora r=4"),
    ]
    assert "at 30 ex/s (centralized) and 30 ex/s (peer arms)" in pl.plan_text(
        "binary", 14_400, None, None, rows
    )
    hundred = dict(ablation="peers", variant="100 peers")
    rows.append(row(14_400, amd, "2026-12-05T11:00:00+0000", **hundred))  # not 40 a round
    assert "at 30 ex/s" in pl.plan_text("binary", 14_400, None, None, rows)
    rows.append(row(360, amd, "2026-12-05T12:00:00+0000"))  # 40 ex/s: (14,400 + 14,400) / 840
    assert "at 34.3 ex/s" in pl.plan_text("binary", 14_400, None, None, rows)


def test_the_ablation_plan(pl):
    lrs = {k: "0.05" for k in pl.arm_settings()}
    cells = pl.ablation_cells("binary", 612, 36, lrs)
    variants = [v for vs in pl.ABLATIONS.values() for v in vs]
    assert len(cells) == len(variants) * len(pl.ABLATION_SEEDS) == 60
    names = {c.cell().name for c in cells}
    assert len(names) == len(cells)  # every run its own folder
    assert not names & {c.cell().name for c in pl.main_cells("binary", 612, 36, lrs)}
    budget_examples = 612 * pl.PEERS * pl.BATCH
    by = {c.variant: c for c in cells}
    # equal examples: K=5 a fifth of the rounds, 20 and 100 peers a half and a tenth
    for v in ("K=5, equal examples", "20 peers", "100 peers"):
        assert abs(pl.cell_examples(by[v]) - budget_examples) <= 5 * 100 * pl.BATCH
    assert pl.cell_examples(by["K=5, 5x examples"]) == 5 * budget_examples
    # the rank sweep keeps the main table's scale alpha / r = 32 / 8
    for r in (2, 4, 16):
        cfg = load_config(None, [*pl.base_sets("binary"), *by[f"dec-lora r={r}"].cell().sets])
        assert cfg.lora.r == r and cfg.lora.alpha / cfg.lora.r == 4.0
    assert by["no momentum"].lr == "0.5"  # 10x: the step of momentum 0.9
    er = load_config(None, [*pl.base_sets("binary"), *by["ER, iid"].cell().sets])
    assert (er.topology.kind, er.data.partition, er.topology.peers) == ("er", "iid", 10)
    for v in ("3-peer skew: dec-lora", "3-peer skew: local-only"):
        cfg = load_config(None, [*pl.base_sets("binary"), *by[v].cell().sets])
        assert (cfg.topology.peers, cfg.train.batch_size) == (3, 13)
        assert cfg.data.partition == "label-skew" and cfg.data.proportions[0] == [0.15, 0.85]
        assert abs(pl.cell_examples(by[v]) - budget_examples) < 3 * 13  # 39 a round
    for c in cells:  # each a valid config of its arm, on the skewed partition
        cfg = load_config(None, [*pl.base_sets(c.task), *c.cell().sets])
        assert cfg.train.rounds == c.rounds and cfg.seed == c.seed
        if c.arm != "centralized" and c.ablation != "er-and-3-peer-skew":
            assert cfg.data.partition == "dirichlet"
    # the main table's ER and 3-peer skew rows first, the 5x-examples runs last (a study cut
    # short keeps the main table and the most tables)
    main = [c.ablation == pl.MAIN_TABLE_ABLATION for c in cells]
    assert main == sorted(main, reverse=True) and sum(main) == 12
    assert {c.variant for c in cells[-3:]} == {"K=5, 5x examples"}


def test_ablation_tables_take_gaps_against_the_declared_references(pl):
    rows = []
    curve = [[36 * (i + 1), 1440 * (i + 1), 0.80, 1.0] for i in range(20)]
    for lr in pl.CURVE_LRS:
        rows.append(dict(task="binary", stage="curve", lr=lr, arm="centralized", curve=curve))
    budget = pl.budget_of(rows, "binary")[0]
    for arm, part in pl.arm_settings():
        for lr in pl.tune_grid("0.025"):
            val = 0.51 if lr == "0.05" else 0.5  # each arm's best inside its grid
            for seed in pl.SEEDS:
                score = 0.85 + 0.001 * seed - (0.0 if arm == "centralized" else 0.01)
                rows.append(dict(
                    task="binary", stage="tune" if seed == 0 else "main", arm=arm,
                    partition=part, lr=lr, seed=seed, rounds=budget, val_best_accuracy=val,
                    peers_val_accuracy=val, val_best_test_accuracy=score,
                    peers_test_accuracy=score,
                ))  # fmt: skip
    lrs = pl.tuned_lrs(rows, "binary")
    for c in pl.ablation_cells("binary", budget, 36, lrs):
        shift = {"4-bit gossip": -0.02, "centralized r=2": 0.0, "dec-lora r=2": -0.005}
        if c.variant in shift:
            rows.append(dict(
                task="binary", stage="ablation", arm=c.arm, partition=c.partition, lr=c.lr,
                seed=c.seed, rounds=c.rounds, ablation=c.ablation, variant=c.variant,
                val_best_test_accuracy=0.85 + 0.001 * c.seed + shift[c.variant],
            ))  # fmt: skip
    before = pl.main_table([r for r in rows if r.get("ablation") is None], "binary")
    assert [t["gap"] for t in pl.main_table(rows, "binary")] == [t["gap"] for t in before]
    text = "\n".join(pl.ablation_tables(rows, "binary", "###"))
    four = next(line for line in text.splitlines() if line.startswith("| 4-bit gossip"))
    # against the main Dec-LoRA cell (-1 point from centralized): -1 more, and -2 in all
    want = "| dec-lora-ring dir0.5 (main) | -1.00 [-1.00, -1.00] worse | -2.00 [-2.00, -2.00] worse"
    assert want in four
    r2 = next(line for line in text.splitlines() if line.startswith("| dec-lora r=2"))
    assert "| centralized r=2 | -0.50 [-0.50, -0.50] equivalent |" in r2
    assert "Ablation: confounds" not in text  # no rows yet, no table
    # the rank table reads 2 / 4 / 8 / 16: its r=8 rows are the main table's cells, seeds 0-2
    lines = text.splitlines()
    names = [line.split(" | ")[0] for line in lines if "r=" in line and line.startswith("| ")]
    assert names == [
        "| centralized r=2",
        "| dec-lora r=2",
        "| centralized r=8 (main, seeds 0-2)",
        "| dec-lora r=8 (main, seeds 0-2)",
    ]
    r8 = next(line for line in lines if line.startswith("| dec-lora r=8"))
    assert (
        "| 3 | 0.841 ± 0.001 | centralized r=8 (main, seeds 0-2) | -1.00 [-1.00, -1.00] worse" in r8
    )
    no_ranks = [r for r in rows if r.get("ablation") != "ranks"]
    assert "r=8" not in "\n".join(pl.ablation_tables(no_ranks, "binary", "###"))
    # before a variant has its declared 3 seeds, its verdicts are marked interim
    short = [r for r in rows if not (r.get("variant") == "dec-lora r=2" and r["seed"] == 2)]
    text = "\n".join(pl.ablation_tables(short, "binary", "###"))
    r2 = next(line for line in text.splitlines() if line.startswith("| dec-lora r=2"))
    assert "| 2 |" in r2 and "-0.50 [-0.50, -0.50] equivalent (so far: 2 of 3 seeds) |" in r2


def _tuned_binary_study(pl, curve, points_of):
    """Rows of a binary study whose curves (`curve` at every curve LR) set the budget and whose
    arms are tuned (seed 0 at every LR of the grid, 0.05 best), each arm's runs following
    `points_of(arm, budget)`; returns the rows and the budget."""
    rows = [dict(task="binary", stage="curve", lr=lr, arm="centralized", curve=curve, seed=0)
            for lr in pl.CURVE_LRS]  # fmt: skip
    budget = pl.budget_of(rows, "binary")[0]
    for arm, part in pl.arm_settings():
        points = points_of(arm, budget)
        for lr in pl.tune_grid("0.025"):
            rows.append(dict(
                task="binary", stage="tune", arm=arm, partition=part, lr=lr, seed=0,
                rounds=budget, val_best_accuracy=0.9 - abs(float(lr) - 0.05),
                peers_val_accuracy=0.9 - abs(float(lr) - 0.05), curve=points,
            ))  # fmt: skip
    return rows, budget


def test_time_to_accuracy_is_the_first_evaluation_near_centralized_best(pl):
    curve = [[36 * (i + 1), 1440 * (i + 1), 0.80 + 0.01 * min(i, 5), 10.0 * (i + 1), None]
             for i in range(20)]  # fmt: skip

    def points_of(arm, budget):
        slow = 0 if arm == "centralized" else 2  # the peer arms lag two evaluations
        sent = None if arm == "centralized" else 1e6  # centralized sends nothing
        cpu = None if arm == "centralized" else 5.0  # an older run without CPU time: its wall
        return [[36 * (i + 1), 144 * (i + 1), curve[max(0, i - slow)][2], 20.0 * (i + 1),
                 sent and sent * (i + 1), cpu and cpu * (i + 1)]
                for i in range(budget // 36)]  # fmt: skip

    rows, budget = _tuned_binary_study(pl, curve, points_of)
    points = points_of("dec-lora-ring", budget)
    lines = pl._time_to_accuracy(rows, "binary")
    assert ">= 0.830" in lines[0]  # best 0.85 minus 2 points
    by = {x.split(" | ")[0][2:]: x for x in lines if x.startswith("| ")}
    assert by["centralized"] == "| centralized | 1/1 | 144 | 5,760 |  | 80 (wall) |"
    assert by["dec-lora-ring (iid)"] == "| dec-lora-ring (iid) | 1/1 | 216 | 8,640 | 6.0 MB | 30 |"

    # more seeds: medians over those that reach the target (the mean of centralized's bests)
    fast, never = [list(p) for p in points], [list(p) for p in points]
    for p in fast:
        p[2] = 0.86  # reaches it at the first evaluation
    for p in never:
        p[2] = 0.5
    lr = pl.tuned_lrs(rows, "binary")[("dec-lora-ring", "iid")]
    for seed, pts in ((1, fast), (2, never), (3, fast)):
        rows.append(dict(task="binary", stage="main", arm="dec-lora-ring", partition="iid",
                         seed=seed, lr=lr, rounds=budget, curve=pts, cell=f"s{seed}"))  # fmt: skip
    by = {x.split(" | ")[0][2:]: x for x in pl._time_to_accuracy(rows, "binary") if x[:2] == "| "}
    # seeds 0, 1, 3 reach it at rounds 216, 36 and 36 (seed 2 never): median 36; 1 MB, 5 CPU-s
    assert by["dec-lora-ring (iid)"] == "| dec-lora-ring (iid) | 3/4 | 36 | 1,440 | 1.0 MB | 5 |"


def test_the_end_of_budget_table_gives_each_arms_last_gain_paired_by_seed(pl):
    """The last SMOOTH evaluations against the SMOOTH before them, seed by seed: a flat arm
    gains 0, a climbing one its slope; one seed gives no interval."""
    curve = [[36 * (i + 1), 1440 * (i + 1), 0.80 + 0.01 * min(i, 5), 1.0] for i in range(20)]

    def points_of(arm, budget):
        climb = 0.01 if arm == "fedavg" else 0.0  # a point an evaluation
        return [[36 * (i + 1), 144 * (i + 1), 0.7 + climb * i, 1.0] for i in range(budget // 36)]

    rows, budget = _tuned_binary_study(pl, curve, points_of)
    n = budget // 36
    lrs = pl.tuned_lrs(rows, "binary")
    lr = lrs[("fedavg", "iid")]
    for seed, climb in ((1, 0.02), (2, 0.01)):  # seed 0 climbs 0.01 an evaluation
        pts = [[36 * (i + 1), 144 * (i + 1), 0.5 + climb * i, 1.0] for i in range(n)]
        rows.append(dict(task="binary", stage="main", arm="fedavg", partition="iid", seed=seed,
                         lr=lr, rounds=budget, curve=pts, cell=f"s{seed}",
                         val_best_accuracy=0.6))  # fmt: skip
    lines = pl._end_of_budget(rows, "binary")
    s = pl.SMOOTH
    assert f"rounds {36 * (n - s + 1)}-{36 * n})" in lines[0]
    by = {x.split(" | ")[0][2:]: x.split(" | ") for x in lines if x.startswith("| ")}
    assert by["dec-lora-ring (iid)"][1:4] == ["1", "0.700", "+0.00"]
    assert by["dec-lora-ring (iid)"][4] == " |"  # one seed: no interval
    fed = by["fedavg (iid)"]
    assert fed[1] == "3" and fed[3] == f"{100 * s * (0.01 + 0.02 + 0.01) / 3:+.2f}"
    assert fed[4].startswith("[") and fed[4] != "[+4.00, +4.00] |"  # seeds differ: an interval
    assert not any(k.startswith("local-only") for k in by)  # its curve is not what it scores


def test_the_reports_training_sizes_are_the_tasks_own(pl):
    """The report counts epochs without loading data; the sizes it uses must be the real ones."""
    assert {task: pl.train_size(task) for task in pl.TASKS} == pl.TRAIN_SIZES


def test_only_one_stage_needs_the_earlier_ones_complete(pl, tmp_path, monkeypatch):
    """`--only` lets a second process take a later stage without running an earlier one's
    cells: with the curves missing it stops before running anything."""
    monkeypatch.setattr(pl, "train_size", lambda task: 14_371)  # no data loading
    rows = tmp_path / "runs.jsonl"
    with pytest.raises(pl.Incomplete, match="5 run\\(s\\) of the curve stage"):
        pl._run("binary", "tune", tmp_path / "out", rows, only=True)
    assert not (tmp_path / "out").exists() and not rows.exists()
    assert pl.main(["--stage", "tune", "--only", "--rows", str(rows), "--out", str(tmp_path)]) == 3


def test_an_arm_whose_best_lr_is_at_its_grids_edge_is_tuned_one_step_further(pl):
    base = pl.tune_grid("0.05")  # 0.025, 0.05, 0.1
    assert pl.arm_grid({}, base) == base  # nothing measured: the base grid
    assert pl.arm_grid({"0.025": 0.8, "0.05": 0.9}, base) == base  # incomplete: no decision
    assert pl.arm_grid({"0.025": 0.8, "0.05": 0.9, "0.1": 0.85}, base) == base  # inside
    up = {"0.025": 0.8, "0.05": 0.85, "0.1": 0.9}
    assert pl.arm_grid(up, base) == (*base, "0.2")  # best on the top edge: one more
    assert pl.arm_grid({**up, "0.2": 0.7}, base) == (*base, "0.2")  # 0.1 is inside now
    assert pl.arm_grid({**up, "0.2": 0.95, "0.4": 0.96}, base) == (*pl.CURVE_LRS, "0.8")
    # below the smallest LR of CURVE_LRS the grid goes on down the factor-2 ladder
    low = {"0.025": 0.9, "0.05": 0.8, "0.1": 0.7}
    assert pl.arm_grid(low, base) == ("0.0125", *base)
    assert pl.arm_grid({**low, "0.0125": 0.85}, base) == ("0.0125", *base)  # 0.025 inside
    falling = {lr: 1 - float(lr) for lr in pl.LR_LADDER}  # better at every smaller LR
    assert pl.arm_grid(falling, base) == (*pl.LR_LADDER[:3], *base)  # stops at the ladder's end
    assert pl.arm_grid({**up, "0.2": 0.95, "0.4": 0.96, "0.8": 0.97}, base) == pl.LR_LADDER[3:]
    assert pl.arm_grid({"0.05": 0.9, "0.1": 0.8, "0.2": 0.7}, ("0.05", "0.1", "0.2")) == (
        "0.025", "0.05", "0.1", "0.2")  # fmt: skip

    # the plan and the chosen LR follow: the arm's extra cell is planned, and until it has its
    # row no LR is chosen (the seeds wait for it)
    rows = [dict(_curve_row(lr, 36), lr=lr) for lr in pl.CURVE_LRS]
    budget, best, _ = pl.budget_of(rows, "binary")
    grid = pl.tune_grid(best)
    for arm, part in pl.arm_settings():
        for i, lr in enumerate(grid):
            top = arm == "fedavg" and part == "iid"  # this arm validates best at the top LR
            score = 0.8 + (0.01 * i if top else -0.01 * abs(i - 1))
            rows.append(dict(task="binary", stage="tune", arm=arm, partition=part, lr=lr,
                             seed=0, rounds=budget, val_best_accuracy=score,
                             peers_val_accuracy=score))  # fmt: skip
    cells = pl.tune_cells("binary", budget, 36, grid, rows)
    extra = [c for c in cells if c.lr not in grid]
    assert [(c.arm, c.partition) for c in extra] == [("fedavg", "iid")]
    nxt = pl.CURVE_LRS[pl.CURVE_LRS.index(grid[-1]) + 1]
    assert extra[0].lr == nxt
    assert pl.tuned_lrs(rows, "binary") is None
    rows.append(dict(task="binary", stage="tune", arm="fedavg", partition="iid", lr=nxt, seed=0,
                     rounds=budget, val_best_accuracy=0.5, peers_val_accuracy=0.5))  # fmt: skip
    lrs = pl.tuned_lrs(rows, "binary")
    assert lrs[("fedavg", "iid")] == grid[-1] and lrs[("centralized", None)] == grid[1]
    assert f"lr {nxt} |" in pl.report(rows)  # the tuning table shows the extra column


_HOLDER = """
import json, sys, time
from pathlib import Path
from declora.reporting.rundir import lock
folder, go, finish = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "finish"
folder.mkdir(parents=True, exist_ok=True)
lock(folder)
(folder / "run.json").write_text(json.dumps({"status": "running"}))
print("locked", flush=True)
while not go.exists():
    time.sleep(0.05)
if finish:
    (folder / "run.json").write_text(json.dumps({"status": "complete"}))
"""


@pytest.mark.parametrize("other", ["finish", "die", "no-wait"])
def test_two_processes_share_a_stage_without_running_a_cell_twice(pl, tmp_path, monkeypatch, other):
    """A cell another process holds is left to it: this one runs the rest, then waits, and
    takes the cell's row from the other's finished run ("finish") or, when the other stopped
    without finishing it ("die"), runs it itself. Each cell gets exactly one row. A stage that
    nothing after it waits for ("no-wait") returns at once, leaving the cell to the other."""
    import subprocess
    import threading

    from declora.runners import sweep

    cells = [pl.PlannedCell("tune", "binary", "fedavg", "iid", lr, 36, 36, 0)
             for lr in ("0.025", "0.05", "0.1")]  # fmt: skip
    out, rows = tmp_path / "out", tmp_path / "runs.jsonl"
    folder = lambda pc: out / "binary" / "cells" / pc.cell().name  # noqa: E731
    ran = []

    def fake_run_cell(cell, base, sets, job_out, threads):
        ran.append(cell.name)
        (job_out / "cells" / cell.name).mkdir(parents=True, exist_ok=True)
        (job_out / "cells" / cell.name / "run.json").write_text('{"status": "complete"}')
        return cell, 0, ""

    monkeypatch.setattr(sweep, "run_cell", fake_run_cell)
    monkeypatch.setattr(pl, "cell_row", lambda pc, f: {"task": pc.task, "cell": pc.cell().name})
    go = tmp_path / "go"
    held = cells[1]
    mode = "die" if other == "die" else "finish"
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder(held)), str(go), mode],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "locked"
        if other == "no-wait":
            assert pl.run_stage(cells, out, rows, wait=False, poll_s=0.1) == []
            assert not go.exists()  # it returned while the other still held the cell
        release = threading.Timer(1.0, go.touch)  # the other process ends while this one waits
        release.start()
        failed = pl.run_stage(cells, out, rows, poll_s=0.1)
        release.join()
    finally:
        go.touch()
        proc.wait(timeout=30)
    assert failed == []
    want = [cells[0].cell().name, cells[2].cell().name]
    assert ran == (want if mode == "finish" else [*want, held.cell().name])
    keys = [pl.row_key(r) for r in pl.read_rows(rows)]
    assert sorted(keys) == sorted(("binary", pc.cell().name) for pc in cells)  # one row each
    assert not pl.append_row(rows, {"task": "binary", "cell": held.cell().name})  # no repeat
    assert len(pl.read_rows(rows)) == 3


def test_the_3class_task_leaves_out_the_final_passes_no_table_reads(pl):
    """3-class: no test pass of the final adapters, and the peers are scored on validation only
    where the arm is tuned on them (local-only); the binary task's runs are made as before."""
    for arm in pl.ARMS:
        binary = load_config(None, [*pl.base_sets("binary", arm), *pl.ARMS[arm]])
        assert binary.eval.final_test and binary.eval.peers == "final"
        three = load_config(None, [*pl.base_sets("3class", arm), *pl.ARMS[arm]])
        assert not three.eval.final_test and three.train.length_sort
        assert three.model.dtype == "bfloat16" and binary.model.dtype == "float32"
        assert three.eval.peers == ("final" if arm in pl.TUNE_KEY else "never")
    assert pl.base_sets("binary") == pl.base_sets("binary", "local-only")  # unchanged
    cell = pl.PlannedCell("main", "3class", "local-only", "iid", "0.05", 750, 75, 1)
    cmd = pl.command(cell)
    assert "eval.peers=never" not in cmd and "eval.final_test=false" in cmd


def test_the_binary_ablations_leave_out_the_final_passes_no_table_reads(pl):
    """The binary ablations score like the 3-class task (decided before any ablation run);
    the binary task's curve, tuning and seed runs are made as before."""
    lrs = {k: "0.05" for k in pl.arm_settings()}
    cells = pl.ablation_cells("binary", 612, 36, lrs)
    assert {c.stage for c in cells} == {"ablation"}
    for c in cells:
        cmd = pl.command(c)
        assert "eval.final_test=false" in cmd and "train.length_sort" not in cmd
        assert "model.dtype" not in cmd
        assert ("eval.peers=never" in cmd) == (c.arm not in pl.TUNE_KEY), c.variant
        cfg = load_config(None, [*pl.base_sets(c.task, c.arm, c.stage), *c.cell().sets])
        assert not cfg.eval.final_test
    # the passes left out are not what any table compares
    assert "test_accuracy" not in pl.SCORES.values()
    for c in pl.main_cells("binary", 612, 36, lrs):
        cmd = pl.command(c)
        assert "eval.final_test" not in cmd and "eval.peers=never" not in cmd


def test_the_generated_report_says_what_is_still_to_run(pl):
    text = pl.report([], progress=True)
    for task, size in pl.TRAIN_SIZES.items():
        assert f"task {task}: {size} training examples" in text
    assert "  curve: 5 runs (5 to run)" in text  # nothing measured yet
    assert "Progress" not in pl.report([])  # only where asked (the docs, the CLI's report)


def test_the_seeds_of_tuned_arms_run_while_another_process_finishes_the_last_tuning(
    pl, tmp_path, monkeypatch
):
    """Before waiting for a tuning run another process holds, a process runs the seeds of
    the arms whose tuning is over (never of the arm still tuning), so no lane sits idle."""
    rows = [dict(_curve_row(lr, 36), lr=lr) for lr in pl.CURVE_LRS]
    budget, best, _ = pl.budget_of(rows, "binary")
    grid = pl.tune_grid(best)
    last = ("local-only", "dir0.5")
    for arm, part in pl.arm_settings():
        for i, lr in enumerate(grid):
            if (arm, part) == last and i == 2:
                continue  # its last tuning run: another process holds it
            score = 0.8 - 0.01 * abs(i - 1)  # best in the middle: settled once all have rows
            rows.append(dict(task="binary", stage="tune", arm=arm, partition=part, lr=lr,
                             seed=0, rounds=budget, val_best_accuracy=score,
                             peers_val_accuracy=score, cell=f"tune-{arm}-{part}-{lr}"))  # fmt: skip
    path = tmp_path / "runs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    settled = pl.settled_lrs(rows, "binary")
    assert last not in settled and len(settled) == len(pl.arm_settings()) - 1
    assert pl.tuned_lrs(rows, "binary") is None
    calls = []

    def fake_run_stage(cells, out, rows_path, *, wait=True, poll_s=60.0, filler=None):
        cells = list(cells)
        calls.append(({c.stage for c in cells}, {(c.arm, c.partition) for c in cells}, wait))
        if wait and any(c.stage == "tune" for c in cells):  # the other process finishes it
            pl.append_row(rows_path, dict(rows[-1], partition="dir0.5", arm="local-only",
                                          lr=grid[2], val_best_accuracy=0.5,
                                          peers_val_accuracy=0.5, cell="the-last"))  # fmt: skip
        return []

    monkeypatch.setattr(pl, "run_stage", fake_run_stage)
    monkeypatch.setattr(pl, "train_size", lambda task: 14_371)
    assert pl._run("binary", "main", tmp_path / "out", path) == []
    stages = [(s, w) for s, _, w in calls]
    i = stages.index(({"main"}, False))
    assert stages[i - 1] == ({"tune"}, False) and stages[i + 1] == ({"tune"}, True)
    assert calls[i][1] == set(settled)  # every tuned arm's seeds, not the one still tuning
    assert calls[-1][0] == {"main"} and last in calls[-1][1]  # then the whole main stage


def test_the_main_table_shows_the_tuned_arms_while_one_still_tunes(pl):
    """Once an arm's tuning is over, its seeds and its gaps to centralized show in the main
    table; an arm still tuning says so, and no gap involving it is computed."""
    rows = _tuned_rows(pl, "binary")
    budget = pl.budget_of(rows, "binary")[0]
    last = ("local-only", "dir0.5")
    rows = [r for r in rows if (r.get("arm"), r.get("partition")) != last or r["lr"] != "0.05"]
    lrs = pl.settled_lrs(rows, "binary")
    assert last not in lrs and pl.tuned_lrs(rows, "binary") is None
    for arm, part in [("centralized", None), ("dec-lora-ring", "iid")]:
        for seed in (1, 2, 3):
            score = 0.85 + 0.002 * seed + (0.0 if arm == "centralized" else -0.01)
            rows.append(dict(task="binary", stage="main", arm=arm, partition=part,
                             lr=lrs[(arm, part)], seed=seed, rounds=budget,
                             val_best_test_accuracy=score, peers_test_accuracy=score,
                             cell=f"main-{arm}-{part}-{seed}"))  # fmt: skip
    table = pl.main_table(rows, "binary")
    by = {(t["partition"], t["arm"], t["reference"]): t["gap"] for t in table}
    assert by[("iid", "dec-lora-ring", "centralized")].n == 3
    assert by[("iid", "dec-lora-ring", "centralized")].mean == pytest.approx(-1.0)
    assert ("dir0.5", "local-only", "centralized") not in by  # still tuning
    assert ("iid", "local-only", "centralized") in by  # tuned: no seeds yet, n = 0
    text = "\n".join(pl.main_table_text(rows))
    assert "| binary | local-only (dir0.5) | still tuning |" in text
    assert "| binary | dec-lora-ring (iid) | " in text and "| -1.00 |" in text
    assert "(so far: 3 of 5 seeds) |" in text  # a verdict before the declared 5 seeds is interim
    assert "not yet" not in text.split("| binary |", 1)[1].split("\n")[0]
    block = pl.report(rows).split("Tuning (", 1)[1].split("\n\n")[1]  # the tuning table
    tuning = {x.split(" | ")[0]: x for x in block.splitlines()}
    assert "**" in tuning["| centralized"] and "**" not in tuning["| local-only (dir0.5)"]


def test_the_main_table_carries_the_er_and_3_peer_skew_rows_against_centralized(pl):
    """Section 4a's other topology and partition, run as an ablation's variants at 3 seeds,
    are rows of the main table: score, the peers' own models, and the gap to centralized at
    the same seeds with its verdict (interim below 3 seeds); other ablations are not."""
    rows = _tuned_rows(pl, "binary")
    budget = pl.budget_of(rows, "binary")[0]
    lrs = pl.settled_lrs(rows, "binary")
    for seed in (1, 2, 3, 4):  # centralized: seeds 0-4 (seed 0 is its tuning run)
        rows.append(dict(task="binary", stage="main", arm="centralized", partition=None,
                         lr=lrs[("centralized", None)], seed=seed, rounds=budget,
                         val_best_test_accuracy=0.85, cell=f"c{seed}"))  # fmt: skip
    for r in rows:
        if r["stage"] == "tune" and r["arm"] == "centralized" and r["lr"] == lrs[r["arm"], None]:
            r["val_best_test_accuracy"] = 0.85
    variants = {(v.name, v.arm): v for v in pl.ABLATIONS[pl.MAIN_TABLE_ABLATION]}

    def add(name, arm, part, seeds, score, ablation=pl.MAIN_TABLE_ABLATION):
        key = pl.SCORES.get(arm, "val_best_test_accuracy")
        for seed in seeds:
            row = dict(task="binary", stage="ablation", ablation=ablation, variant=name,
                       arm=arm, partition=part, lr="0.05", seed=seed, rounds=budget,
                       peers_test_accuracy=score - 0.05, cell=f"{name}-{seed}")  # fmt: skip
            rows.append({**row, key: score + 0.001 * seed})

    assert ("ER, iid", "dec-lora-er") in variants
    add("ER, iid", "dec-lora-er", "iid", (0, 1, 2), 0.84)
    add("3-peer skew: local-only", "local-only", "skew3", (0, 1), 0.60)
    add("20 peers", "dec-lora-ring", "dir0.5", (0, 1, 2), 0.5, ablation="peers")
    lines = {x.split(" | ")[1]: x for x in pl.main_table_text(rows) if x.startswith("| binary")}
    er = lines["dec-lora-er (iid)"]
    assert er.startswith("| binary | dec-lora-er (iid) | 0.05 | 3 | 0.841 ± 0.001 | 0.790 ± ")
    assert er.endswith("| -0.90 | [-1.15, -0.65] | worse |")  # paired on seeds 0-2
    skew = lines["local-only (3-peer skew)"]
    assert "| 2 | 0.601 ± 0.001 |" in skew and skew.endswith("(so far: 2 of 3 seeds) |")
    assert not any("20 peers" in x or x.count("(dir0.5)") > 1 for x in lines)


def test_the_plan_counts_the_seeds_of_an_arm_tuned_off_the_curves_best_lr(pl):
    """While another arm still tunes, the plan takes a tuned arm's own LR, so its seeds that
    already ran are not counted again (the arms still tuning: at the curve's best LR)."""
    rows = _tuned_rows(pl, "binary")
    budget, best, _ = pl.budget_of(rows, "binary")
    grid, arm = pl.tune_grid(best), ("dec-lora-ring", "iid")
    above = pl.LR_LADDER[pl.LR_LADDER.index(grid[-1]) + 1]
    for r in rows:  # this arm validates best on the grid's upper edge, then worse past it
        if (r.get("arm"), r.get("partition")) == arm and r["stage"] == "tune":
            r["val_best_accuracy"] = 0.8 if r["lr"] == grid[-1] else 0.7
    rows.append(dict(rows[-1], arm=arm[0], partition=arm[1], lr=above, val_best_accuracy=0.6,
                     cell="past-the-edge"))  # fmt: skip
    rows = [r for r in rows if (r.get("arm"), r.get("partition")) != ("fedavg", "iid")
            or r["lr"] != grid[0]]  # fmt: skip
    assert pl.settled_lrs(rows, "binary")[arm] == grid[-1] != best
    assert pl.tuned_lrs(rows, "binary") is None  # FedAvg still tunes
    settled = pl.settled_lrs(rows, "binary")
    cells = [c for c in pl.main_cells("binary", budget, pl.eval_every(14_371), settled)
             if (c.arm, c.partition) == arm and c.seed != 0]  # fmt: skip
    assert len(cells) == 4
    rows += [dict(task="binary", stage="main", arm=arm[0], partition=arm[1], lr=c.lr,
                  seed=c.seed, rounds=budget, val_best_test_accuracy=0.85, cell=c.cell().name)
             for c in cells]  # fmt: skip
    plan = pl.plan_text("binary", 14_371, 20.0, 10.0, rows)
    assert "  main: 28 runs (24 to run)" in plan


def _tuned_rows(pl, task: str) -> list[dict]:
    """Curve and tuning rows of `task` with every arm tuned (best LR in the middle of its grid)."""
    rows = [dict(_curve_row(lr, 36), task=task, cell=f"{task}-curve-{lr}") for lr in pl.CURVE_LRS]
    budget, best, _ = pl.budget_of(rows, task)
    for arm, part in pl.arm_settings():
        for i, lr in enumerate(pl.tune_grid(best)):
            score = 0.8 - 0.01 * abs(i - 1)
            rows.append(dict(task=task, stage="tune", arm=arm, partition=part, lr=lr, seed=0,
                             rounds=budget, val_best_accuracy=score, peers_val_accuracy=score,
                             cell=f"{task}-tune-{arm}-{part}-{lr}"))  # fmt: skip
    assert pl.tuned_lrs(rows, task) is not None
    return rows


def test_a_lane_waiting_on_a_held_run_does_the_other_tasks_ready_work(pl, tmp_path, monkeypatch):
    """While another process holds the last curve (or tuning) run of one task, a lane runs the
    other task's ready cells one at a time (main seeds first, then ablations), never a cell that
    has a row, that another process holds or that it tried already; then it goes on waiting."""
    monkeypatch.setattr(pl, "train_size", lambda task: 14_371)
    rows = _tuned_rows(pl, "binary")
    assert pl.filler_cells("binary", rows) == []  # the task itself: never filler
    assert pl.filler_cells("3class", []) == []  # nothing tuned anywhere: nothing ready
    ready = pl.filler_cells("3class", rows)
    assert {c.task for c in ready} == {"binary"} and ready[0].stage == "main"
    assert {c.stage for c in ready} == {"main", "ablation"}
    stages = [c.stage for c in ready]
    assert stages == sorted(stages, key=["main", "ablation"].index)  # the main seeds first

    path, out = tmp_path / "runs.jsonl", tmp_path / "out"
    done = ready[0]
    rows.append(dict(task="binary", stage="main", cell=done.cell().name))
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    held_folder = out / "binary" / "cells" / ready[1].cell().name
    held_folder.mkdir(parents=True)
    ran = []

    def fake_run_stage(cells, out, rows_path, *, wait=True, poll_s=60.0, filler=None):
        ran.extend(c.cell().name for c in cells)
        return []

    import declora.reporting.rundir as rd

    monkeypatch.setattr(rd, "busy", lambda folder: "pid 1" if folder == held_folder else None)
    monkeypatch.setattr(pl, "run_stage", fake_run_stage)
    tried: set[tuple[str, str]] = set()
    assert pl.run_next(ready, out, path, tried)
    assert pl.run_next(ready, out, path, tried)
    assert ran == [ready[2].cell().name, ready[3].cell().name]  # not the done one, not the held
    tried |= {("binary", c.cell().name) for c in ready}
    assert not pl.run_next(ready, out, path, tried) and len(ran) == 2  # all tried: none again


def test_run_stage_fills_its_wait_and_sleeps_only_when_there_is_nothing_to_fill(
    pl, tmp_path, monkeypatch
):
    """The waiting loop of run_stage: a filler that has work is called instead of sleeping; once
    the other process has written the held cell's row, the stage ends without running it."""
    import declora.reporting.rundir as rd

    cell = pl.PlannedCell("curve", "3class", "centralized", None, "0.05", 720, 36, 0)
    path, out = tmp_path / "runs.jsonl", tmp_path / "out"
    path.write_text("")
    folder = out / "3class" / "cells" / cell.cell().name
    folder.mkdir(parents=True)
    held = {"yes": True}
    monkeypatch.setattr(rd, "busy", lambda f: "pid 1" if held["yes"] and f == folder else None)
    sleeps, fills = [], []

    def filler() -> bool:
        fills.append(len(sleeps))
        if len(fills) == 3:  # the other process finishes while this one runs its third filler
            pl.append_row(path, dict(task="3class", stage="curve", cell=cell.cell().name))
            held["yes"] = False
        return len(fills) != 2  # the second call finds nothing ready: it sleeps once

    monkeypatch.setattr(pl.time, "sleep", lambda s: sleeps.append(s))
    assert pl.run_stage([cell], out, path, poll_s=7.0, filler=filler) == []
    assert fills == [0, 0, 1] and sleeps == [7.0]


def test_the_report_says_what_each_stage_cost_and_on_which_machines(pl):
    """Per stage: runs made (not those read off a curve), recorded CPU-hours, the wall-hours of
    runs without CPU time, and the machines with their run counts."""
    amd, intel = "AMD EPYC, 2 cores, Linux x86_64, 1 thread", "Intel Xeon, 2 cores, 1 thread"
    pts = [[36, 144, 0.8, 100.0, 0.0]]
    rows = [
        dict(task="binary", stage="curve", curve=pts, wall_seconds=7200.0, machine=amd),
        dict(task="binary", stage="tune", curve=[[*pts[0], 1800.0]], wall_seconds=1.0,
             machine=amd),
        dict(task="binary", stage="tune", curve=[[*pts[0], 5400.0]], wall_seconds=1.0,
             machine=intel),
        dict(task="binary", stage="tune", curve=pts, derived_from="curve-0.05"),  # not run
        dict(task="3class", stage="main", curve=[[*pts[0], 3600.0]], machine=intel),
    ]  # fmt: skip
    lines = pl.compute_table(rows, "binary")
    assert "| curve | 1 | 0.0 | 2.0 | AMD EPYC (1) |" in lines
    assert "| tune | 2 | 2.0 | 0.0 | AMD EPYC (1), Intel Xeon (1) |" in lines
    assert not any(x.startswith("| main") for x in lines)  # the other task's run is not here
    assert pl.compute_table(rows, "nothing") == []


def test_the_3class_curve_stage_fills_its_wait_with_binary_seeds(pl, tmp_path, monkeypatch):
    """The wiring in `_run`: with the last 3-class curve held by another process, this one runs
    binary seeds (the first ready ones, in order) until that curve's row lands, never the held
    curve itself, and never sleeps while there is work."""
    import declora.reporting.rundir as rd
    import declora.runners.sweep as sweep

    monkeypatch.setattr(pl, "train_size", lambda task: 14_371)
    rows = _tuned_rows(pl, "binary")
    curves = pl.curve_cells("3class", 14_371)
    rows += [dict(_curve_row(c.lr, 36), task="3class", cell=c.cell().name) for c in curves[:-1]]
    path, out = tmp_path / "runs.jsonl", tmp_path / "out"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    held = out / "3class" / "cells" / curves[-1].cell().name
    held.mkdir(parents=True)
    state = {"held": True}
    ran: list[tuple[str, str]] = []

    def fake_run_cell(cell, base, base_sets, job_out, threads):
        ran.append((job_out.name, cell.name))
        if len(ran) == 2:  # the other process finishes the held curve meanwhile
            last = curves[-1]
            pl.append_row(path, dict(_curve_row(last.lr, 36), task="3class", cell=last.cell().name))
            state["held"] = False
        return cell, 0, ""

    monkeypatch.setattr(rd, "busy", lambda f: "pid 1" if state["held"] and f == held else None)
    monkeypatch.setattr(sweep, "run_cell", fake_run_cell)
    monkeypatch.setattr(sweep, "cell_status", lambda folder: None)  # no run finishes here
    monkeypatch.setattr(pl.time, "sleep", lambda s: pytest.fail("slept while work was ready"))
    pl._run("3class", "curve", out, path)
    ready = {c.cell().name: (i, c.stage) for i, c in enumerate(pl.filler_cells("3class", rows))}
    assert [job for job, _ in ran] == ["binary", "binary"]
    assert [ready[name][1] for _, name in ran] == ["main", "main"]
    assert ready[ran[0][1]][0] < ready[ran[1][1]][0]  # in the plan's order


def test_the_3class_task_runs_only_the_main_tables_other_topology_and_skew(pl):
    """Section 4a (ER and the paper's 3-peer skew) on both tasks; sections 4b-f on the binary
    task only. The 3-class runs keep its bfloat16 base and its 3-class skew."""
    lrs = {k: "0.05" for k in pl.arm_settings()}
    three = pl.ablation_cells("3class", 750, 75, lrs)
    assert {c.ablation for c in three} == {"er-and-3-peer-skew"}
    assert len(three) == 12  # 4 variants x 3 seeds
    assert all("model.dtype=bfloat16" in c.base for c in three)
    skew = [c for c in three if c.partition == "skew3"]
    assert skew and all(f"data.proportions={pl.SKEW3['3class']}" in c.sets for c in skew)
    binary = pl.ablation_cells("binary", 612, 36, lrs)
    assert len(binary) == 60 and {c.ablation for c in binary} == set(pl.ABLATIONS)
    text = pl.plan_text("3class", 30_166, 20.0, 10.0)
    assert "  ablations: 12 runs" in text
    assert "total: 66 runs" in text  # curves 5, tuning 21, seeds 28, ablations 12


def test_the_time_to_accuracy_plot_keeps_one_colour_per_arm_in_every_panel(
    pl, tmp_path, monkeypatch
):
    """The bytes panel leaves out the arms that send nothing; the others keep their colour
    (before, leaving centralized out shifted every colour of that panel)."""
    import matplotlib.pyplot as plt

    rows = _tuned_rows(pl, "binary")
    budget = pl.budget_of(rows, "binary")[0]
    lrs = pl.tuned_lrs(rows, "binary")
    for (arm, part), lr in lrs.items():
        sends = arm not in ("centralized", "local-only")
        pts = [[36 * i, 144 * i, 0.8, 10.0 * i, 1e6 * i if sends else 0.0, 5.0 * i]
               for i in range(1, 4)]  # fmt: skip
        for r in rows:
            if (r["arm"], r.get("partition"), r["lr"], r.get("rounds")) == (arm, part, lr, budget):
                r["curve"] = pts
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    assert pl.plot_curves(rows, "binary", tmp_path / "plot.png")
    (fig,) = figures
    colours = [{ln.get_label(): ln.get_color() for ln in ax.get_lines()} for ax in fig.axes[1:]]
    examples, sent, seconds = colours
    assert examples == seconds and len(examples) == len(pl.arm_settings())
    assert set(sent) == {"dec-lora-ring (iid)", "dec-lora-ring (dir0.5)", "fedavg (iid)",
                         "fedavg (dir0.5)"}  # fmt: skip
    assert all(sent[k] == examples[k] for k in sent)


def test_write_docs_puts_the_main_table_on_the_front_pages(pl, tmp_path, monkeypatch):
    docs = tmp_path / "docs"
    pages = [tmp_path / "README.md", docs / "index.md", docs / "results" / "overview.md"]
    for page in pages:
        page.parent.mkdir(parents=True, exist_ok=True)
        page.write_text("before\n<!-- plateau-main -->\nold\n<!-- /plateau-main -->\nafter\n")
    results = docs / "results.md"  # the main table above the reading, the details below
    results.write_text(
        "<!-- plateau-main -->\n<!-- /plateau-main -->\nreading\n"
        "<!-- plateau-report -->\n<!-- /plateau-report -->\n"
    )
    monkeypatch.setattr(pl, "ROOT", tmp_path)
    pl.write_docs([])
    for page in pages:
        text = page.read_text()
        assert text.startswith("before\n<!-- plateau-main -->\n") and text.endswith("after\n")
        assert "old" not in text and "| binary | not yet: waiting for its learning curves |" in text
    head, rest = results.read_text().split("reading\n")
    assert "| binary | not yet: waiting for its learning curves |" in head
    assert "Margin declared" in rest and "not yet: waiting" not in rest


def test_the_front_pages_show_the_committed_rows(pl):
    """README, the site's home, the results overview and the results page carry the main table
    of the rows committed beside them (`make results-docs` after every commit of rows)."""
    table = "\n".join(pl.main_table_text(pl.read_rows()))
    docs = ROOT / "docs"
    pages = (ROOT / "README.md", docs / "index.md", docs / "results" / "overview.md")
    for page in (*pages, docs / "results.md"):
        assert table.strip() in page.read_text(), f"{page.name}: run make results-docs"


def _rising(lr: str, every: int, n: int, top: int, base: float = 0.7) -> dict:
    """A centralized curve row of `n` evaluations that gains a point each until the `top`-th."""
    acc = [base + 0.01 * min(i, top) for i in range(n)]
    pts = [[every * (i + 1), 40 * every * (i + 1), a, 1.0, 0.0] for i, a in enumerate(acc)]
    return dict(
        task="binary", stage="curve", arm="centralized", partition=None, lr=lr, seed=0,
        rounds=every * n, cell=f"curve-{lr}-{every * n}", curve=pts,
        val_best_round=every * min(n, top + 1), val_best_accuracy=pts[-1][2],
        val_best_test_accuracy=0.8, test_accuracy=0.8,
    )  # fmt: skip


def test_a_curve_still_gaining_at_its_end_is_run_longer_before_the_budget(pl):
    """Fewer than SMOOTH evaluations after the budget round do not show a plateau: the best LR's
    curve runs CURVE_EPOCHS_LONG epochs, and the budget comes from that curve."""
    rows = [
        dict(_rising(c.lr, 36, 20, 19 if c.lr == "0.05" else 0), cell=c.cell().name)
        for c in pl.curve_cells("binary", 14_371)
    ]
    assert pl.plateau_round([(p[0], p[2]) for p in rows[1]["curve"]], 0.5, 3) == 720  # the end
    assert pl.budget_of(rows, "binary") is None
    assert pl.long_curve_needed(rows, "binary") == "0.05"
    assert "lr 0.05's curve is still gaining near its end, so it runs 4 epochs" in pl.report(rows)
    cells = pl.curve_cells_for(rows, "binary", 14_371)
    assert len(cells) == 6 and (cells[-1].lr, cells[-1].rounds) == ("0.05", 36 * 10 * 4)
    assert "curve: 6 runs (1 to run)" in pl.plan_text("binary", 14_371, 20.0, 10.0, rows)
    long = dict(_rising("0.05", 36, 40, 25), cell=cells[-1].cell().name)
    rows.append(long)
    budget, lr, row = pl.budget_of(rows, "binary")
    assert (lr, row["rounds"]) == ("0.05", 1440) and budget < 1440 - 3 * 36
    assert pl.long_curve_needed(rows, "binary") is None
    assert len(pl.curve_cells_for(rows, "binary", 14_371)) == 5  # nothing more to run
    assert "| 1440 | 57600 |" in pl.report(rows)  # the long curve is the one shown
    assert "evaluations of its 1440-round curve follow it" in pl.report(rows)
    # a budget run is read off the long curve, not the 2-epoch one
    tune = pl.tune_cells("binary", budget, 36, ("0.05",))
    central = next(c for c in tune if c.arm == "centralized")
    assert pl.truncated_curve_row(central, rows)["derived_from"] == long["cell"]


def test_the_binary_budget_is_shown_by_its_curve_and_needs_no_long_run(pl):
    rows = [r for r in pl.read_rows() if r["task"] == "binary" and r["stage"] == "curve"]
    budget, lr, row = pl.budget_of(rows, "binary")
    assert (budget, lr, row["rounds"]) == (612, "0.05", 720)
    assert pl.long_curve_needed(rows, "binary") is None


def test_the_curve_stage_runs_the_long_curve_once_the_grid_shows_no_plateau(
    pl, tmp_path, monkeypatch
):
    import declora.reporting.rundir as rd
    import declora.runners.sweep as sweep

    monkeypatch.setattr(pl, "train_size", lambda task: 14_371)
    rows = [
        dict(_rising(c.lr, 36, 20, 19 if c.lr == "0.05" else 0), cell=c.cell().name)
        for c in pl.curve_cells("binary", 14_371)
    ]
    path, out = tmp_path / "runs.jsonl", tmp_path / "out"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ran = []

    def fake_run_cell(cell, base, base_sets, job_out, threads):
        ran.append(cell.name)
        return cell, 1, "not run here"

    monkeypatch.setattr(rd, "busy", lambda f: None)
    monkeypatch.setattr(sweep, "run_cell", fake_run_cell)
    monkeypatch.setattr(sweep, "cell_status", lambda folder: None)
    failed = pl._run("binary", "curve", out, path)
    assert ran == [pl.long_curve_cell("binary", 14_371, "0.05").cell().name]
    assert failed  # it did not finish here, so the stage says so


def test_each_row_records_its_machine_with_the_cpu_model_first(pl, tmp_path, monkeypatch):
    """The report groups and matches rows by this string (CPU model before the first comma,
    the whole string to pick the speed of the newest machine), so its wording is pinned."""
    import os
    import platform

    import declora.reporting.machine as machine

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Example CPU\n")
    monkeypatch.setattr(machine, "CPUINFO", info)
    assert pl.machine() == (
        f"Example CPU, {os.cpu_count()} cores, {platform.system()} {platform.machine()}, 1 thread"
    )


def test_a_stop_signal_stops_the_study_with_its_code_and_says_how_to_continue(
    pl, tmp_path, monkeypatch, capsys
):
    """SIGTERM to a lane's process becomes a stop that reaches its running cell (through
    run_cell's Ctrl-C path) instead of ending the process and leaving the cell training as an
    orphan. The handler this test sets first must not see the signal."""
    import signal

    args = ["--task", "binary", "--rows", str(tmp_path / "rows.jsonl")]
    code, seen = main_stopped_by_sigterm(monkeypatch, pl, "_run", lambda: pl.main(args))
    assert (code, seen) == (128 + signal.SIGTERM, [])
    assert "stopped by SIGTERM; the same command continues the study" in capsys.readouterr().err
