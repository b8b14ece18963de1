"""Other PEFT methods decentralized through the reference engine: DoRA, rsLoRA, IA3, prompt
tuning (and LoRA itself as the control). Every trainable tensor is gossiped exactly, all peers
start from one seeded adapter, the averaged adapter exports in PEFT's format and reloads with
identical logits, and DoRA / rsLoRA follow PEFT's arithmetic."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForSequenceClassification
from typer.testing import CliRunner

from declora.algorithms import make_plan
from declora.cli import app
from declora.data.partition import partition
from declora.engine.reference import ReferenceEngine, peer_name
from declora.engine.round_loop import LoopHooks, LoopParts, LoopSettings, train
from declora.errors import ConfigError
from declora.model.adapters import IA3_VECTOR, MAGNITUDE, PROMPT, average, build_spec, initial_state
from declora.model.export import save_peft_adapter
from declora.network.simulated import consensus_distance
from declora.network.topology import build_topology
from declora.tasks.evaluate import Evaluator
from declora.tasks.task import CausalLMTask
from tests.conftest import WORDS, synthetic_examples, tiny_bert

METHODS = ["lora", "dora", "rslora", "ia3", "prompt-tuning"]
N = 3
runner = CliRunner()


def _spec(model, method: str, train_head: bool = True):
    if method == "ia3":
        targets = ["query", "value", "output.dense"]
        return build_spec(
            model, targets, 4, 8, 0.0, train_head, method="ia3", feedforward=["output.dense"]
        )
    return build_spec(
        model, ["query", "value"], 4, 8, 0.0, train_head, method=method, virtual_tokens=4
    )


def _engine(method: str, task, model=None, n: int = N, **kw):
    model = model if model is not None else tiny_bert()
    spec = _spec(model, method, kw.pop("train_head", True))
    init = initial_state(model, spec, seed=0)
    kw = {"optimizer": "adamw", "schedule": "constant", **kw}  # small steps that all move
    return ReferenceEngine(model, spec, n, init, task, lr=2e-2, **kw), spec, init


def _logits(model, task, examples):
    batch = task.collate(examples)
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


# --------------------------------------------------------------------------- the engine


@pytest.mark.parametrize("method", METHODS)
def test_every_trainable_tensor_is_tracked_starts_equal_and_trains(method, tokenizer, task):
    eng, _, init = _engine(method, task)
    leaves = {k.rpartition(".")[2] for k in init}
    expected = {
        "lora": {"lora_A", "lora_B"},
        "rslora": {"lora_A", "lora_B"},
        "dora": {"lora_A", "lora_B", MAGNITUDE},
        "ia3": {IA3_VECTOR},
        "prompt-tuning": {PROMPT},
    }[method]
    assert expected | {"weight", "bias"} == leaves  # the head trains too
    values = eng.stacked()
    for k, v in values.items():  # one common seeded init for every peer
        for i in range(N):
            torch.testing.assert_close(v[i], init[k], atol=0, rtol=0)
    # what stacked() holds is all that PEFT trains for each peer (nothing is left unmixed)
    named = dict(eng.model.named_parameters())
    for i in range(N):
        own = [p for n, p in named.items() if peer_name(i) in n.split(".")]
        assert sum(p.numel() for p in own) == sum(int(v[i].numel()) for v in values.values())
    examples = synthetic_examples(tokenizer, 60)
    for step in range(3):
        eng.train_step([examples[i * 20 + step * 5 : i * 20 + step * 5 + 5] for i in range(N)])
    after = eng.stacked()
    for k in after:
        assert not torch.equal(after[k], values[k]), f"{k} did not train"
        assert not torch.equal(after[k][0], after[k][1]), f"{k}: peers did not diverge"


@pytest.mark.parametrize("method", ["lora", "dora", "rslora", "ia3"])
def test_identity_init_leaves_the_base_model_unchanged(method, tokenizer, task):
    """B = 0 (DoRA's magnitude = the frozen rows' norms) and IA3 vectors = 1: every peer's model
    starts as the base model, as PEFT's own init does."""
    model = tiny_bert()
    examples = synthetic_examples(tokenizer, 12)
    base = _logits(model, task, examples)
    eng, _, _ = _engine(method, task, model=model)
    out = eng.outputs_all_peers(examples)
    for i in range(N):
        torch.testing.assert_close(out[i], base, atol=1e-5, rtol=1e-5)


def test_dora_magnitude_init_is_peft_s():
    model = tiny_bert()
    spec = _spec(model, "dora")
    init = initial_state(model, spec, seed=0)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=list(spec.lora_modules), use_dora=True)
    peft_model = get_peft_model(tiny_bert(), cfg)
    for name in spec.lora_modules:
        got = dict(peft_model.named_parameters())[
            f"base_model.model.{name}.{MAGNITUDE}.default.weight"
        ]
        torch.testing.assert_close(init[f"{name}.{MAGNITUDE}"], got.detach())


