"""Using a finished run's model: labels for new texts, or answers to new prompts.

The model is the base the run trained on with one of its exported PEFT adapters loaded by PEFT
itself (what a user's own code would do), and the inputs are prepared as the run prepared its
own: the same tokenizer, `data.max_length`, label names, chat format (or plain continuation for
`data.name=text`) and generation length. By default it uses the adapter the run's summary
reports: the best-validation round's where the run had a validation split, else the averaged
model.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from declora.config.schema import RunConfig, load_config
from declora.data.tables import is_missing, one_line, read_table
from declora.errors import DecloraError
from declora.reporting.rundir import read_record

#: What `adapter` accepts besides `peer-<i>`.
NAMED_ADAPTERS = ("best-val", "average")
#: What predictions can be written as.
OUTPUT_EXTENSIONS = (".jsonl", ".json", ".csv", ".tsv")


@dataclass(frozen=True)
class Predictor:
    """A run's model ready for inputs: the PEFT model, its tokenizer and how the run used it."""

    cfg: RunConfig
    model: Any
    tokenizer: Any
    adapter: Path
    label_names: list[str]

    @property
    def causal(self) -> bool:
        return self.cfg.task == "causal-lm"


def adapter_folder(run: Path, adapter: str | None = None, baseline: str | None = None) -> Path:
    """The adapter folder asked for, or the one the run's summary reports; an error says what
    the run has."""
    root = run if baseline is None else run / "baselines" / baseline
    if baseline is not None and not root.is_dir():
        have = sorted(p.name for p in (run / "baselines").glob("*") if p.is_dir())
        raise DecloraError(
            f"{str(run)!r} has no baseline {baseline!r}; it has: {', '.join(have) or 'none'}"
        )
    have = sorted(
        p.name for p in (root / "adapters").glob("*") if (p / "adapter_config.json").is_file()
    )
    if adapter is None:
        adapter = next((a for a in NAMED_ADAPTERS if a in have), None)
        if adapter is None:
            raise DecloraError(_no_adapter_message(run, root))
    elif adapter not in NAMED_ADAPTERS and not (
        adapter.startswith("peer-") and adapter[5:].isdigit()
    ):
        raise DecloraError(
            f"--adapter {adapter!r} is not an adapter name; accepted: best-val, average, "
            "peer-<i> (a peer's own model)"
        )
    folder = root / "adapters" / adapter
    if adapter not in have:
        raise DecloraError(
            f"{str(root)!r} has no adapter {adapter!r}; it has: {', '.join(have) or 'none'}"
            if have
            else _no_adapter_message(run, root)
        )
    return folder


def _no_adapter_message(run: Path, root: Path) -> str:
    state = (read_record(run) or {}).get("status", "unknown")
    if state != "complete":
        return (
            f"{str(root)!r} has no exported adapter: the run is {state!r}, and adapters are "
            "written when it completes (see `declora report` on it)"
        )
    return (
        f"{str(root)!r} has no averaged adapter (a distributed run that did not monitor it); "
        f"make it with: declora report {run} --evaluate"
    )


def locate(
    run_dir: str | Path, adapter: str | None = None, baseline: str | None = None
) -> tuple[RunConfig, Path]:
    """The run's config and the adapter folder to use; cheap (no model is loaded), so a
    mistake is refused at once."""
    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise DecloraError(f"{str(run)!r} is not a declora run directory (no config.yaml)")
    return load_config(run / "config.yaml", []), adapter_folder(run, adapter, baseline)


def load_predictor(
    run_dir: str | Path, adapter: str | None = None, baseline: str | None = None
) -> Predictor:
    """The run's base model with the chosen adapter, in eval mode."""
    from peft import PeftModel

    run = Path(run_dir)
    cfg, folder = locate(run, adapter, baseline)
    m = cfg.model
    label_names: list[str] = []
    if cfg.task == "causal-lm":
        from declora.model.causal_lm import load_causal_lm

        base, tokenizer, _ = load_causal_lm(
            m.name, dtype=m.dtype, quantize=m.quantize, seed=cfg.seed
        )
    else:
        from declora.model.classifier import load_classifier

        counts = read_record(run, "label_counts.json")
        if counts is None or not counts.get("label_names"):
            raise DecloraError(f"{str(run)!r} lacks label_counts.json (the run's label names)")
        label_names = [str(name) for name in counts["label_names"]]
        # the run's seed: a head the run did not train is the one it drew at this seed
        base, tokenizer, _ = load_classifier(
            m.name, label_names, cfg.seed, dtype=m.dtype, quantize=m.quantize
        )
    try:
        with warnings.catch_warnings():  # PEFT asks transformers a deprecated question
            warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
            model = PeftModel.from_pretrained(base, str(folder)).eval()
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise DecloraError(
            f"the adapter in {str(folder)!r} does not load on {m.name!r}: {one_line(exc)}"
        ) from None
    return Predictor(cfg, model, tokenizer, folder, label_names)


