"""The batched engine against the obviously-right PEFT reference, and the special cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from declora.algorithms import make_plan
from declora.data.partition import partition
from declora.engine.batched import BatchedEngine
from declora.engine.reference import ReferenceEngine
from declora.engine.round_loop import LoopHooks, LoopParts, LoopSettings, train
from declora.model.adapters import build_spec, initial_state
from declora.network.topology import build_topology
from declora.tasks.evaluate import Evaluator
from declora.tasks.metrics import classification_metrics
from tests.conftest import synthetic_examples, tiny_bert

N_PEERS = 4


def _run(
    engine_cls,
    tokenizer,
    task,
    algorithm: str,
    *,
    rounds=3,
    local_steps=2,
    kind="ring",
    chunk=None,
    seed=0,
    optimizer="adamw",
    weighting="uniform",
):
    model = tiny_bert()
    spec = build_spec(model, ["query", "value"], r=4, alpha=8, dropout=0.0, train_head=True)
    init = initial_state(model, spec, seed=seed)
    examples = synthetic_examples(tokenizer, 120)
    labels = np.array([e["label"] for e in examples])
    parts = partition(labels, N_PEERS, "dirichlet", seed=seed, alpha=1.0, min_size=4)
    topo = build_topology(kind, N_PEERS, "laplacian")
    plan = make_plan(algorithm, topo, parts, batch_size=5, weighting=weighting)
    kwargs = dict(
        schedule="linear" if optimizer == "sgd" else "constant",
        total_steps=rounds * local_steps,
        lr=5e-3 if optimizer == "adamw" else 1.0,
        max_grad_norm=1.0,
        optimizer=optimizer,
    )
    if engine_cls is BatchedEngine:
        kwargs["peer_chunk"] = chunk
    engine = engine_cls(model, spec, plan.n, init, task, peer_weights=plan.weights, **kwargs)
    evaluator = Evaluator(examples[:40], 3, batch_size=16)
    res = train(
        LoopParts(
            engine,
            plan,
            evaluator,
        ),
        examples,
        LoopSettings(
            rounds=rounds,
            local_steps=local_steps,
            seed=seed,
            eval_every=rounds,
            eval_peers="final",
            lora_modules=spec.lora_modules,
        ),
        LoopHooks(progress=False),
    )
    return res, engine, spec


@pytest.mark.parametrize(
    ("chunk", "optimizer", "weighting"),
    [(None, "adamw", "uniform"), (3, "adamw", "data-size"), (2, "sgd", "data-size")],
)
def test_batched_matches_reference(tokenizer, task, chunk, optimizer, weighting):
    batched, _, _ = _run(
        BatchedEngine,
        tokenizer,
        task,
        "dec-lora",
        chunk=chunk,
        optimizer=optimizer,
        weighting=weighting,
    )
    ref, _, _ = _run(
        ReferenceEngine, tokenizer, task, "dec-lora", optimizer=optimizer, weighting=weighting
    )
    assert batched.final.keys() == ref.final.keys()
    for k in batched.final:
        torch.testing.assert_close(batched.final[k], ref.final[k], atol=1e-5, rtol=1e-4)
    # B moved away from its zero init, so the comparison is not trivially between zeros
    b_max = [float(batched.final[k].abs().max()) for k in batched.final if k.endswith("lora_B")]
    assert min(b_max) > 1e-6 and max(b_max) > 1e-3
    assert batched.records[-1]["accuracy"] == pytest.approx(ref.records[-1]["accuracy"])
    assert batched.peer_metrics == ref.peer_metrics


def test_identity_mixing_is_independent_training(tokenizer, task):
    """W = I: each peer ends exactly where training it alone on its own data ends."""
    local, _, _ = _run(BatchedEngine, tokenizer, task, "local-only")
    alone = []
    model = tiny_bert()
    spec = build_spec(model, ["query", "value"], r=4, alpha=8, dropout=0.0, train_head=True)
    init = initial_state(model, spec, seed=0)
    examples = synthetic_examples(tokenizer, 120)
    labels = np.array([e["label"] for e in examples])
    parts = partition(labels, N_PEERS, "dirichlet", seed=0, alpha=1.0, min_size=4)
    from declora.data.sampling import PeerSampler

    for i in range(N_PEERS):
        eng = BatchedEngine(
            tiny_bert(), spec, 1, init, task, lr=5e-3, optimizer="adamw", schedule="constant"
        )
        sampler = PeerSampler(parts[i], 5, 0, i)
        for _ in range(3 * 2):
            eng.train_step([[examples[j] for j in sampler.next()]])
        alone.append(eng.stacked())
    for k in local.final:
        together = local.final[k]
        separate = torch.cat([a[k] for a in alone])
        torch.testing.assert_close(together, separate, atol=1e-5, rtol=1e-4)
    assert local.records[-1]["bytes_sent"] == 0


def test_fedavg_mixing_gives_identical_peers(tokenizer, task):
    """W = 11^T/n: after every round all peers hold the plain average (FedAvg)."""
    res, _, _ = _run(BatchedEngine, tokenizer, task, "fedavg")
    for v in res.final.values():
        torch.testing.assert_close(v, v.mean(0, keepdim=True).expand_as(v), atol=1e-6, rtol=0)
    assert res.records[-1]["consensus_distance"] < 1e-6


def test_gossip_step_is_w_times_stacked(tokenizer, task):
    """One round with K local steps, then exactly W @ stacked for every tensor."""
    model = tiny_bert()
    spec = build_spec(model, ["query", "value"], r=4, alpha=8, dropout=0.0, train_head=True)
    init = initial_state(model, spec, seed=0)
    examples = synthetic_examples(tokenizer, 60)
    eng = BatchedEngine(model, spec, N_PEERS, init, task, lr=1e-2)
    groups = [examples[i * 5 : (i + 1) * 5] for i in range(N_PEERS)]
    eng.train_step(groups)
    before = {k: v.clone() for k, v in eng.stacked().items()}
    topo = build_topology("ring", N_PEERS, "laplacian")
    from declora.network.simulated import SimulatedGossip

    eng.load_stacked(SimulatedGossip(topo.mixing).mix(eng.stacked()))
    W = torch.tensor(topo.mixing, dtype=torch.float32)
    for k, v in before.items():
        expect = torch.einsum("ij,j...->i...", W, v)
        torch.testing.assert_close(eng.stacked()[k], expect, atol=1e-6, rtol=1e-5)


def test_per_peer_clipping_matches_torch(tokenizer, task):
    """A peer with huge gradients is clipped on its own; the others are untouched."""
    from declora.engine.batched import clip_per_peer

    p = torch.nn.Parameter(torch.zeros(3, 4, 5))
    q = torch.nn.Parameter(torch.zeros(3, 2))
    p.grad = torch.randn(3, 4, 5)
    q.grad = torch.randn(3, 2)
    p.grad[1] *= 100
    expected = []
    for i in range(3):
        a = torch.nn.Parameter(torch.zeros(4, 5))
        b = torch.nn.Parameter(torch.zeros(2))
        a.grad, b.grad = p.grad[i].clone(), q.grad[i].clone()
        torch.nn.utils.clip_grad_norm_([a, b], 1.0)
        expected.append((a.grad, b.grad))
    clip_per_peer([p, q], 1.0)
    for i in range(3):
        torch.testing.assert_close(p.grad[i], expected[i][0])
        torch.testing.assert_close(q.grad[i], expected[i][1])


def test_micro_batches_accumulate_to_the_full_batch_gradient(tokenizer, task):
    """One peer's big batch split into passes gives the same step as one pass."""
    examples = synthetic_examples(tokenizer, 24)
    finals = []
    for micro in (None, 5):
        model = tiny_bert()
        spec = build_spec(model, ["query", "value"], r=4, alpha=8, dropout=0.0, train_head=True)
        eng = BatchedEngine(
            model, spec, 1, initial_state(model, spec, 0), task, lr=1e-2, micro_batch=micro
        )
        loss = eng.train_step([examples])
        finals.append((loss, eng.stacked()))
    torch.testing.assert_close(finals[0][0], finals[1][0], atol=1e-6, rtol=1e-5)
    for k in finals[0][1]:
        torch.testing.assert_close(finals[0][1][k], finals[1][1][k], atol=1e-6, rtol=1e-5)


