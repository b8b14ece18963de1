"""The algorithm objects and their registry: what trains, what is sent, what they refuse."""

from __future__ import annotations

import pytest

from declora.algorithms import algorithm_class, label, make_algorithm, names
from declora.algorithms.adf import adf_phase
from declora.config.schema import load_config
from declora.errors import ConfigError

KEYS = {"enc.q.lora_A", "enc.q.lora_B", "head.weight", "head.bias"}


def test_every_algorithm_is_registered_once_with_a_label():
    assert set(names()) >= {
        "dec-lora",
        "fedavg",
        "local-only",
        "centralized",
        "decaf",
        "ffa",
        "adf",
    }
    assert len(set(names())) == len(names())
    for name in names():
        assert algorithm_class(name).name == name
        assert (label(name) and label(name) != name) or name == label(name).lower()


def test_config_accepts_exactly_the_registered_names():
    for name in names():
        assert load_config(None, [f"algorithm.name={name}"]).algorithm.name == name
    with pytest.raises(ConfigError, match=r"algorithm\.name.*'decafe' is unknown.*'decaf'"):
        load_config(None, ["algorithm.name=decafe"])
    with pytest.raises(ConfigError, match=r"baselines\.0.*'fedav' is unknown.*'fedavg'"):
        load_config(None, ["baselines=[fedav]"])


def test_trainable_factors():
    cfg = load_config(None, ["algorithm.period=2"])
    both = {"lora_A", "lora_B"}
    for name in ("dec-lora", "decaf", "fedavg", "local-only", "centralized"):
        assert make_algorithm(name, cfg).trainable(1) == both
    assert make_algorithm("ffa", cfg).trainable(7) == {"lora_B"}
    adf = make_algorithm("adf", cfg)
    assert [sorted(adf.trainable(t)) for t in (1, 2, 3, 4, 5)] == [
        ["lora_B"],
        ["lora_B"],
        ["lora_A"],
        ["lora_A"],
        ["lora_B"],
    ]


def test_adf_phases_switch_on_schedule():
    assert "".join(adf_phase(t, 3) for t in range(1, 13)) == "BBBAAABBBAAA"
    assert "".join(adf_phase(t, 2, start="A") for t in range(1, 8)) == "AABBAAB"
    assert "".join(adf_phase(t, 1) for t in range(1, 6)) == "BABAB"
    with pytest.raises(ValueError, match="numbered from 1"):
        adf_phase(0, 3)
    with pytest.raises(ValueError, match=r"algorithm\.period"):
        adf_phase(1, 0)


def test_sent_keys():
    cfg = load_config()
    for name in ("dec-lora", "decaf", "adf", "fedavg"):
        assert make_algorithm(name, cfg).sent_keys(KEYS) == KEYS
    assert make_algorithm("ffa", cfg).sent_keys(KEYS) == {
        "enc.q.lora_B",
        "head.weight",
        "head.bias",
    }


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["algorithm.name=decaf", "comm.bits=4"], "algorithm decaf sends exact factors"),
        (["algorithm.name=ffa", "lora.method=ia3"], "algorithm ffa works on LoRA's two factors"),
        (["baselines=[adf]", "lora.method=prompt-tuning"], "algorithm adf works on LoRA's"),
        (
            ["comm.bits=2", "comm.scheme=choco", "topology.dynamic=random-pairs"],
            "comm.scheme=choco needs a fixed graph",
        ),
    ],
)
def test_algorithms_refuse_what_they_cannot_honour(overrides, message):
    """Refused by config validation itself, from each algorithm's capabilities."""
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_baselines_do_not_gossip_and_say_what_they_need():
    assert not algorithm_class("fedavg").gossips and algorithm_class("fedavg").server_average
    assert algorithm_class("centralized").single_process
    assert algorithm_class("local-only").single_process
    assert algorithm_class("dec-lora").gossips and not algorithm_class("dec-lora").single_process
    assert make_algorithm("fedavg", load_config(None, ["comm.gossip_steps=3"])).gossip_steps() == 1
    assert (
        make_algorithm("dec-lora", load_config(None, ["comm.gossip_steps=3"])).gossip_steps() == 3
    )


def test_cli_lists_every_registered_algorithm():
    from typer.testing import CliRunner

    from declora.cli import app

    res = CliRunner().invoke(app, ["algorithms"])
    assert res.exit_code == 0, res.output
    for name in names():
        assert f"\n{name} " in "\n" + res.output
        assert label(name) in res.output
    assert "no network: `declora run` only" in res.output


def test_stale_optimizer_state_of_adf_and_decaf():
    """ADF clears the momentum of the factor that resumes training; DeCAF clears both factors'
    after every re-factorization; the others keep theirs."""
    cfg = load_config(None, ["algorithm.period=2"])
    adf = make_algorithm("adf", cfg)
    assert [sorted(adf.stale_optimizer_state(t)) for t in range(1, 7)] == [
        [],
        [],
        ["lora_A"],
        [],
        ["lora_B"],
        [],
    ]
    assert not adf.stale_after_mixing
    decaf = make_algorithm("decaf", cfg)
    assert decaf.stale_optimizer_state(1) == {"lora_A", "lora_B"} and decaf.stale_after_mixing
    for name in ("dec-lora", "ffa", "fedsa", "fedavg"):
        assert make_algorithm(name, cfg).stale_optimizer_state(3) == frozenset()


def test_reset_optimizer_state_zeroes_the_chosen_peers_rows(task, tokenizer):
    """After a reset, a peer's next step is a first step; other peers and factors keep theirs."""
    import numpy as np

    from declora.engine.batched import BatchedEngine
    from declora.model.adapters import build_spec, initial_state
    from tests.conftest import synthetic_examples, tiny_bert

    model = tiny_bert()
    spec = build_spec(model, ["query", "value"], r=2, alpha=4, dropout=0.0, train_head=True)
    engine = BatchedEngine(
        model, spec, 3, initial_state(model, spec, seed=0), task, lr=0.1, optimizer="sgd"
    )
    ex = synthetic_examples(tokenizer, 12)
    for _ in range(2):  # B is 0 at LoRA's init, so A's gradient is 0 on the first step
        engine.train_step([ex[0:4], ex[4:8], ex[8:12]])
    engine.reset_optimizer_state(frozenset({"lora_A"}), np.array([True, False, True]))
    for name, p in engine.params.items():
        buf = engine.optimizer.state[p]["momentum_buffer"]
        if name.endswith("lora_A"):
            assert float(buf[0].abs().sum()) == 0 and float(buf[2].abs().sum()) == 0
            assert float(buf[1].abs().sum()) > 0
        else:
            assert float(buf.abs().sum()) > 0