def read_inputs(
    path: str | Path, column: str, pair_column: str | None = None
) -> tuple[list[str], list[str] | None]:
    """Texts (and second texts of a pair task) from a table file, in file order."""
    frame = read_table(Path(path), "--file")
    for key, name in (("text", column), ("pair", pair_column)):
        if name is not None and name not in frame.columns:
            have = ", ".join(str(c) for c in frame.columns)
            raise DecloraError(
                f"--file {path} has no column {name!r} (the {key} column); its columns: {have}"
            )
    texts = [_text(v, column, i) for i, v in enumerate(frame[column])]
    pairs = None
    if pair_column is not None:
        pairs = [_text(v, pair_column, i) for i, v in enumerate(frame[pair_column])]
    return texts, pairs


def _text(value: Any, column: str, row: int) -> str:
    if is_missing(value):
        raise DecloraError(f"row {row + 1} has no {column!r} (it is empty)")
    return str(value)


@torch.inference_mode()
def classify(
    pred: Predictor, texts: Sequence[str], pairs: Sequence[str] | None = None, batch_size: int = 32
) -> list[dict[str, Any]]:
    """Per text: the predicted label and the probability of every label."""
    from declora.tasks.task import ClassificationTask
    from declora.tasks.tokenize import tokenize_classification

    if pred.causal:
        raise DecloraError("this run is a causal LM: it answers prompts, it does not classify")
    if (pairs is None) != (pred.cfg.data.text_pair_column is None):
        need = "pairs of texts" if pairs is None else "single texts"
        raise DecloraError(f"this run's task classifies {need}")
    examples, _ = tokenize_classification(
        pred.tokenizer,
        list(texts),
        pairs,
        np.zeros(len(texts), dtype=np.int64),
        pred.cfg.data.max_length,
    )
    task = ClassificationTask(pred.tokenizer)
    rows: list[dict[str, Any]] = []
    for s in range(0, len(examples), batch_size):
        batch = task.collate(examples[s : s + batch_size])
        batch.pop("labels", None)
        probs = torch.softmax(pred.model(**batch).logits.float(), dim=-1)
        for p in probs.tolist():
            best = int(np.argmax(p))
            rows.append(
                {
                    "label": pred.label_names[best],
                    "probability": p[best],
                    "probabilities": dict(zip(pred.label_names, p, strict=True)),
                }
            )
    return rows


def answer(
    pred: Predictor, prompts: Sequence[str], max_new_tokens: int | None = None, batch_size: int = 8
) -> list[str]:
    """Greedy answers to prompts: a user turn in the run's chat format, or for a plain-text
    run (`data.name=text`) a continuation of the prompt; as long as the run's evaluation
    generated (`eval.max_new_tokens`) unless asked otherwise."""
    from declora.data.causal_lm import generation_prompts
    from declora.tasks.task import CausalLMTask

    if not pred.causal:
        raise DecloraError("this run is a classifier: it labels texts, it does not answer prompts")
    ml = pred.cfg.data.max_length
    if pred.cfg.data.name == "text":
        enc = pred.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        ids = [list(e)[-ml:] for e in enc]
    else:
        convs = [
            [{"role": "user", "content": q}, {"role": "assistant", "content": ""}] for q in prompts
        ]
        ids = [p for p, _ in generation_prompts(pred.tokenizer, convs, ml)]
    if any(not p for p in ids):
        raise DecloraError("an empty prompt has nothing to continue")
    task = CausalLMTask(pred.tokenizer)
    n = max_new_tokens or pred.cfg.eval.max_new_tokens
    out: list[str] = []
    for s in range(0, len(ids), batch_size):
        for o in task.generate(pred.model, ids[s : s + batch_size], n):
            out.append(pred.tokenizer.decode(o, skip_special_tokens=True).strip())
    return out


