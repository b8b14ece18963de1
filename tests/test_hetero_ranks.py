"""Peers of different LoRA ranks (`lora.ranks`, issue 17): config, engines, combine rules,
bytes per peer, export, and the CLI end to end on a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from peft import PeftModel
from typer.testing import CliRunner

from declora.algorithms import make_plan
from declora.cli import app
from declora.config.schema import load_config, peer_ranks
from declora.data.partition import partition
from declora.engine.batched import BatchedEngine
from declora.engine.reference import ReferenceEngine
from declora.engine.round_loop import LoopHooks, LoopParts, LoopSettings, train
from declora.errors import ConfigError
from declora.model.adapters import build_spec, initial_state
from declora.network.hetero import HeteroGossip, values_per_peer
from declora.network.mixing import hetero_combine, hetero_mix
from declora.network.topology import build_topology
from declora.tasks.evaluate import Evaluator
from tests.conftest import WORDS, synthetic_examples, tiny_bert
from tests.test_causal_run import chat_file as chat_file  # fixture
from tests.test_causal_run import llama_dir as llama_dir  # fixture

RANKS = (1, 2, 4, 2)
runner = CliRunner()


# --------------------------------------------------------------------------- config


def test_tiers_are_assigned_round_robin():
    cfg = load_config(None, ["lora.ranks=tiers:2,4,8,16"])
    assert peer_ranks(cfg) == (2, 4, 8, 16, 2, 4, 8, 16, 2, 4)
    assert peer_ranks(load_config(None, ["topology.peers=3", "lora.ranks=[3,1,2]"])) == (3, 1, 2)
    assert peer_ranks(load_config(None, [])) is None


@pytest.mark.parametrize(
    ("sets", "expect"),
    [
        (["lora.ranks=[2,4]"], "lora.ranks has 2 ranks but topology.peers=10"),
        (["lora.ranks=[0,2,2,2,2,2,2,2,2,2]"], "lora.ranks: every rank must be an integer >= 1"),
        (["lora.ranks=tiers:2,-1"], "lora.ranks: every rank must be an integer >= 1"),
        (["lora.ranks=tiers:a"], "lora.ranks: tiers must be integers"),
        (["lora.ranks=tiers:2,4", "lora.method=ia3"], "lora.ranks: lora.method=ia3 has no rank"),
        (["lora.ranks=tiers:2,4", "lora.method=prompt-tuning"], "has no rank"),
        (["lora.ranks=tiers:2,4", "lora.method=dora"], "lora.method=dora"),
        (["algorithm.hetero=svd"], "algorithm.hetero=svd needs lora.ranks"),
        (["lora.ranks=tiers:2,4", "algorithm.name=ffa"], "algorithm.name ffa is not supported"),
        (["lora.ranks=tiers:2,4", "comm.bits=4"], "lora.ranks sends exact factors"),
        (
            ["lora.ranks=tiers:2,4", "algorithm.name=decaf", "algorithm.hetero=pad-truncate"],
            "contradicts algorithm.name=decaf",
        ),
    ],
)
def test_bad_ranks_are_one_line_errors(sets, expect):
    with pytest.raises(ConfigError) as err:
        load_config(None, sets)
    lines = str(err.value).splitlines()
    assert len(lines) == 2 and expect in lines[1], str(err.value)


# --------------------------------------------------------------------------- engines


def _run(engine_cls, tokenizer, task, *, ranks=RANKS, rule="pad-truncate", rounds=3, seed=0):
    model = tiny_bert()
    spec = build_spec(
        model, ["query", "value"], r=max(ranks), alpha=8.0, dropout=0.0, train_head=True
    )
    init = initial_state(model, spec, seed=seed)
    examples = synthetic_examples(tokenizer, 120)
    labels = np.array([e["label"] for e in examples])
    parts = partition(labels, len(ranks), "dirichlet", seed=seed, alpha=1.0, min_size=4)
    topo = build_topology("ring", len(ranks), "laplacian")
    plan = make_plan("dec-lora", topo, parts, batch_size=5)
    engine = engine_cls(
        model,
        spec,
        plan.n,
        init,
        task,
        ranks=list(ranks),
        lr=0.5,
        optimizer="sgd",
        momentum=0.9,
        schedule="linear",
        total_steps=rounds * 2,
        max_grad_norm=1.0,
    )
    res = train(
        LoopParts(
            engine,
            plan,
            Evaluator(examples[:40], 3, batch_size=16),
            HeteroGossip(topo.mixing, ranks, rule),
        ),
        examples,
        LoopSettings(
            rounds=rounds,
            local_steps=2,
            seed=seed,
            eval_every=rounds,
            lora_modules=spec.lora_modules,
            ranks=tuple(ranks),
        ),
        LoopHooks(progress=False),
    )
    return res, engine, spec


@pytest.mark.parametrize("rule", ["pad-truncate", "svd"])
def test_batched_with_rank_mask_matches_reference_at_true_ranks(tokenizer, task, rule):
    """All peers held at the largest rank with a mask give the adapters that per-peer PEFT
    adapters of their true ranks give."""
    batched, beng, spec = _run(BatchedEngine, tokenizer, task, rule=rule)
    ref, reng, _ = _run(ReferenceEngine, tokenizer, task, rule=rule)
    # the reference really holds adapters of the true ranks
    for i, r in enumerate(RANKS):
        a = reng.peer_params[i][f"{spec.lora_modules[0]}.lora_A"]
        assert a.shape[0] == r
    for k in batched.final:
        torch.testing.assert_close(batched.final[k], ref.final[k], atol=1e-5, rtol=1e-4)
    b_max = [float(batched.final[k].abs().max()) for k in batched.final if k.endswith("lora_B")]
    assert min(b_max) > 1e-6 and max(b_max) > 1e-3
    assert batched.records[-1]["accuracy"] == pytest.approx(ref.records[-1]["accuracy"])
    # unused rank slots are exactly zero, and so is their optimizer state
    for k, p in beng.params.items():
        if k.endswith(("lora_A", "lora_B")):
            for i, r in enumerate(RANKS):
                unused = p[i, r:] if k.endswith("lora_A") else p[i, :, r:]
                assert unused.numel() == 0 or bool((unused == 0).all())
                buf = beng.optimizer.state[p]["momentum_buffer"]
                unused = buf[i, r:] if k.endswith("lora_A") else buf[i, :, r:]
                assert unused.numel() == 0 or bool((unused == 0).all())
    # each peer's bytes: its own rank's factors (and the head), not the mean
    per_peer = batched.records[-1]["bytes_sent_per_peer"]
    sent = values_per_peer(beng.stacked(), RANKS) * 4 * 2 * 3  # 2 neighbours, 3 rounds
    assert per_peer == pytest.approx(sent.tolist())
    assert len(set(per_peer)) == len(set(RANKS))


def test_equal_ranks_mix_exactly_like_plain_gossip():
    """With every rank equal, pad-truncate is W @ X for every tensor."""
    g = torch.Generator().manual_seed(0)
    W = build_topology("ring", 5, "laplacian").mixing
    vals = {
        "m.lora_A": torch.randn(5, 3, 7, generator=g),
        "m.lora_B": torch.randn(5, 6, 3, generator=g),
        "h.weight": torch.randn(5, 2, 6, generator=g),
    }
    out = hetero_mix(vals, W, [3] * 5, "pad-truncate")
    Wt = torch.tensor(W, dtype=torch.float32)
    for k, v in vals.items():
        torch.testing.assert_close(out[k], torch.einsum("ij,j...->i...", Wt, v))


def _ranked_values(ranks, g):
    R = max(ranks)
    A = torch.randn(len(ranks), R, 9, generator=g)
    B = torch.randn(len(ranks), 8, R, generator=g)
    for i, r in enumerate(ranks):
        A[i, r:], B[i, :, r:] = 0, 0
    return {"m.lora_A": A, "m.lora_B": B, "h.bias": torch.randn(len(ranks), 3, generator=g)}


def test_pad_truncate_averages_each_slot_over_the_peers_that_have_it():
    ranks = [1, 3, 2, 3]
    vals = _ranked_values(ranks, torch.Generator().manual_seed(1))
    W = build_topology("complete", 4, "metropolis").mixing  # 1/4 everywhere
    out = hetero_mix(vals, W, ranks, "pad-truncate")
    A = vals["m.lora_A"]
    # peer 1 (rank 3): slot 0 from all four, slot 1 from peers 1, 2, 3, slot 2 from 1 and 3
    torch.testing.assert_close(out["m.lora_A"][1, 0], A[:, 0].mean(0))
    torch.testing.assert_close(out["m.lora_A"][1, 1], A[1:, 1].mean(0))
    torch.testing.assert_close(out["m.lora_A"][1, 2], A[[1, 3], 2].mean(0))
    # peer 0 (rank 1) keeps only its leading slot
    assert bool((out["m.lora_A"][0, 1:] == 0).all()) and bool(
        (out["m.lora_B"][0, :, 1:] == 0).all()
    )
    torch.testing.assert_close(out["h.bias"][2], vals["h.bias"].mean(0))


def test_svd_refactors_the_mixed_product_at_each_own_rank():
    """svd: B_i A_i is the best rank-r_i approximation of sum_j W_ij B_j A_j."""
    ranks = [1, 3, 2, 3]
    vals = _ranked_values(ranks, torch.Generator().manual_seed(2))
    W = build_topology("ring", 4, "laplacian").mixing
    out = hetero_mix(vals, W, ranks, "svd")
    P = torch.bmm(vals["m.lora_B"].double(), vals["m.lora_A"].double())
    Wt = torch.tensor(W)
    for i, r in enumerate(ranks):
        M = torch.einsum("j,joi->oi", Wt[i], P)
        U, S, Vh = torch.linalg.svd(M)
        best = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
        got = out["m.lora_B"][i].double() @ out["m.lora_A"][i].double()
        torch.testing.assert_close(got, best, atol=1e-4, rtol=1e-4)
        assert bool((out["m.lora_A"][i, r:] == 0).all())


@pytest.mark.parametrize("rule", ["pad-truncate", "svd"])
def test_one_peer_combine_equals_the_simulators_row(rule):
    """What a peer process computes from its neighbours' true-rank factors (zero-padded) is
    its row of the simulation's mixing."""
    ranks = [1, 3, 2, 3, 2]
    vals = _ranked_values(ranks, torch.Generator().manual_seed(3))
    W = build_topology("ring", 5, "laplacian").mixing
    sim = hetero_mix(vals, W, ranks, rule)
    for i in range(5):
        nbrs = [j for j in np.flatnonzero(W[i]) if j != i]
        got = hetero_combine(
            {k: v[i] for k, v in vals.items()},
            {int(j): {k: v[j] for k, v in vals.items()} for j in nbrs},
            {int(j): float(W[i, j]) for j in nbrs},
            {int(j): ranks[j] for j in nbrs},
            ranks[i],
            rule,
            self_weight=float(W[i, i]),
            pad_to=3,
        )
        for k in vals:
            torch.testing.assert_close(got[k], sim[k][i], atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------- CLI end to end


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("tiny-model")
    tiny_bert().save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def csv_file(tmp_path_factory):
    rng = np.random.default_rng(1)
    rows = ["text,label"]
    for i in range(160):
        words = rng.choice(WORDS, size=6)
        label = ["neg", "neu", "pos"][int(sum(len(w) for w in words) % 3)]
        rows.append(f"{' '.join(words)} {i},{label}")
    f = tmp_path_factory.mktemp("data") / "tweets.csv"
    f.write_text("\n".join(rows) + "\n")
    return f


def _args(model_dir, data, out, *extra):
    sets = [
        f"model.name={model_dir}",
        "data.name=file",
        f"data.path={data}",
        "topology.peers=4",
        "train.rounds=2",
        "train.batch_size=4",
        "eval.every=2",
        "data.min_size=4",
        "baselines=[]",
        "lora.ranks=tiers:1,2,4,8",
    ]
    args = ["run", "--quiet", "--out", str(out)]
    for item in [*sets, *extra]:
        args += ["--set", item]
    return args


@pytest.mark.parametrize("rule", ["pad-truncate", "svd"])
def test_run_exports_each_peer_at_its_true_rank(tiny_model_dir, csv_file, tmp_path, rule):
    out = tmp_path / "run"
    res = runner.invoke(app, _args(tiny_model_dir, csv_file, out, f"algorithm.hetero={rule}"))
    assert res.exit_code == 0, res.output
    for i, r in enumerate([1, 2, 4, 8]):
        conf = json.loads((out / "adapters" / f"peer-{i}" / "adapter_config.json").read_text())
        assert conf["r"] == r and conf["lora_alpha"] == pytest.approx(32.0 / 8 * r)
    conf = json.loads((out / "adapters" / "average" / "adapter_config.json").read_text())
    assert conf["r"] == 8
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3)
    peft = PeftModel.from_pretrained(base, out / "adapters" / "peer-1")
    a = [p for n, p in peft.named_parameters() if n.endswith("lora_A.default.weight")]
    assert a and all(p.shape[0] == 2 for p in a)
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    per_peer = rec["bytes_sent_per_peer"]
    assert per_peer[0] < per_peer[1] < per_peer[2] < per_peer[3]
    # the averaged model rebuilt afterwards from the true-rank peer adapters is the one the
    # run evaluated (`declora report --evaluate`, for real peers that never gathered it)
    from declora.runners.posthoc import evaluate_average

    again = evaluate_average(out)["metrics"]
    assert again["accuracy"] == pytest.approx(rec["accuracy"])
    assert again["macro_f1"] == pytest.approx(rec["macro_f1"])