@pytest.mark.parametrize("method", METHODS)
def test_one_round_of_gossip_is_w_times_stacked(method, tokenizer, task):
    """Through the round loop: a Dec-LoRA round ends at exactly W @ (what local-only training
    reaches after the same local steps), for every trainable tensor of the method."""
    examples = synthetic_examples(tokenizer, 90)
    labels = np.array([e["label"] for e in examples])
    parts = partition(labels, N, "iid", seed=0)
    topo = build_topology("ring", N, "laplacian")
    evaluator = Evaluator(examples[:12], 3, batch_size=12)
    finals = {}
    for algorithm in ("local-only", "dec-lora"):
        eng, spec, _ = _engine(method, task)
        plan = make_plan(algorithm, topo, parts, batch_size=4)
        finals[algorithm] = train(
            LoopParts(
                eng,
                plan,
                evaluator,
            ),
            examples,
            LoopSettings(
                rounds=1,
                local_steps=2,
                seed=0,
                eval_every=1,
                eval_peers="never",
                lora_modules=spec.lora_modules,
            ),
            LoopHooks(progress=False),
        )
    before, after = finals["local-only"].final, finals["dec-lora"].final
    W = torch.tensor(topo.mixing, dtype=torch.float32)
    assert before.keys() == after.keys()
    for k, v in before.items():
        torch.testing.assert_close(after[k], torch.einsum("ij,j...->i...", W, v), atol=1e-6, rtol=0)
    assert finals["dec-lora"].records[-1]["consensus_distance"] > 0


@pytest.mark.parametrize("method", METHODS)
def test_exported_adapters_reload_in_peft_with_identical_logits(method, tokenizer, task, tmp_path):
    base_dir = tmp_path / "base"
    tiny_bert().save_pretrained(base_dir)
    model = AutoModelForSequenceClassification.from_pretrained(base_dir)
    eng, spec, _ = _engine(method, task, model=model)
    examples = synthetic_examples(tokenizer, 30)
    for _ in range(3):
        eng.train_step([examples[i * 10 : i * 10 + 10] for i in range(N)])
    values = eng.stacked()
    avg = average(values)
    want_avg = eng.outputs_single(avg, examples)
    want_peer = eng.outputs_all_peers(examples)[1]
    restored = eng.remove()  # the base model comes back as it was loaded
    torch.testing.assert_close(
        _logits(restored.eval(), task, examples),
        _logits(AutoModelForSequenceClassification.from_pretrained(base_dir), task, examples),
    )
    peer1 = {k: v[1] for k, v in values.items()}
    peft_type = {"ia3": "IA3", "prompt-tuning": "PROMPT_TUNING"}.get(method, "LORA")
    for name, vals, want in [("average", avg, want_avg), ("peer-1", peer1, want_peer)]:
        out = save_peft_adapter(tmp_path / name, spec, vals, str(base_dir))
        cfg = json.loads((out / "adapter_config.json").read_text())
        assert cfg["peft_type"] == peft_type
        assert cfg.get("use_dora", False) == (method == "dora")
        assert cfg.get("use_rslora", False) == (method == "rslora")
        fresh = AutoModelForSequenceClassification.from_pretrained(base_dir)
        loaded = PeftModel.from_pretrained(fresh, out).eval()
        got = _logits(loaded, task, examples)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(want_avg, _logits(restored, task, examples), atol=1e-4)


@pytest.mark.parametrize("method", ["dora", "prompt-tuning"])
def test_engine_state_restores_exactly(method, tokenizer, task):
    """What a checkpoint holds (values, optimizer moments, schedules) continues bit for bit."""

    examples = synthetic_examples(tokenizer, 60)

    def step(eng, s):
        eng.train_step([examples[i * 20 + s * 5 : i * 20 + s * 5 + 5] for i in range(N)])

    a, _, _ = _engine(method, task, optimizer="adamw")
    for s in range(2):
        step(a, s)
    saved = copy.deepcopy(a.state_dict())  # as on disk: no tensor shared with `a`
    b, _, _ = _engine(method, task, optimizer="adamw")
    b.load_state_dict(saved)
    step(a, 2)
    step(b, 2)
    for k, v in a.stacked().items():
        torch.testing.assert_close(b.stacked()[k], v, atol=0, rtol=0)


