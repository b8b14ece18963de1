"""`declora run` with task=causal-lm end to end on a tiny Llama and small chat files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from declora.cli import app
from tests.conftest import TIMINGS, WORDS, tiny_llama

runner = CliRunner()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, minilm_path):
    """A tiny random Llama (GQA, tied embeddings) saved with MiniLM's tokenizer (no chat
    template, so the plain User:/Assistant: format is used)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(minilm_path)
    tok.eos_token = "[SEP]"
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(120):
        q = " ".join(rng.choice(WORDS, size=4))
        rows.append(
            {"prompt": f"{q} {i}?", "response": f"{q.split()[0]} indeed", "topic": f"t{i % 4}"}
        )
    f = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


def _args(model_dir, data, out, *extra):
    args = ["run", "--quiet", "--out", str(out), "--set", "task=causal-lm"]
    for kv in (
        f"model.name={model_dir}",
        "data.name=file",
        f"data.path={data}",
        "data.group_column=topic",
        "data.partition=natural",
        "data.max_length=32",
        "topology.peers=4",
        "train.rounds=4",
        "train.batch_size=2",
        "train.optimizer=adamw",
        "train.lr=0.01",
        "eval.every=2",
        "eval.generate_examples=4",
        "eval.max_new_tokens=4",
        "eval.sample_prompts=[hello there]",
        "baselines=[centralized, local-only]",
        *extra,
    ):
        args += ["--set", kv]
    return args


def test_causal_run_end_to_end(llama_dir, chat_file, tmp_path):
    out = tmp_path / "run"
    res = runner.invoke(app, _args(llama_dir, chat_file, out))
    assert res.exit_code == 0, res.output
    assert "perplexity" in res.output
    assert "cut at data.max_length" not in res.output  # every chat fits in 32 tokens
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "causal-lm"
    labels = [r["label"] for r in summary["rows"]]
    assert labels[0].startswith("Dec-LoRA") and any(lb.startswith("Local-only") for lb in labels)
    for row in summary["rows"]:
        assert row["perplexity"] > 1.0
        if "mean of peers" in row["label"]:  # a mean of perplexities, not exp of a mean loss
            continue
        assert row["loss"] == pytest.approx(np.log(row["perplexity"]))
    main = summary["rows"][0]
    assert 0.0 <= main["answer_f1"] <= 1.0
    counts = json.loads((out / "label_counts.json").read_text())
    assert counts["label_names"] == ["t0", "t1", "t2", "t3"]
    assert all(sum(1 for c in row if c) == 1 for row in counts["counts"])  # one topic per peer
    samples = json.loads((out / "samples.json").read_text())["samples"]
    assert samples[0]["prompt"] == "hello there"
    report = (out / "report.md").read_text()
    assert "hello there" in report and (out / "perplexity.png").is_file()
    cfg = json.loads((out / "adapters" / "average" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "CAUSAL_LM" and sorted(cfg["target_modules"])[0].endswith("q_proj")
    # the exported averaged adapter loads on the base and reproduces the run's final loss
    base = AutoModelForCausalLM.from_pretrained(llama_dir)
    peft = PeftModel.from_pretrained(base, out / "adapters" / "average").eval()
    assert peft.peft_config["default"].task_type == "CAUSAL_LM"
    status = json.loads((out / "run.json").read_text())
    assert status["status"] == "complete"


def test_long_conversations_are_cut_and_counted(llama_dir, chat_file, tmp_path):
    """13-token chats at max_length=12 lose their last token; the run says how many."""
    out = tmp_path / "cut"
    args = _args(llama_dir, chat_file, out, "data.max_length=12", "baselines=[]", "train.rounds=1")
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    counts = json.loads((out / "label_counts.json").read_text())["truncated_at_max_length"]
    assert counts["train"] > 0 and counts["train_dropped"] == 0
    assert f"cut at data.max_length=12 tokens: {counts['train']} training and" in res.output


def test_causal_run_is_repeatable(llama_dir, chat_file, tmp_path):
    finals = []
    for name in ("a", "b"):
        res = runner.invoke(
            app,
            _args(
                llama_dir, chat_file, tmp_path / name, "baselines=[]", "eval.generate_examples=0"
            ),
        )
        assert res.exit_code == 0, res.output
        finals.append((tmp_path / name / "metrics.jsonl").read_text().splitlines()[-1])
    strip = [{k: v for k, v in json.loads(f).items() if k not in TIMINGS} for f in finals]
    assert strip[0] == strip[1]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["data.response_column=answer"], "answer"),
        (["data.max_length=4096"], "max_length"),
        (["model.quantize=nf4"], "CUDA"),
    ],
)
def test_causal_bad_input(llama_dir, chat_file, tmp_path, extra, message):
    out = tmp_path / "bad"
    res = runner.invoke(app, _args(llama_dir, chat_file, out, *extra))
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert not (out / "run.json").exists()