def test_linear_schedule_decays_to_zero():
    from declora.model.adapters import make_scheduler

    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=0.4)
    sched = make_scheduler(opt, "linear", total_steps=4)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.4, 0.3, 0.2, 0.1])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0)


def test_data_size_weights_make_the_average_step_the_pooled_step(tokenizer, task):
    """With weights n*N_i/N, the mean over peers of one SGD step equals sum_i (N_i/N) step_i:
    the pooled objective's gradient, not the plain mean of the local gradients."""
    from declora.engine.plan import peer_weights

    parts = [np.arange(10), np.arange(30), np.arange(60), np.arange(100)]
    w = peer_weights(parts, "data-size")
    assert w.sum() == pytest.approx(4.0)
    assert w.tolist() == pytest.approx([4 * 10 / 200, 4 * 30 / 200, 4 * 60 / 200, 4 * 100 / 200])
    assert peer_weights(parts, "uniform").tolist() == [1.0] * 4
    examples = synthetic_examples(tokenizer, 40)
    groups = [examples[i * 5 : (i + 1) * 5] for i in range(4)]
    steps = {}
    for name, weights in (("uniform", None), ("weighted", w)):
        model = tiny_bert()
        spec = build_spec(model, ["query", "value"], r=4, alpha=8, dropout=0.0, train_head=True)
        init = initial_state(model, spec, 0)
        eng = BatchedEngine(
            model,
            spec,
            4,
            init,
            task,
            lr=0.1,
            optimizer="sgd",
            momentum=0.0,
            peer_weights=weights,
        )
        eng.train_step(groups)
        steps[name] = {k: v - init[k] for k, v in eng.stacked().items()}
    for k, plain in steps["uniform"].items():
        scale = torch.tensor(w, dtype=plain.dtype).view(-1, *([1] * (plain.dim() - 1)))
        torch.testing.assert_close(steps["weighted"][k], scale * plain, atol=1e-7, rtol=1e-5)
        pooled = (scale / 4 * plain).sum(0)  # sum_i N_i/N * step_i
        torch.testing.assert_close(steps["weighted"][k].mean(0), pooled, atol=1e-7, rtol=1e-5)


