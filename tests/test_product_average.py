"""The peers' weight average as one adapter (`product_average`) and the benchmark that scores it
against the averaged factors on finished runs (benchmarks/product_average.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from declora.model.adapters import average, product_average
from tests.conftest import run_in_process, write_ring_job

ROOT = Path(__file__).resolve().parents[1]


def _stacked(n=4, r=3, inp=5, out=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "enc.q.lora_A": torch.randn(n, r, inp, generator=g),
        "enc.q.lora_B": torch.randn(n, out, r, generator=g),
        "head.weight": torch.randn(n, 3, out, generator=g),
    }


def test_the_weight_average_is_the_mean_of_the_peers_updates_at_rank_n_r():
    v = _stacked()
    p = product_average(v)
    assert p["enc.q.lora_A"].shape == (12, 5) and p["enc.q.lora_B"].shape == (6, 12)
    want = torch.stack(
        [b @ a for a, b in zip(v["enc.q.lora_A"], v["enc.q.lora_B"], strict=True)]
    ).mean(0)
    torch.testing.assert_close(p["enc.q.lora_B"] @ p["enc.q.lora_A"], want)
    torch.testing.assert_close(p["head.weight"], v["head.weight"].mean(0))
    # the averaged factors miss the factors' covariance across peers: another update
    a = average(v)
    assert not torch.allclose(a["enc.q.lora_B"] @ a["enc.q.lora_A"], want, atol=1e-3)


def test_peers_in_agreement_give_the_averaged_factors_update():
    one = _stacked(n=1)
    same = {k: t.expand(4, *t.shape[1:]).clone() for k, t in one.items()}
    p, a = product_average(same), average(same)
    torch.testing.assert_close(
        p["enc.q.lora_B"] @ p["enc.q.lora_A"], a["enc.q.lora_B"] @ a["enc.q.lora_A"]
    )


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("pa", ROOT / "benchmarks" / "product_average.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer):
    """A Dec-LoRA and a FedAvg run of the tiny ring job, with a validation split (as the plateau
    study's runs), scored on all of test at the end."""
    job = write_ring_job(tmp_path_factory.mktemp("productjob"), tokenizer, seed=5, rounds=4)
    out = {}
    for algo in ("dec-lora", "fedavg"):
        folder = tmp_path_factory.mktemp("productruns") / algo
        res = run_in_process(
            "run", "--quiet", "--config", str(job / "job.yaml"), "--out", str(folder),
            "--set", f"algorithm.name={algo}", "--set", "data.val_size=0.2",
            "--set", "eval.final_max_examples=null", "--set", "train.lr=0.5", threads=1,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        out[algo] = folder
    return out


def test_the_benchmark_scores_the_runs_own_model_and_the_weight_average(bench, runs, tmp_path):
    rows_path = tmp_path / "rows.jsonl"
    assert bench.main([*map(str, runs.values()), "--rows", str(rows_path)]) == 0
    rows = {r["algorithm"]: r for r in map(json.loads, rows_path.read_text().splitlines())}
    for algo, r in rows.items():
        # the averaged factors on all of test are the model the run itself scored at the end
        assert r["averaged_factors_test_accuracy"] == pytest.approx(r["run_test_accuracy"])
        assert 0.0 <= r["weight_average_test_accuracy"] <= 1.0
        assert r["test_examples"] == r["run_test_examples"], algo
    # FedAvg's peers hold the exact average after its last round: both models are one model
    fed = rows["fedavg"]
    assert fed["consensus_distance"] == pytest.approx(0.0, abs=1e-6)
    assert fed["mean_abs_logit_difference"] < 1e-5 and fed["prediction_agreement"] == 1.0
    assert rows["dec-lora"]["consensus_distance"] > 0
    # resumable: a run with a row is not scored again
    assert bench.main([str(runs["fedavg"]), "--rows", str(rows_path)]) == 0
    assert len(rows_path.read_text().splitlines()) == 2
    lines = bench.table(list(rows.values())).splitlines()
    assert len(lines) == 4 and "weight average" in lines[0]


def test_the_benchmark_refuses_what_is_not_a_finished_run(bench, tmp_path, capsys):
    assert bench.main([str(tmp_path), "--rows", str(tmp_path / "rows.jsonl")]) == 2
    assert "is not a finished run directory" in capsys.readouterr().err


def _with_factors(run: Path, out: Path, same: bool) -> Path:
    """A copy of `run` whose peers' LoRA factors are large random ones (the tiny runs' B stays
    near 0, where the covariance term vanishes): one draw for all peers, or one per peer."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(run, out)
    for i, f in enumerate(sorted(out.glob("adapters/peer-*/adapter_model.safetensors"))):
        g = torch.Generator().manual_seed(0 if same else i)
        t = load_file(str(f))
        for k, v in t.items():
            if ".lora_A." in k or ".lora_B." in k:
                t[k] = torch.randn(v.shape, generator=g, dtype=v.dtype) * 0.3
        save_file(t, str(f))
    return out


def test_the_wide_adapter_is_the_model_of_the_peers_mean_update(bench, runs, tmp_path):
    """With equal peers the rank-n*r adapter must give the averaged factors' logits, also where
    the factors move the logits a lot; with peers apart the two models differ."""
    same = bench.score(_with_factors(runs["dec-lora"], tmp_path / "same", same=True))
    apart = bench.score(_with_factors(runs["dec-lora"], tmp_path / "apart", same=False))
    assert same["consensus_distance"] == pytest.approx(0.0, abs=1e-6)
    assert apart["consensus_distance"] > 1.0
    # measured: 7e-9 against 5e-3 (the tiny model's pooled logits move little)
    assert same["mean_abs_logit_difference"] < 1e-6
    assert apart["mean_abs_logit_difference"] > 1e-3


def test_plateau_runs_are_the_main_tables_dec_lora_seeds_held_here(bench, tmp_path):
    keys = ("stage", "arm", "lr", "seed", "cell")
    rows = [
        {**dict(zip(keys, values, strict=True)), "task": "t", "partition": "iid"}
        for values in (
            ("tune", "dec-lora-ring", "0.05", 0, "tune-0.05"),
            ("tune", "dec-lora-ring", "0.1", 0, "tune-0.1"),
            ("main", "dec-lora-ring", "0.05", 1, "main-1"),
            ("main", "dec-lora-ring", "0.05", 2, "main-2-elsewhere"),
            ("main", "fedavg", "0.05", 1, "fedavg-1"),
            ("ablation", "dec-lora", "0.05", 0, "ablation-0"),
        )
    ]
    path = tmp_path / "runs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for r in rows:
        if r["cell"] != "main-2-elsewhere":  # its folder is on another machine
            (tmp_path / "t" / "cells" / r["cell"] / "adapters" / "peer-0").mkdir(parents=True)
    got = bench.plateau_runs(path, tmp_path)
    assert [f.name for f in got] == ["tune-0.05", "main-1"]