def test_rank_above_layer_width_is_refused_before_any_run_directory(
    tiny_model_dir, csv_file, tmp_path
):
    out = tmp_path / "run"
    res = runner.invoke(app, _args(tiny_model_dir, csv_file, out, "lora.ranks=[2,4,8,64]"))
    assert res.exit_code == 2, res.output
    message = res.stderr[res.stderr.index("error:") :]
    assert "lora.ranks: rank 64 is above the width of layer" in message
    assert len(message.strip().splitlines()) == 1
    assert not out.exists()


def test_export_rank_is_the_truncated_svd_of_the_averaged_product():
    from dataclasses import replace as dc_replace

    from declora.model.adapters import AdapterSpec
    from declora.runners.build import averaged_export

    spec = AdapterSpec(("m",), ("h",), "h", r=6, alpha=24.0, dropout=0.0)
    g = torch.Generator().manual_seed(4)
    values = {
        "m.lora_A": torch.randn(6, 9, generator=g),
        "m.lora_B": torch.randn(8, 6, generator=g),
        "h.weight": torch.randn(3, 8, generator=g),
    }
    cfg = load_config(None, ["export.rank=2"])
    out_spec, out = averaged_export(cfg, spec, values)
    assert out_spec == dc_replace(spec, r=2, alpha=8.0)  # same scale alpha / r = 4
    U, S, Vh = torch.linalg.svd(values["m.lora_B"].double() @ values["m.lora_A"].double())
    best = U[:, :2] @ torch.diag(S[:2]) @ Vh[:2]
    got = out["m.lora_B"].double() @ out["m.lora_A"].double()
    assert out["m.lora_A"].shape == (2, 9) and out["m.lora_B"].shape == (8, 2)
    torch.testing.assert_close(got, best, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out["h.weight"], values["h.weight"])
    assert averaged_export(load_config(None, []), spec, values) == (spec, values)