def test_local_only_and_centralized_ignore_peer_weighting():
    topo = build_topology("ring", 3, "laplacian")
    parts = [np.arange(5), np.arange(10), np.arange(45)]
    assert make_plan("local-only", topo, parts, 2, "data-size").weights.tolist() == [1.0] * 3
    assert make_plan("centralized", topo, parts, 2, "data-size").weights.tolist() == [1.0]
    assert make_plan("dec-lora", topo, parts, 2, "data-size").weights.tolist() == pytest.approx(
        [0.25, 0.5, 2.25]
    )


# --------------------------------------------------------------------------- active peers, frozen
# factors (dynamic networks and the follow-up algorithms)

MASKS = [
    [True, False, True, True],  # peer 1 offline: peers 0, 2, 3 share one non-contiguous pass
    None,
    [False, True, True, False],
    [True, True, False, True],
    [False, False, False, False],  # nobody steps; the schedule still advances
    [True, True, True, True],
]


def _engine(engine_cls, task, *, optimizer="sgd", train_head=True, chunk=None, weights=None):
    model = tiny_bert()
    spec = build_spec(model, ["query", "value"], r=4, alpha=8, dropout=0.0, train_head=train_head)
    init = initial_state(model, spec, seed=0)
    kwargs = dict(
        lr=0.5 if optimizer == "sgd" else 5e-3,
        optimizer=optimizer,
        momentum=0.9,
        max_grad_norm=1.0,
        schedule="linear",
        total_steps=12,
    )
    if engine_cls is BatchedEngine:
        kwargs["peer_chunk"] = chunk
    return engine_cls(model, spec, N_PEERS, init, task, peer_weights=weights, **kwargs)


def _peer_batches(tokenizer, step: int) -> list[list[dict]]:
    examples = synthetic_examples(tokenizer, 5 * N_PEERS, seed=100 + step)
    return [examples[i * 5 : (i + 1) * 5] for i in range(N_PEERS)]


