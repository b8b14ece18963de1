"""Differential privacy per peer (privacy.mechanism=dp-sgd): per-example gradients of the
stacked layers, the DP-SGD step, Poisson sampling, Opacus' accounting, the stop before a peer
exceeds its target, and the bad input refused before any run directory exists."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("opacus")

from opacus.accountants import RDPAccountant

from declora.config.schema import load_config
from declora.data.sampling import PoissonSampler, make_sampler
from declora.engine.batched import BatchedEngine
from declora.engine.privacy import (
    DPSGD,
    RDP_ALPHAS,
    PrivacyBudgetExhausted,
    PrivacyLedger,
    calibrate,
    noise_seed,
)
from declora.errors import ConfigError
from declora.model.adapters import build_spec, initial_state
from tests.conftest import run_cli, run_in_process, synthetic_examples, tiny_bert, write_tiny_job

N = 3


def _engine(task, *, sigma=0.7, clip=0.05, lr=0.5, n=N, seed=0, dtype=torch.float32):
    """A batched DP-SGD engine of n peers whose adapters all differ (B != 0, so both factors
    have gradients), plain SGD so that a step is readable."""
    model = tiny_bert().to(dtype)
    spec = build_spec(model, ["query", "value"], r=4, alpha=8, dropout=0.0, train_head=True)
    init = initial_state(model, spec, seed=seed)
    p = load_config(None, ["privacy.mechanism=dp-sgd", f"privacy.noise_multiplier={sigma}"]).privacy
    p = p.model_copy(update={"max_grad_norm": clip})
    cal = calibrate(p, [40] * n, 4, 10, seed)
    engine = BatchedEngine(
        model,
        spec,
        n,
        init,
        task,
        micro_batch=5,
        privacy=DPSGD(cal, range(n)),
        lr=lr,
        optimizer="sgd",
        momentum=0.0,
        schedule="constant",
        max_grad_norm=None,
    )
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for v in engine.params.values():
            v.add_(0.1 * torch.randn(v.shape, generator=gen, dtype=v.dtype))
    return engine


def _single_example_grads(engine, peer, example):
    """The gradient of one example alone, by the ordinary (non-DP) path of the engine: peer
    `peer`'s slice of the stacked tensors on a batch of one."""
    engine.optimizer.zero_grad(set_to_none=True)
    engine._select(slice(peer, peer + 1))
    try:
        loss = engine.task.peer_losses(engine.model, engine.task.collate([example]), 1)
        loss.sum().backward()
    finally:
        engine._select(slice(None))
    out = {k: p.grad[peer].clone() for k, p in engine.params.items()}
    engine.optimizer.zero_grad(set_to_none=True)
    return out


def test_per_example_grads_equal_single_example_backward(tokenizer, task):
    """Per-example gradients of a mixed pass (3 peers, uneven counts, padded to the longest
    example) equal a loop of single-example backward passes to 1e-6."""
    engine = _engine(task)
    engine.model.train()
    examples = synthetic_examples(tokenizer, 7, seed=3)
    rows = [(0, examples[0]), (2, examples[1]), (2, examples[2]), (1, examples[3])]
    rows += [(0, examples[4]), (2, examples[5]), (1, examples[6])]
    grads, losses = engine.example_grads(rows)
    assert set(grads) == set(engine.params)  # every adapter factor and the head
    for e, (peer, ex) in enumerate(rows):
        want = _single_example_grads(engine, peer, ex)
        for k, g in grads.items():
            assert g[e].abs().max() > 0, k
            torch.testing.assert_close(g[e], want[k], rtol=0, atol=1e-6, msg=k)
    assert losses.shape == (len(rows),)