def test_causal_run_rejects_a_classifier_folder(chat_file, tmp_path, minilm_path):
    res = runner.invoke(app, _args(minilm_path, chat_file, tmp_path / "x"))
    assert res.exit_code == 2
    assert "not a causal language model" in res.output


def test_plain_text_language_modelling(llama_dir, tmp_path):
    """data.name=text: each peer packs its own documents into blocks; every token counts."""
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(WORDS, size=int(rng.integers(20, 40)))) for _ in range(40)]
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(docs) + "\n")
    out = tmp_path / "lm"
    args = ["run", "--quiet", "--out", str(out), "--set", "task=causal-lm"]
    for kv in (
        f"model.name={llama_dir}",
        "data.name=text",
        f"data.path={text}",
        "data.partition=iid",
        "data.max_length=16",
        "topology.peers=3",
        "train.rounds=2",
        "train.batch_size=2",
        "eval.generate_examples=0",
        "eval.sample_prompts=[]",
        "baselines=[]",
    ):
        args += ["--set", kv]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["eval_tokens"] == rec["eval_examples"] * 15  # 16-token blocks, shifted by one
    counts = json.loads((out / "label_counts.json").read_text())
    assert sum(map(sum, counts["counts"])) == counts["data"]["train_size"]  # documents


def test_predict_answers_prompts_as_the_run_answered_its_sample_prompts(
    llama_dir, chat_file, tmp_path
):
    """`declora predict` on a chat run: the same prompt format, generation length and model
    as the run's own answers to eval.sample_prompts (samples.json), so the same answers."""
    out = tmp_path / "run"
    extra = ("baselines=[]", "eval.generate_examples=0", "eval.sample_prompts=[hello there]")
    res = runner.invoke(app, _args(llama_dir, chat_file, out, *extra))
    assert res.exit_code == 0, res.output
    sample = json.loads((out / "samples.json").read_text())["samples"][0]
    res = runner.invoke(app, ["predict", str(out), "hello there"])
    assert res.exit_code == 0, res.output
    assert f"hello there\n  -> {sample['answer']}\n" in res.stdout
    # a file of prompts (its prompt column, as the run read it) to a JSONL file
    answers = tmp_path / "answers.jsonl"
    res = runner.invoke(app, ["predict", str(out), "--file", str(chat_file), "-o", str(answers)])
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in answers.read_text().splitlines()]
    prompts = [json.loads(x)["prompt"] for x in chat_file.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == prompts and all("answer" in r for r in rows)
    # merged into the base, it loads with transformers alone and answers the same
    merged = tmp_path / "merged"
    res = runner.invoke(app, ["export", str(out), str(merged)])
    assert res.exit_code == 0, res.output
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    assert not any("lora" in name for name, _ in model.named_parameters())
    tok = AutoTokenizer.from_pretrained(merged)
    prompt = tok("User: hello there\nAssistant: ", add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(
            input_ids=prompt["input_ids"],
            attention_mask=prompt["attention_mask"],
            max_new_tokens=4,
            do_sample=False,
        )
    got = tok.decode(ids[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    assert got == sample["answer"]
    res = runner.invoke(app, ["predict", str(out), "hi", "--max-new-tokens", "1"])
    assert res.exit_code == 0, res.output
    one = res.stdout.split("  -> ")[1].strip()
    assert (
        len(AutoTokenizer.from_pretrained(llama_dir)(one, add_special_tokens=False)["input_ids"])
        <= 1
    )