def _optimizer_rows(engine: BatchedEngine, peer: int) -> dict[str, torch.Tensor]:
    """Every per-element optimizer state slice of one peer, by parameter and state name."""
    out = {}
    for k, p in engine.params.items():
        for name, t in engine.optimizer.state.get(p, {}).items():
            if torch.is_tensor(t) and t.shape == p.shape:
                out[f"{k}/{name}"] = t[peer].clone()
    return out


@pytest.mark.parametrize(("chunk", "weights"), [(None, None), (3, [0.5, 1.0, 1.5, 1.0])])
def test_active_masks_and_frozen_factors_match_reference(tokenizer, task, chunk, weights):
    """SGD with momentum, per-peer clipping, a schedule, peer weights: peers that sit out
    (and ADF-style phases) give the same adapters as separate per-peer optimizers."""
    batched = _engine(BatchedEngine, task, chunk=chunk, weights=weights)
    ref = _engine(ReferenceEngine, task, weights=weights)
    phases = [{"lora_B"}, {"lora_B"}, {"lora_A"}, {"lora_A", "lora_B"}, {"lora_A"}, {"lora_B"}]
    for step, (mask, phase) in enumerate(zip(MASKS * 2, phases * 2, strict=True)):
        for eng in (batched, ref):
            eng.set_trainable(phase)
        batches = _peer_batches(tokenizer, step)
        lb = batched.train_step(batches, active=mask)
        lr = ref.train_step(batches, active=mask)
        torch.testing.assert_close(lb, lr, atol=1e-5, rtol=1e-4, equal_nan=True)
        if mask is not None:
            assert torch.isnan(lb).tolist() == [not a for a in mask]
    sb, sr = batched.stacked(), ref.stacked()
    for k in sb:
        torch.testing.assert_close(sb[k], sr[k], atol=1e-5, rtol=1e-4)
    b_max = max(float(sb[k].abs().max()) for k in sb if k.endswith("lora_B"))
    assert b_max > 1e-3  # training moved B, so the comparison means something


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_inactive_peer_is_bit_identical(tokenizer, task, optimizer):
    """An inactive peer's parameters and optimizer state slices do not change at all, also
    when the step that creates the optimizer state is one it sits out."""
    eng = _engine(BatchedEngine, task, optimizer=optimizer, chunk=2)
    eng.train_step(_peer_batches(tokenizer, 0), active=[True, False, True, True])
    state = _optimizer_rows(eng, 1)
    assert state and all(float(t.abs().max()) == 0 for t in state.values())  # fresh state
    for step in range(1, 4):
        params = {k: v[2].clone() for k, v in eng.stacked().items()}
        state = _optimizer_rows(eng, 2)
        others = {k: v[0].clone() for k, v in eng.stacked().items()}
        eng.train_step(_peer_batches(tokenizer, step), active=[True, True, False, True])
        after = eng.stacked()
        for k, v in params.items():
            assert torch.equal(after[k][2], v), k
        for k, v in _optimizer_rows(eng, 2).items():
            assert torch.equal(state[k], v), k
        assert any(not torch.equal(after[k][0], v) for k, v in others.items())


def test_reference_inactive_peer_is_untouched(tokenizer, task):
    eng = _engine(ReferenceEngine, task)
    eng.train_step(_peer_batches(tokenizer, 0))
    before = {k: v[3].clone() for k, v in eng.stacked().items()}
    momentum = {id(p): s["momentum_buffer"].clone() for p, s in eng.optimizers[3].state.items()}
    lr_before = eng.optimizers[3].param_groups[0]["lr"]
    losses = eng.train_step(_peer_batches(tokenizer, 1), active=[True, True, True, False])
    assert torch.isnan(losses[3]) and not torch.isnan(losses[:3]).any()
    for k, v in eng.stacked().items():
        assert torch.equal(v[3], before[k]), k
    for p, s in eng.optimizers[3].state.items():
        assert torch.equal(s["momentum_buffer"], momentum[id(p)])
    assert eng.optimizers[3].param_groups[0]["lr"] < lr_before  # the schedule advanced