def test_causal_lm_with_mixed_ranks_and_baselines(llama_dir, chat_file, tmp_path):
    """task=causal-lm on a tiny Llama with mixed ranks, centralized (at the largest rank) and
    local-only alongside."""
    out = tmp_path / "run"
    sets = ["lora.ranks=tiers:1,2,4,8", "algorithm.hetero=svd"]
    causal = [
        "task=causal-lm",
        f"model.name={llama_dir}",
        "data.name=file",
        f"data.path={chat_file}",
        "data.group_column=topic",
        "data.partition=natural",
        "data.max_length=32",
        "topology.peers=4",
        "train.rounds=2",
        "train.batch_size=2",
        "eval.every=2",
        "eval.generate_examples=2",
        "eval.max_new_tokens=4",
        "eval.sample_prompts=[hello]",
        "baselines=[centralized, local-only]",
    ]
    args = ["run", "--quiet", "--out", str(out)]
    for item in [*causal, *sets]:
        args += ["--set", item]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    for i, r in enumerate([1, 2, 4, 8]):
        conf = json.loads((out / "adapters" / f"peer-{i}" / "adapter_config.json").read_text())
        assert conf["r"] == r
    central = out / "baselines" / "centralized" / "adapters" / "average" / "adapter_config.json"
    assert json.loads(central.read_text())["r"] == 8
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    per_peer = rec["bytes_sent_per_peer"]
    assert per_peer == sorted(per_peer) and per_peer[0] < per_peer[-1]