def _expected_step(engine, before, batches):
    """The DP-SGD step by hand: single-example gradients clipped to C, summed per peer, plus
    the peer's noise from a generator seeded as the engine's, over the expected batch; SGD."""
    dp = engine.privacy
    gens = [torch.Generator().manual_seed(noise_seed(0, i)) for i in range(engine.n)]
    grads = {k: torch.zeros_like(v) for k, v in before.items()}
    for i, rows in enumerate(batches):
        for ex in rows:
            g = _single_example_grads(engine, i, ex)
            norm = torch.sqrt(sum(t.pow(2).sum() for t in g.values()))
            coef = min(1.0, float(dp.max_grad_norm / (norm + 1e-6)))
            for k in grads:
                grads[k][i] += coef * g[k]
    for i in range(engine.n):
        for k in grads:  # the engine draws peer by peer, tensor by tensor
            std = dp.noise_multipliers[i] * dp.max_grad_norm
            grads[k][i] += torch.normal(0.0, std, size=tuple(grads[k][i].shape), generator=gens[i])
    lr = engine.optimizer.param_groups[0]["lr"]
    return {k: before[k] - lr * grads[k] / dp.expected_batch for k in before}


def test_dp_step_updates_every_tensor_the_model_uses(tokenizer, task):
    """Opacus issue 820: with PEFT LoRA layers, DP training looked normal (loss, epsilon) while
    the adapter the model ran never changed or was corrupted. Here: the optimizer holds the
    very tensors the stacked layers compute with, a DP step moves every trainable tensor of
    every peer (B and the head included) to exactly the clipped, noised SGD step computed by
    hand, and the model's outputs change accordingly."""
    engine = _engine(task)
    held = {id(p) for g in engine.optimizer.param_groups for p in g["params"]}
    for layer in engine.layers:
        for p in layer.parameters(recurse=False):
            assert id(p) in held  # no stale copy: what the optimizer steps is what runs
    examples = synthetic_examples(tokenizer, 9, seed=5)
    batches = [examples[0:3], examples[3:4], examples[4:9]]
    probe = examples[:4]
    out_before = engine.outputs_all_peers(probe)
    before = {k: v.detach().clone() for k, v in engine.params.items()}
    want = _expected_step(engine, before, batches)
    engine.train_step(batches)
    for k, p in engine.params.items():
        for i in range(N):
            assert not torch.equal(p[i], before[k][i]), (k, i)
        torch.testing.assert_close(p.detach(), want[k], rtol=0, atol=1e-6, msg=k)
    out_after = engine.outputs_all_peers(probe)
    assert (out_after - out_before).abs().amax(dim=(1, 2)).min() > 1e-4  # every peer moved
    # and after a checkpoint round trip, the same objects keep being stepped
    engine.load_state_dict(engine.state_dict())
    moved = {k: v.detach().clone() for k, v in engine.params.items()}
    engine.train_step(batches)
    assert all(not torch.equal(moved[k], p) for k, p in engine.params.items())


def test_dp_step_leaves_frozen_and_inactive_peers_alone(tokenizer, task):
    """A frozen factor gets no gradient and no noise; a peer that sits a step out keeps its
    values and draws no noise (its generator does not move)."""
    engine = _engine(task)
    engine.set_trainable({"lora_B"})
    examples = synthetic_examples(tokenizer, 6, seed=2)
    before = {k: v.detach().clone() for k, v in engine.params.items()}
    state1 = engine.privacy.generators[1].get_state().clone()
    losses = engine.train_step([examples[:2], [], examples[2:6]], active=[True, False, True])
    assert torch.isnan(losses[1]) and torch.isfinite(losses[[0, 2]]).all()
    for k, p in engine.params.items():
        if k.endswith("lora_A"):
            assert torch.equal(p, before[k])
        assert torch.equal(p[1], before[k][1])
    assert torch.equal(engine.privacy.generators[1].get_state(), state1)


def test_empty_poisson_batch_is_a_noise_only_step(tokenizer, task):
    """An active peer whose Poisson batch is empty still steps (noise only); its loss is NaN."""
    engine = _engine(task)
    before = {k: v.detach().clone() for k, v in engine.params.items()}
    examples = synthetic_examples(tokenizer, 3, seed=4)
    losses = engine.train_step([examples, [], examples[:1]])
    assert torch.isnan(losses[1])
    assert all(not torch.equal(p[1], before[k][1]) for k, p in engine.params.items())


