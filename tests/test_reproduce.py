"""The paper-reproduction suite (experiments/reproduce.py): its cells, their configs, its tables."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from declora.runners.sweep import Cell, slug
from tests.conftest import main_stopped_by_sigterm

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rep():
    spec = importlib.util.spec_from_file_location(
        "reproduce", ROOT / "experiments" / "reproduce.py"
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = mod  # dataclasses look their module up while being defined
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("quick", [False, True])
def test_every_cell_is_a_valid_config_and_shared_cells_run_once(rep, quick):
    exps = rep.experiments(quick)
    todo = rep.plan(exps)
    rep.validate(todo)  # raises on any invalid cell
    names = [(job.name, c.name) for job, c, _ in todo]
    assert len(names) == len(set(names))
    # the 10-peer ring at rank 8 appears in several experiments but is one cell per seed
    seeds = exps[0].seeds
    uses = sum(
        1
        for e in exps
        for v in e.variants
        for s in e.seeds
        if rep.cell_of(v.sets, s) == rep.cell_of(("lora.r=8",), s)
    )
    assert uses > len(seeds)
    assert sum(1 for _, c, _ in todo if c == rep.cell_of(("lora.r=8",), seeds[0])) == 1
    # the longest cells start first
    costs = [cost for _, _, cost in todo]
    assert costs == sorted(costs, reverse=True)


def test_cell_identity_ignores_the_order_of_overrides(rep):
    a = rep.cell_of(["lora.r=4", "topology.kind=er"], 1)
    b = rep.cell_of(["topology.kind=er", "lora.r=4"], 1)
    assert a == b and a.name == b.name
    with pytest.raises(Exception, match="twice"):
        rep.cell_of(["lora.r=4", "lora.r=8"], 0)


def test_long_cell_names_stay_distinct():
    long_a = "x" * 90 + "a"
    long_b = "x" * 90 + "b"
    assert slug(long_a) != slug(long_b) and len(slug(long_a)) <= 80
    assert slug("r=2__seed=0") == "r=2__seed=0"
    c1 = Cell((("data.proportions", "[[0.15,0.85],[0.85,0.15]]" + "0" * 60),), 0)
    c2 = Cell((("data.proportions", "[[0.15,0.85],[0.85,0.15]]" + "0" * 59 + "1"),), 0)
    assert c1.name != c2.name


def _fake_cell(root: Path, name: str, accuracy: float, best: float) -> None:
    d = root / "minilm" / "cells" / name
    d.mkdir(parents=True)
    (d / "run.json").write_text(json.dumps({"status": "complete", "wall_seconds": 40.0}))
    (d / "summary.json").write_text(
        json.dumps(
            {
                "columns": ["accuracy", "macro_f1"],
                "rows": [
                    {
                        "label": "x",
                        "accuracy": accuracy,
                        "best_accuracy": best,
                        "bytes_per_peer": 1e6,
                    }
                ],
            }
        )
    )
    rows = [
        {
            "round": r,
            "examples_per_peer": 4 * r,
            "accuracy": accuracy - 0.01 * (20 - r) / 5,
            "consensus_distance": 0.1,
        }
        for r in (5, 10, 15, 20)
    ]
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in rows) + "\n")


def test_tables_pair_each_seed_with_its_centralized_run(rep, tmp_path):
    exp = next(e for e in rep.experiments(False) if e.key == "quantization")
    for s, (dec, cen) in enumerate([(0.60, 0.62), (0.61, 0.62), (0.59, 0.64)]):
        _fake_cell(tmp_path, rep.cell_of(("lora.r=8",), s).name, dec, dec + 0.01)
        _fake_cell(
            tmp_path, rep.cell_of(("algorithm.name=centralized", "lora.r=8"), s).name, cen, cen
        )
    rows = rep.summarize(tmp_path, exp)
    fp32 = rows[0]
    assert fp32["variant"] == "fp32" and fp32["seeds"] == 3
    assert fp32["gap_final"] == pytest.approx([-0.02, -0.01, -0.05])
    assert fp32["gap_best"] == pytest.approx([-0.01, 0.0, -0.04])
    assert rows[1]["seeds"] == 0  # the 4-bit cells were never run: shown as missing, not zero
    text = rep.table(rows, causal=False)
    assert "| fp32 | 3 | 0.6000 ± 0.0100 |" in text
    assert "-2.67 ± 2.08" in text  # final gap in points: mean and sample std of -2, -1, -5
    assert "| 4-bit | 0 | – |" in text and "| 0 | – | – | – | – | – | – |" in text
    path = rep.write_results(tmp_path, [exp], quick=False, wall=None, n_jobs=2)
    doc = path.read_text()
    assert "## Quantized communication" in doc and "--set comm.bits=4" in doc
    assert json.loads((tmp_path / "results.json").read_text())["quantization"][0]["seeds"] == 3
    assert not (tmp_path / "img" / "quantization-compare").exists()  # one finished variant

    # with a second variant finished, `declora report`'s plots are drawn and linked
    _fake_cell(tmp_path, rep.cell_of(("lora.r=8", "comm.bits=4"), 0).name, 0.6, 0.61)
    doc = rep.write_results(tmp_path, [exp], quick=False, wall=None, n_jobs=2).read_text()
    for png in ("accuracy.png", "accuracy_vs_bytes.png"):
        assert (tmp_path / "img" / "quantization-compare" / png).stat().st_size > 1000
        assert f"img/quantization-compare/{png}" in doc
    assert "| 4-bit | 1 | 0.6000 | 0.6100 |" in doc


def test_unknown_experiment_is_refused(rep, capsys):
    assert rep.main(["--only", "table9", "--report-only"]) == 2
    assert "unknown experiment" in capsys.readouterr().err


def test_every_plot_kind_is_drawn_from_finished_cells(rep, tmp_path):
    exps = [e for e in rep.experiments(True) if e.plot]
    assert {e.plot for e in exps} == {"rank", "curves", "bars"}
    for e in exps:
        for i, v in enumerate(e.variants):
            for s in e.seeds:
                name = rep.cell_of(v.sets, s).name
                if not (tmp_path / "minilm" / "cells" / name).exists():
                    _fake_cell(tmp_path, name, 0.5 + 0.01 * i, 0.52 + 0.01 * i)
    doc = rep.write_results(tmp_path, exps, quick=True, wall=840.0, n_jobs=2).read_text()
    for e in exps:
        for png in [f"{e.key}.png"] + ([f"{e.key}-consensus.png"] if e.plot == "rank" else []):
            assert (tmp_path / "img" / png).stat().st_size > 1000
            assert f"(img/{png})" in doc
    assert "14.0 min" in doc and (tmp_path / "results-quick.md").is_file()


def test_complete_cells_are_not_run_again(rep, tmp_path, capsys):
    exp = next(e for e in rep.experiments(True) if e.key == "quantization")
    todo = [t for t in rep.plan([exp])]
    for _, c, _ in todo:
        _fake_cell(tmp_path, c.name, 0.6, 0.6)
    assert rep.run_all(todo, tmp_path, 2) == []
    assert f"{len(todo)} cells, {len(todo)} already complete, 0 to run" in capsys.readouterr().out


def test_a_stop_signal_stops_the_suite_with_its_code_and_says_how_to_continue(
    rep, tmp_path, monkeypatch, capsys
):
    """SIGTERM to the suite's process becomes a stop that reaches its running cells (through
    run_cells' Ctrl-C path) instead of ending the process and leaving them training as
    orphans. The handler this test sets first must not see the signal."""
    import signal

    monkeypatch.setattr(rep, "write_results", lambda *a: tmp_path / "results.md")
    args = ["--only", "quantization", "--quick", "--out", str(tmp_path)]
    code, seen = main_stopped_by_sigterm(monkeypatch, rep, "run_all", lambda: rep.main(args))
    assert (code, seen) == (128 + signal.SIGTERM, [])
    assert "stopped by SIGTERM; the same command continues the suite" in capsys.readouterr().err