@pytest.mark.parametrize("method", ["dora", "ia3"])
def test_causal_lm_methods_train_and_reload(method, tmp_path):
    """On a Llama (causal LM, no head): the method trains and its export reloads in PEFT with
    the same per-example answer NLL."""
    from tests.test_causal import ToyTokenizer, chat_examples, tiny_llama

    task = CausalLMTask(ToyTokenizer())
    model = tiny_llama()
    kw = {"feedforward": ["down_proj"]} if method == "ia3" else {}
    targets = ["q_proj", "v_proj", "down_proj"] if method == "ia3" else ["q_proj", "v_proj"]
    spec = build_spec(model, targets, 4, 8, 0.0, False, method=method, **kw)
    init = initial_state(model, spec, seed=0)
    eng = ReferenceEngine(model, spec, N, init, task, lr=5e-2)
    examples = chat_examples(24)
    for step in range(3):
        eng.train_step([examples[i * 8 + step * 2 : i * 8 + step * 2 + 2] for i in range(N)])
    avg = average(eng.stacked())
    assert all(not torch.equal(avg[k], init[k]) for k in init)
    want = eng.outputs_single(avg, examples[:6])
    eng.remove()
    out = save_peft_adapter(tmp_path / "avg", spec, avg, "tiny-llama", "CAUSAL_LM")
    peft = PeftModel.from_pretrained(tiny_llama(), out).eval()
    got = task.outputs(peft, task.collate(examples[:6]))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- PEFT's arithmetic


def _layer_values(spec, eng, rng_seed=1):
    """Averaged values with a nonzero B, so the adapter really changes the layer."""
    gen = torch.Generator().manual_seed(rng_seed)
    vals = {k: v[0].clone() for k, v in eng.stacked().items()}
    for k in vals:
        if k.endswith("lora_B"):
            vals[k] = torch.randn(vals[k].shape, generator=gen) * 0.5
        if k.endswith(MAGNITUDE):
            vals[k] = vals[k] * (1 + 0.1 * torch.rand(vals[k].shape, generator=gen))
    return vals


@pytest.mark.parametrize("method", ["lora", "rslora", "dora"])
def test_lora_variants_follow_peft_math(method, task):
    """y = W0 x + b + s B A x with s = alpha / r (LoRA) or alpha / sqrt(r) (rsLoRA); DoRA:
    y = m * (W0 + s B A) x / ||W0 + s B A||_row + b."""
    model = tiny_bert()
    name = "bert.encoder.layer.0.attention.self.query"
    lin = model.get_submodule(name)
    W0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    eng, spec, _ = _engine(method, task, model=model)
    r, alpha = spec.r, spec.alpha
    s = alpha / math.sqrt(r) if method == "rslora" else alpha / r
    assert spec.scaling == pytest.approx(s)
    vals = _layer_values(spec, eng)
    A, B = vals[f"{name}.lora_A"], vals[f"{name}.lora_B"]
    x = torch.randn(5, W0.shape[1], generator=torch.Generator().manual_seed(2))
    with eng.use_single(vals) as peft_model:
        layer = peft_model.get_submodule(f"base_model.model.{name}")
        assert layer.scaling[peer_name(0)] == pytest.approx(s)
        got = layer(x)
    if method == "dora":
        V = W0 + s * B @ A
        m = vals[f"{name}.{MAGNITUDE}"]
        want = x @ (m.unsqueeze(1) * V / V.norm(dim=1, keepdim=True)).T + b0
    else:
        want = x @ W0.T + b0 + s * (x @ A.T) @ B.T
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_ia3_scales_outputs_and_feedforward_inputs(task):
    model = tiny_bert()
    eng, spec, _ = _engine("ia3", task, model=model)
    assert any(n.endswith("attention.output.dense") for n in spec.feedforward_modules)
    gen = torch.Generator().manual_seed(3)
    vals = {
        k: v[0] + 0.3 * torch.randn(v[0].shape, generator=gen) for k, v in eng.stacked().items()
    }
    for name in ("bert.encoder.layer.0.attention.self.value", "bert.encoder.layer.1.output.dense"):
        lin = tiny_bert().get_submodule(name)
        v = vals[f"{name}.{IA3_VECTOR}"]
        x = torch.randn(4, lin.in_features, generator=gen)
        with eng.use_single(vals) as peft_model, torch.no_grad():
            got = peft_model.get_submodule(f"base_model.model.{name}")(x)
        # [1, in] on a feed-forward module scales its input; [out, 1] its output (bias too)
        want = lin(x * v) if name in spec.feedforward_modules else lin(x) * v.T
        torch.testing.assert_close(got, want.detach(), atol=1e-5, rtol=1e-5)


def test_consensus_counts_method_tensors_but_not_the_head():
    a = torch.tensor([[1.0, 2.0], [3.0, 2.0]])  # two peers
    values = {
        f"m.{IA3_VECTOR}": a.unsqueeze(-1),
        PROMPT: torch.zeros(2, 3, 4),
        "classifier.weight": torch.randn(2, 3, 4),
    }
    # mean_i ||x_i - mean||^2 = (1 + 1) / 2 = 1
    assert consensus_distance(values, ()) == pytest.approx(1.0)


