"""Jobs whose adapters are pinned bit for bit (a refactor must not move a single bit).

Each job is a `declora run` command line on tiny local models and data that `write_inputs`
makes; `adapter_digest` hashes every adapter tensor of the run directory. The pins in
`digests.json` were written by the code before the package was split into subpackages (and are
rewritten only by a change that means to move results, with the reason in its commit).

The jobs run under `PORTABLE_KERNELS`: the default kernels depend on the CPU (ATen's vector
width, MKL's and oneDNN's code paths for the instruction set), so the same code gives other
bits on another machine. Pinned to ATen's scalar kernels, MKL's conditional-numerical-
reproducibility branch for all x86 CPUs and oneDNN's SSE4.1 kernels, a job's bits should
depend on the code only: narrowing MKL's instruction set further leaves them unchanged (not
checked on another vendor's CPU). On 2026-12-04 the pins were rewritten under them, by the
code whose default-kernel digests had passed on the earlier machines (AMD EPYC), after an
Intel Xeon with AVX-512 and AMX gave other digests for every job under its default kernels."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

PIN_FILE = Path(__file__).with_name("digests.json")
# set before torch starts (a fresh process): kernels whose results do not depend on the CPU
PORTABLE_KERNELS = {
    "ATEN_CPU_CAPABILITY": "default",
    "MKL_CBWR": "COMPATIBLE",
    "ONEDNN_MAX_CPU_ISA": "SSE41",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}

_COMMON = [
    "train.rounds=3",
    "train.batch_size=2",
    "train.threads=1",
    "eval.every=2",
    "eval.max_examples=20",
    "eval.final_max_examples=20",
    "eval.peer_max_examples=10",
    "topology.peers=4",
]


def classification_job(root: Path, *extra: str) -> list[str]:
    return [
        f"model.name={root / 'bert'}",
        "data.name=file",
        f"data.path={root / 'data.csv'}",
        "data.max_length=16",
        "data.min_size=4",
        *_COMMON,
        *extra,
    ]


def causal_job(root: Path, *extra: str) -> list[str]:
    return [
        "task=causal-lm",
        f"model.name={root / 'llama'}",
        "data.name=file",
        f"data.path={root / 'chat.jsonl'}",
        "data.group_column=topic",
        "data.partition=natural",
        "data.max_length=32",
        "eval.generate_examples=2",
        "eval.max_new_tokens=3",
        "eval.sample_prompts=[hello there]",
        *_COMMON,
        *extra,
    ]


def jobs(root: Path) -> dict[str, list[str]]:
    """name -> overrides; the baselines (centralized, local-only, fedavg) ride along."""
    c = classification_job
    return {
        "dec-lora+baselines": c(root, "baselines=[centralized, local-only, fedavg]"),
        "decaf": c(root, "algorithm.name=decaf", "baselines=[]"),
        "ffa": c(root, "algorithm.name=ffa", "baselines=[]"),
        "adf": c(root, "algorithm.name=adf", "algorithm.period=1", "baselines=[]"),
        "q4-error-feedback": c(root, "comm.bits=4", "comm.error_feedback=true", "baselines=[]"),
        "q2-choco": c(root, "comm.bits=2", "comm.scheme=choco", "baselines=[]"),
        "dynamic-offline-stragglers": c(
            root,
            "topology.dynamic=random-pairs",
            "topology.offline_prob=0.2",
            "train.straggler_prob=0.3",
            "train.local_steps=2",
            "baselines=[fedavg]",
        ),
        "ia3": c(root, "lora.method=ia3", "baselines=[]"),
        "causal": causal_job(root, "baselines=[centralized]"),
    }


def write_inputs(root: Path, tokenizer, words: list[str]) -> None:
    """The tiny BERT, tiny Llama, CSV and chat file every job reads (deterministic)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from tests.conftest import tiny_bert, tiny_llama

    tiny_bert().save_pretrained(root / "bert")
    tokenizer.save_pretrained(root / "bert")
    tiny_llama().save_pretrained(root / "llama")
    tok = type(tokenizer).from_pretrained(root / "bert")
    tok.eos_token = "[SEP]"
    tok.save_pretrained(root / "llama")
    rng = np.random.default_rng(1)
    lines = ["text,label"]
    for i in range(160):
        chosen = rng.choice(words, size=6)
        label = ["a", "b", "c"][int(sum(map(len, chosen)) % 3)]
        lines.append(f"{' '.join(chosen)} {i},{label}")
    (root / "data.csv").write_text("\n".join(lines) + "\n")
    rows = []
    for i in range(80):
        q = " ".join(rng.choice(words, size=4))
        rows.append(
            {"prompt": f"{q} {i}?", "response": f"{q.split()[0]} indeed", "topic": f"t{i % 4}"}
        )
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def adapter_digest(run: Path) -> str:
    """SHA-256 over every adapter tensor (name, dtype, shape, bytes) of a run directory."""
    from safetensors.torch import load_file

    h = hashlib.sha256()
    for f in sorted(run.glob("**/adapters/*/adapter_model.safetensors")):
        h.update(str(f.parent.relative_to(run)).encode())
        for k, v in sorted(load_file(str(f)).items()):
            h.update(f"{k}:{v.dtype}:{tuple(v.shape)}".encode())
            h.update(
                v.contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes()
            )
    return h.hexdigest()
