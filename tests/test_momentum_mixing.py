"""comm.mix_momentum: each peer's SGD momentum buffers are gossiped with the tensors they
belong to (issue 15's momentum confound: an unmixed buffer keeps pushing a peer towards its own
data after every mix). What is mixed, the two engines agreeing, bytes, exact resume and what is
refused; real peers equal to the simulation are in test_distributed (the "q4-momentum-final"
run)."""

from __future__ import annotations

import pytest
import torch

from declora.engine.batched import BatchedEngine
from declora.engine.reference import ReferenceEngine
from tests.conftest import (
    assert_refused,
    run_adapters,
    run_cli,
    run_job,
    run_metrics,
    train_tiny_ring,
    write_ring_job,
)


def _train(engine_cls, tokenizer, task, *, mix: bool, rounds: int):
    return train_tiny_ring(
        tokenizer,
        task,
        engine_cls,
        rounds=rounds,
        eval_every=rounds,
        eval_peers="never",
        mix_momentum=mix,
    )


def test_a_round_mixes_the_buffers_with_w_and_the_factors_as_without(tokenizer, task):
    plain, e_plain, plan = _train(BatchedEngine, tokenizer, task, mix=False, rounds=1)
    mixed, e_mixed, _ = _train(BatchedEngine, tokenizer, task, mix=True, rounds=1)
    for k in plain.final:  # the buffers go with the factors; the factors mix as before
        assert torch.equal(plain.final[k], mixed.final[k])
    W = torch.tensor(plan.mixing, dtype=torch.float32)
    before, after = e_plain.momentum(plain.final), e_mixed.momentum(mixed.final)
    assert before.keys() == after.keys() == plain.final.keys()
    for k in before:
        assert float(before[k].abs().max()) > 0  # every tensor, the head too, has momentum
        expected = torch.einsum("ij,j...->i...", W, before[k])
        torch.testing.assert_close(
            after[k], expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max())
        )
        scale = float(before[k].abs().max())  # some are tiny (lora_A while B is near 0)
        assert float((after[k] - before[k]).abs().max()) > 1e-3 * scale


def test_both_engines_mix_the_buffers_alike_and_it_changes_the_run(tokenizer, task):
    batched, _, _ = _train(BatchedEngine, tokenizer, task, mix=True, rounds=3)
    reference, _, _ = _train(ReferenceEngine, tokenizer, task, mix=True, rounds=3)
    plain, _, _ = _train(BatchedEngine, tokenizer, task, mix=False, rounds=3)
    for k in batched.final:
        torch.testing.assert_close(batched.final[k], reference.final[k], atol=1e-5, rtol=1e-4)
    moved = [float((batched.final[k] - plain.final[k]).abs().max()) for k in batched.final]
    assert max(moved) > 1e-4  # from round 2 on, the mixed momentum steps elsewhere
    # every sent tensor has a buffer of its size: twice the bytes
    sent = batched.records[-1]["bytes_sent"]
    assert sent > 0 and sent == 2 * plain.records[-1]["bytes_sent"]


@pytest.fixture(scope="module")
def job(tmp_path_factory, tokenizer):
    return write_ring_job(tmp_path_factory.mktemp("momentumjob"), tokenizer, seed=5)


@pytest.mark.slow  # three CLI runs, ~45 s: make test-slow
def test_a_killed_run_resumes_exactly(job, tmp_path):
    mixed, killed = tmp_path / "mixed", tmp_path / "killed"
    res = run_job(job, mixed, "comm.mix_momentum=true")
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_job(job, killed, "comm.mix_momentum=true", env={"DECLORA_KILL_AT": "3"})
    assert res.returncode == -9
    res = run_cli("run", "--quiet", "--resume", str(killed))
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = run_adapters(mixed), run_adapters(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert run_metrics(killed) == run_metrics(mixed)


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["train.optimizer=adamw"], "train.optimizer=adamw has none"),
        (["train.momentum=0"], "train.momentum=0 has none"),
        (["comm.overlap=true"], "not supported with comm.overlap"),
        (["lora.ranks=tiers:2,4"], "not supported with lora.ranks"),
        (["algorithm.name=decaf"], "mixes by product-svd"),
    ],
)
def test_what_momentum_mixing_cannot_do_is_refused_before_any_run_directory(
    job, tmp_path, sets, message
):
    assert_refused(job, tmp_path, [*sets, "comm.mix_momentum=true"], "comm.mix_momentum", message)