def test_set_trainable_freezes_dora_factors_but_refuses_ia3(tokenizer, task):
    eng, _, _ = _engine("dora", task)
    eng.set_trainable({"lora_B"})
    before = eng.stacked()
    examples = synthetic_examples(tokenizer, 30)
    for _ in range(2):
        eng.train_step([examples[i * 10 : i * 10 + 10] for i in range(N)])
    after = eng.stacked()
    for k in after:
        changed = not torch.equal(after[k], before[k])
        assert changed == (not k.endswith("lora_A")), k
    ia3, _, _ = _engine("ia3", task)
    with pytest.raises(ValueError, match="no LoRA factors"):
        ia3.set_trainable({"lora_B"})


def test_prompt_tuning_without_head_training_keeps_the_head_frozen(tokenizer, task):
    model = tiny_bert()
    head = model.classifier.weight.detach().clone()
    eng, _, init = _engine("prompt-tuning", task, model=model, train_head=False)
    assert list(init) == [PROMPT]
    examples = synthetic_examples(tokenizer, 30)
    eng.train_step([examples[i * 10 : i * 10 + 10] for i in range(N)])
    for i in range(N):
        copy = eng.model.base_model.classifier.modules_to_save[peer_name(i)]
        torch.testing.assert_close(copy.weight.detach(), head, atol=0, rtol=0)


def test_spec_errors():
    model = tiny_bert()
    with pytest.raises(ConfigError, match=r"lora\.method 'adalora' is unknown"):
        build_spec(model, ["query"], 4, 8, 0.0, True, method="adalora")
    with pytest.raises(ConfigError, match=r"lora\.feedforward"):
        build_spec(model, ["query"], 4, 8, 0.0, True, method="ia3", feedforward=["output.dense"])


# --------------------------------------------------------------------------- the command line


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
        "data.min_size=4",
        "data.max_length=32",
        "topology.peers=3",
        "train.rounds=3",
        "train.local_steps=2",
        "train.batch_size=4",
        "train.lr=0.05",
        "eval.every=3",
        "lora.r=2",
        "lora.virtual_tokens=4",
        "baselines=[]",
        *extra,
    ]
    return ["run", "--quiet", "--out", str(out), *[a for s in sets for a in ("--set", s)]]


CLI_METHODS = {
    "dora": [],
    "rslora": [],
    "ia3": ["lora.targets=[query,value,output.dense]", "lora.feedforward=[output.dense]"],
    "prompt-tuning": ["baselines=[centralized]"],  # a second engine on the restored base
}


@pytest.mark.parametrize("method", list(CLI_METHODS))
def test_every_method_runs_from_the_cli(method, tiny_model_dir, csv_file, tmp_path, task):
    out = tmp_path / "run"
    res = runner.invoke(
        app, _args(tiny_model_dir, csv_file, out, f"lora.method={method}", *CLI_METHODS[method])
    )
    assert res.exit_code == 0, res.output
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["lora"]["method"] == method and cfg["train"]["engine"] == "reference"
    rec = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert rec["round"] == 3 and rec["consensus_distance"] > 0 and rec["bytes_sent"] > 0
    for sub in ("average", "peer-0", "peer-2"):
        fresh = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
        loaded = PeftModel.from_pretrained(fresh, out / "adapters" / sub)
        assert loaded.peft_config["default"].peft_type.value == (
            {"ia3": "IA3", "prompt-tuning": "PROMPT_TUNING"}.get(method, "LORA")
        )
    if method == "prompt-tuning":
        assert (out / "baselines" / "centralized" / "adapters" / "average").is_dir()


BAD = [
    (["lora.method=ia3", "algorithm.name=ffa"], "algorithm ffa works on LoRA"),
    (["lora.method=prompt-tuning", "baselines=[decaf]"], "algorithm decaf works on LoRA"),
    (["lora.method=prompt-tuning", "task=causal-lm"], "task=classification only"),
    (["lora.method=prompt-tuning", "lora.virtual_tokens=100"], "positions"),
    (["lora.feedforward=[output.dense]"], "lora.feedforward is for lora.method=ia3"),
    (["lora.method=ia3", "lora.feedforward=[output.dense]"], "lora.feedforward ['output.dense']"),
    (["lora.method=dora", "lora.mix_head=false"], "lora.mix_head=false is not supported"),
    (["lora.method=adalora"], "lora.method"),
]


@pytest.mark.parametrize(("sets", "expect"), BAD)
def test_bad_method_settings_give_one_clear_error(sets, expect, tiny_model_dir, csv_file, tmp_path):
    out = tmp_path / "out"
    res = runner.invoke(app, _args(tiny_model_dir, csv_file, out, *sets))
    assert res.exit_code == 2, res.output
    message = res.stderr[res.stderr.index("error:") :]
    assert expect in message
    assert "Traceback" not in res.output
    assert not out.exists()