def predict_rows(
    pred: Predictor,
    inputs: Sequence[str],
    pairs: Sequence[str] | None = None,
    max_new_tokens: int | None = None,
    batch_size: int = 32,
) -> list[dict[str, Any]]:
    """One row per input: text (and pair), label and probabilities; or prompt and answer."""
    if pred.causal:
        answers = answer(pred, inputs, max_new_tokens, batch_size)
        return [{"prompt": q, "answer": a} for q, a in zip(inputs, answers, strict=True)]
    labels = classify(pred, inputs, pairs, batch_size)
    return [
        {"text": t, **({"pair": pairs[i]} if pairs else {}), **r}
        for i, (t, r) in enumerate(zip(inputs, labels, strict=True))
    ]


def check_merge_target(out_dir: str | Path, overwrite: bool = False) -> Path:
    """Refuse a folder the merged model cannot be written to, before any model is loaded."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise DecloraError(f"{out} already exists; give another folder or --overwrite")
    if out.exists() and not out.is_dir():
        raise DecloraError(f"{out} is a file; give a folder")
    if not out.parent.is_dir():
        raise DecloraError(f"the folder {out.parent} (where {out.name} would go) does not exist")
    return out


def check_mergeable(cfg: RunConfig) -> None:
    """Refuse a run whose adapter cannot become plain weights of its base model."""
    if cfg.lora.method == "prompt-tuning":
        raise DecloraError(
            "a prompt-tuning adapter adds virtual tokens in front of the input; it has no "
            "weights to merge into the base model (use `declora predict`, or load the adapter "
            "with PEFT)"
        )
    if cfg.model.quantize is not None:
        raise DecloraError(
            f"the run's base is quantized (model.quantize={cfg.model.quantize}); merging "
            "into quantized weights would round the adapter away"
        )


def merge(pred: Predictor, out_dir: str | Path, overwrite: bool = False) -> Path:
    """The adapter merged into the base weights, saved as a plain transformers model (with its
    tokenizer and, for a classifier, the label names in its config), so any transformers tool
    (a pipeline, an inference server, an ONNX export) uses it without PEFT or declora.

    Written to a temporary folder beside `out_dir` and moved into place: a failure leaves
    nothing under the asked name."""
    import shutil

    out = check_merge_target(out_dir, overwrite)
    check_mergeable(pred.cfg)
    merged = pred.model.merge_and_unload()
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        merged.save_pretrained(str(tmp))
        pred.tokenizer.save_pretrained(str(tmp))
        _as_umask_allows(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.replace(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _as_umask_allows(folder: Path) -> None:
    """Give the saved files the mode any file the user writes gets: transformers writes the
    weights through a private temporary file (mode 0600), which a server running under
    another account could not read."""
    umask = os.umask(0)
    os.umask(umask)
    for f in folder.rglob("*"):
        if f.is_file():
            f.chmod(0o666 & ~umask)


def check_output_path(path: str | Path) -> Path:
    """Refuse an output file that could not be written, before any model is loaded."""
    out = Path(path)
    ext = out.suffix.lower()
    if ext not in OUTPUT_EXTENSIONS:
        raise DecloraError(
            f"--out {out} has extension {ext or '(none)'!r}; accepted: "
            f"{', '.join(OUTPUT_EXTENSIONS)}"
        )
    if not out.parent.is_dir():
        raise DecloraError(f"--out {out}: its folder {out.parent} does not exist")
    if out.is_dir():
        raise DecloraError(f"--out {out} is a folder; give a file name")
    return out


def write_predictions(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    """Rows as .jsonl, .json or a .csv/.tsv table (one column per label's probability)."""
    import pandas as pd

    out = check_output_path(path)
    ext = out.suffix.lower()
    if ext == ".jsonl":
        text = "".join(json.dumps(r) + "\n" for r in rows)
    elif ext == ".json":
        text = json.dumps(rows, indent=1) + "\n"
    else:
        flat = [
            {
                **{k: v for k, v in r.items() if k != "probabilities"},
                **{f"p_{k}": v for k, v in r.get("probabilities", {}).items()},
            }
            for r in rows
        ]
        text = pd.DataFrame(flat).to_csv(index=False, sep="\t" if ext == ".tsv" else ",")
    tmp = out.with_name(out.name + ".partial")
    tmp.write_text(text)
    tmp.replace(out)  # never a half-written file under the asked name
    return out


__all__ = [
    "NAMED_ADAPTERS",
    "OUTPUT_EXTENSIONS",
    "Predictor",
    "adapter_folder",
    "answer",
    "check_merge_target",
    "check_mergeable",
    "check_output_path",
    "classify",
    "load_predictor",
    "locate",
    "merge",
    "predict_rows",
    "read_inputs",
    "write_predictions",
]