def test_poisson_sampler_rate_and_state():
    idx = np.arange(100, 1100)
    s = PoissonSampler(idx, 0.01, seed=3, peer=2)
    sizes = [len(s.next()) for _ in range(2000)]
    assert abs(np.mean(sizes) - 10) < 0.5 and min(sizes) < 5 < 15 < max(sizes)
    state = s.state_dict()
    a = [s.next() for _ in range(3)]
    s.load_state_dict(state)
    b = [s.next() for _ in range(3)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert set(np.concatenate(a)) <= set(idx)
    m = make_sampler(idx, 10, 3, 2, poisson=True)
    assert isinstance(m, PoissonSampler) and m.sample_rate == pytest.approx(0.01)


def test_calibration_meets_the_target_by_opacus_accounting():
    """The noise calibrated for a target epsilon spends at most that epsilon over the planned
    steps, by Opacus' own RDP accountant (recomputed here), and not much less."""
    p = load_config(None, ["privacy.mechanism=dp-sgd", "privacy.epsilon=3"]).privacy
    sizes = [500, 2000, 2000]
    cal = calibrate(p, sizes, 8, 300, seed=0)
    assert cal.noise_multipliers[1] == cal.noise_multipliers[2]
    assert cal.noise_multipliers[0] > cal.noise_multipliers[1]  # a smaller peer needs more
    for i, n in enumerate(sizes):
        acc = RDPAccountant()
        for _ in range(300):
            acc.step(noise_multiplier=float(cal.noise_multipliers[i]), sample_rate=8 / n)
        eps = acc.get_epsilon(delta=1 / n, alphas=RDP_ALPHAS)
        assert 3 - 0.05 < eps <= 3
    ledger = PrivacyLedger(cal)
    ledger.add(np.array([300, 150, 0]))
    eps = ledger.spent()
    assert 2.9 < eps[0] <= 3 and 0 < eps[1] < eps[0] and eps[2] == 0
    m = ledger.metrics()
    assert m["epsilon"] == round(eps[0], 4) and len(m["epsilon_peers"]) == 3


def test_ledger_stops_before_a_peer_would_exceed_the_target():
    p = load_config(None, ["privacy.mechanism=dp-sgd", "privacy.epsilon=2"]).privacy
    cal = calibrate(p, [300, 1000], 10, 20, seed=0)
    ledger = PrivacyLedger(cal)
    for t in range(1, 21):
        ledger.check(t, np.array([1, 1]))
        ledger.add(np.array([1, 1]))
    assert max(ledger.spent()) <= 2
    extra = 1
    while True:  # a few more steps stay within the target; one of them will not
        try:
            ledger.check(21, np.array([extra, 0]))
        except PrivacyBudgetExhausted as exc:
            assert "peer 0 would spend epsilon" in str(exc) and "privacy.epsilon=2" in str(exc)
            break
        extra += 1
        assert extra < 100
    with pytest.raises(PrivacyBudgetExhausted):
        ledger.check(21, np.array([0, 100]))


# the bisection passes noise multipliers so large that the best RDP order is the largest one
@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
def test_unreachable_target_is_a_config_error():
    sets = ["privacy.mechanism=dp-sgd", "privacy.epsilon=1e-9", "privacy.delta=1e-10"]
    p = load_config(None, sets).privacy
    with pytest.raises(ConfigError, match=r"privacy\.epsilon"):
        calibrate(p, [20], 20, 1000, seed=0)


@pytest.mark.parametrize(
    ("sets", "needle"),
    [
        (["privacy.mechanism=dp-sgd", "privacy.epsilon=0"], "privacy.epsilon"),
        (["privacy.mechanism=dp-sgd", "privacy.epsilon=-1"], "privacy.epsilon"),
        (["privacy.mechanism=dp-sgd", "privacy.epsilon=3", "privacy.delta=1"], "privacy.delta"),
        (["privacy.mechanism=dp-sgd", "privacy.epsilon=3", "privacy.delta=0"], "privacy.delta"),
        (
            ["privacy.mechanism=dp-sgd", "privacy.epsilon=3", "privacy.noise_multiplier=1"],
            "privacy.noise_multiplier and privacy.epsilon",
        ),
        (["privacy.mechanism=dp-sgd"], "privacy.epsilon"),
        (["privacy.epsilon=3"], "privacy.mechanism=dp-sgd"),
        (["privacy.mechanism=dp-sgd", "privacy.epsilon=3", "lora.method=dora"], "lora.method"),
        (["privacy.mechanism=dp-sgd", "privacy.epsilon=3", "train.engine=reference"], "engine"),
        (["privacy.mechanism=dp-sgd", "privacy.epsilon=3", "task=causal-lm"], "task"),
        (["privacy.mechanism=dp", "privacy.epsilon=3"], "privacy.mechanism"),
    ],
)
def test_bad_privacy_settings_are_refused(sets, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(None, sets)


def test_algorithm_without_dp_support_is_refused():
    """The capability flag the config check reads (no registered algorithm lacks it yet)."""
    from declora.algorithms.registry import algorithm_class

    class NoDp(algorithm_class("dec-lora")):  # type: ignore[misc]
        dp_sgd = False

    cfg = load_config(None, ["privacy.mechanism=dp-sgd", "privacy.epsilon=3"])
    with pytest.raises(ConfigError, match=r"not supported with algorithm\.name dec-lora"):
        NoDp(cfg).check(cfg)


def test_cli_refuses_bad_privacy_before_any_run_directory(tmp_path):
    out = tmp_path / "run"
    r = run_cli(
        "run",
        "--set",
        "privacy.mechanism=dp-sgd",
        "--set",
        "privacy.epsilon=3",
        "--set",
        "privacy.noise_multiplier=1",
        "--out",
        str(out),
    )
    assert r.returncode == 2
    assert "privacy.noise_multiplier and privacy.epsilon" in r.stderr + r.stdout
    assert "Traceback" not in r.stderr
    assert not out.exists()


def test_dp_run_records_epsilon_each_eval_within_the_target(tmp_path, tokenizer):
    """A whole DP run from the CLI: every evaluated round of Dec-LoRA and of the centralized
    baseline records every peer's spent epsilon, which grows and ends within the target; the
    report states the guarantee."""
    model, data = write_tiny_job(tmp_path, tokenizer, rows=240)
    out = tmp_path / "run"
    r = run_in_process(
        "run",
        "--set",
        f"model.name={model}",
        "--set",
        "data.name=file",
        "--set",
        f"data.path={data}",
        "--set",
        "topology.peers=4",
        "--set",
        "train.rounds=6",
        "--set",
        "eval.every=2",
        "--set",
        "eval.max_examples=20",
        "--set",
        "baselines=[centralized]",
        "--set",
        "privacy.mechanism=dp-sgd",
        "--set",
        "privacy.epsilon=2",
        "--out",
        str(out),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    for where, peers in ((out, 4), (out / "baselines" / "centralized", 1)):
        mine = [json.loads(x) for x in (where / "metrics.jsonl").read_text().splitlines()]
        eps = [x["epsilon"] for x in mine]
        assert len(eps) == 3 and eps == sorted(eps) and 0 < eps[-1] <= 2
        assert all(len(x["epsilon_peers"]) == peers for x in mine)
    report = (out / "report.md").read_text()
    assert "## Privacy" in report and "target epsilon 2" in report


@pytest.mark.slow  # 4 processes under declora launch, ~45 s: make test-slow
def test_real_peers_train_with_dp_equal_to_the_simulation(tmp_path, tokenizer):
    """Per-peer DP-SGD needs nothing from the network: 4 peer processes (`declora launch`)
    with offline peers and stragglers end with the simulation's adapters (same Poisson
    batches, same noise per peer) and record the same spent epsilon every evaluated round."""
    import yaml

    from tests.test_distributed_algorithms import assert_same_adapters, simulate_and_launch

    write_tiny_job(tmp_path, tokenizer, seed=3)
    cfg = {
        "model": {"name": str(tmp_path / "model"), "dropout": 0.0},
        "data": {"name": "file", "path": str(tmp_path / "data.csv"), "max_length": 16},
        "topology": {"peers": 4, "kind": "ring", "offline_prob": 0.25},
        "train": {"rounds": 4, "local_steps": 2, "batch_size": 4, "straggler_prob": 0.5},
        "eval": {"every": 2, "max_examples": 20, "final_max_examples": 20},
        "privacy": {"mechanism": "dp-sgd", "epsilon": 2.0, "noise": "seeded"},
        "baselines": [],
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg))
    sim, dist = simulate_and_launch(tmp_path, tmp_path / "cmp", [])
    assert_same_adapters(sim, dist)
    ms = [json.loads(x) for x in (sim / "metrics.jsonl").read_text().splitlines()]
    md = [json.loads(x) for x in (dist / "metrics.jsonl").read_text().splitlines()]
    assert [r["epsilon_peers"] for r in ms] == [r["epsilon_peers"] for r in md]
    assert ms[-1]["epsilon"] <= 2.0 and len(ms) == 2


def test_secure_noise_cannot_be_recomputed_from_the_config():
    """Seeded noise is a function of (seed, peer), which every peer of a launch knows; secure
    noise (the default on real peers) comes from the OS's entropy and differs every time."""
    p = load_config(None, ["privacy.mechanism=dp-sgd", "privacy.noise_multiplier=1"]).privacy
    cal = calibrate(p, [100, 100], 4, 10, seed=0)
    draw = lambda dp: dp.noise(1, torch.Size([64]), torch.zeros(1))  # noqa: E731
    assert torch.equal(draw(DPSGD(cal, [0, 1])), draw(DPSGD(cal, [0, 1])))
    a, b = draw(DPSGD(cal, [0, 1], secure=True)), draw(DPSGD(cal, [0, 1], secure=True))
    assert not torch.equal(a, b) and not torch.equal(a, draw(DPSGD(cal, [0, 1])))


@pytest.mark.slow  # two CLI runs, ~35 s: make test-slow
def test_a_killed_dp_run_resumes_to_the_same_adapters_and_epsilon(tmp_path, tokenizer):
    """A DP run killed after round 3 (SIGKILL) and resumed ends bit-identical to one that was
    never stopped: Poisson samplers, noise generators and the spent epsilon all continue."""
    model, data = write_tiny_job(tmp_path, tokenizer, rows=120, seed=3)
    sets = [
        f"model.name={model}",
        "model.dropout=0",
        "data.name=file",
        f"data.path={data}",
        "topology.peers=3",
        "train.rounds=4",
        "train.checkpoint_every=2",
        "eval.every=2",
        "eval.max_examples=10",
        "baselines=[]",
        "privacy.mechanism=dp-sgd",
        "privacy.epsilon=4",
    ]
    args = [a for s in sets for a in ("--set", s)]
    env = {"OMP_NUM_THREADS": "1"}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert (
        run_cli("run", "--quiet", *args, "--out", str(straight), env=env, timeout=900).returncode
        == 0
    )
    r = run_cli(
        "run",
        "--quiet",
        *args,
        "--out",
        str(killed),
        env={**env, "DECLORA_KILL_AT": "3"},
        timeout=900,
    )
    assert r.returncode != 0
    r = run_cli("run", "--quiet", "--resume", str(killed), env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    from tests.conftest import run_adapters

    a, b = run_adapters(straight), run_adapters(killed)
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a)
    ms = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    mk = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["epsilon_peers"] for r in ms] == [r["epsilon_peers"] for r in mk]


def test_missing_opacus_is_a_clear_config_error(monkeypatch):
    import sys

    from declora.engine.privacy import require_opacus

    monkeypatch.setitem(sys.modules, "opacus", None)  # as if the extra were not installed
    with pytest.raises(ConfigError, match=r"pip install 'declora\[privacy\]'"):
        require_opacus()


# and quietly: Opacus' RDP warning from sizing the PRV's domain is not about its bound
@pytest.mark.filterwarnings("error::UserWarning")
def test_prv_accountant_calibrates_and_accounts_within_the_target():
    sets = ["privacy.mechanism=dp-sgd", "privacy.epsilon=3", "privacy.accountant=prv"]
    cal = calibrate(load_config(None, sets).privacy, [1000], 8, 100, seed=0)
    ledger = PrivacyLedger(cal)
    ledger.add(np.array([100]))
    assert 2.9 < ledger.spent()[0] <= 3