@pytest.mark.parametrize("engine_cls", [BatchedEngine, ReferenceEngine])
def test_set_trainable_b_only_leaves_a_untouched(tokenizer, task, engine_cls):
    eng = _engine(engine_cls, task, optimizer="adamw")
    eng.set_trainable({"lora_B"})
    before = {k: v.clone() for k, v in eng.stacked().items()}
    for step in range(3):
        eng.train_step(_peer_batches(tokenizer, step))
    after = {k: v.clone() for k, v in eng.stacked().items()}  # stacked() shares storage
    for k, v in before.items():
        if k.endswith("lora_A"):
            assert torch.equal(after[k], v), k
        else:  # B and the head train
            assert not torch.equal(after[k], v), k
    if engine_cls is BatchedEngine:
        a_params = [p for k, p in eng.params.items() if k.endswith("lora_A")]
        assert all(p.grad is None and p not in eng.optimizer.state for p in a_params)
    eng.set_trainable({"lora_A", "lora_B"})
    eng.train_step(_peer_batches(tokenizer, 3))
    assert any(not torch.equal(eng.stacked()[k], v) for k, v in after.items() if "lora_A" in k)


def test_nothing_trainable_is_a_no_op(tokenizer, task):
    eng = _engine(BatchedEngine, task, train_head=False)
    eng.set_trainable(set())
    before = {k: v.clone() for k, v in eng.stacked().items()}
    losses = eng.train_step(_peer_batches(tokenizer, 0))
    assert torch.isfinite(losses).all()
    for k, v in eng.stacked().items():
        assert torch.equal(v, before[k])


def test_bad_masks_and_factors_are_rejected(tokenizer, task):
    eng = _engine(BatchedEngine, task)
    with pytest.raises(ValueError, match="one entry per peer"):
        eng.train_step(_peer_batches(tokenizer, 0), active=[True, False])
    with pytest.raises(ValueError, match="one entry per peer"):
        eng.train_step(_peer_batches(tokenizer, 0), active=[1, 0, 1, 1])
    with pytest.raises(ValueError, match="unknown LoRA factor"):
        eng.set_trainable({"lora_C"})


@pytest.mark.parametrize("engine_class", [BatchedEngine, ReferenceEngine])
def test_peers_holding_the_same_adapters_are_run_once_with_the_same_scores(
    engine_class, tokenizer, task, monkeypatch
):
    """FedAvg's peers hold one model after each average: the peers' evaluation runs the first
    peer only and gives every peer the scores a run of each would. Peers that differ (here in
    one tensor of one peer) are each run."""
    model = tiny_bert()
    spec = build_spec(model, ["query", "value"], r=4, alpha=8, dropout=0.0, train_head=True)
    init = initial_state(model, spec, seed=0)
    examples = synthetic_examples(tokenizer, 60)
    eng = engine_class(model, spec, N_PEERS, init, task, lr=5e-2)
    eng.train_step([examples[i * 5 : (i + 1) * 5] for i in range(N_PEERS)])
    first = {k: v[:1].expand_as(v).clone() for k, v in eng.stacked().items()}
    eng.load_stacked(first)  # every peer: peer 0's trained adapters
    ev = Evaluator(synthetic_examples(tokenizer, 40, seed=5), 3, batch_size=16)
    asked = []
    run_peers = engine_class.outputs_all_peers

    def spy(self, batch, peers=None):
        asked.append(peers)
        return run_peers(self, batch, peers)

    monkeypatch.setattr(engine_class, "outputs_all_peers", spy)
    once = ev.peers(eng)
    assert set(asked) == {1}
    every = [
        classification_metrics(p, ev._labels(ev.peer_idx), 3)
        for p in torch.cat([run_peers(eng, b) for b in ev._batches(ev.peer_idx, 16 // N_PEERS)], 1)
        .argmax(-1)
        .numpy()
    ]
    assert once == every and len(once) == N_PEERS
    lora_a = next(k for k in first if k.endswith("lora_A"))
    eng.load_stacked({lora_a: first[lora_a] + torch.eye(N_PEERS)[:, 2].reshape(-1, 1, 1)})
    asked.clear()
    assert len(ev.peers(eng)) == N_PEERS and set(asked) == {None}
