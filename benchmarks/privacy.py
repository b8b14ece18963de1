"""DP-SGD's cost in the batched engine: training examples per second with and without DP on
the demo job (MiniLM, 10 peers, batch 4 per peer, 64 tokens), measured in one process.

    OMP_NUM_THREADS=1 python benchmarks/privacy.py [--steps 20] [--threads 1]

One engine trains with DP-SGD switched on and off; the timed steps of the two alternate in blocks,
so a machine that gets busier affects both alike. Non-DP steps take 4 shuffled examples per
peer; DP steps take Poisson batches of expected size 4 (their real sizes are counted). Only
`train_step` is timed (forward, per-example clipping, noise, optimizer step). One row is
appended to docs/results/data/privacy_throughput.jsonl; the target of issue 16 is a ratio of
at least 0.5.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from declora.algorithms import make_algorithm
from declora.config.schema import load_config
from declora.data.sampling import make_sampler
from declora.engine.privacy import DPSGD
from declora.reporting.machine import cpu_model
from declora.runners.build import calibration_of, make_engine, prepare

ROOT = Path(__file__).resolve().parents[1]
ROWS = ROOT / "docs" / "results" / "data" / "privacy_throughput.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="timed steps per engine")
    ap.add_argument("--block", type=int, default=5, help="steps per alternating block")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--epsilon", type=float, default=3.0)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sets = ["privacy.mechanism=dp-sgd", f"privacy.epsilon={args.epsilon}"]
    cfg = load_config(None, sets)
    prep = prepare(cfg)
    plan = make_algorithm("dec-lora", cfg).plan(
        prep.topology, prep.parts, cfg.train.batch_size, prep.schedule
    )
    cal = calibration_of(cfg, plan)
    assert cal is not None
    # one engine (the model holds one set of stacked layers); DP-SGD switched on per block
    engine = make_engine(prep, plan)
    modes = {"non-dp": None, "dp-sgd": DPSGD(cal, range(plan.n))}
    b = plan.batch_size
    samplers = {
        name: [
            make_sampler(p, b, cfg.seed, i, poisson=name == "dp-sgd")
            for i, p in enumerate(plan.parts)
        ]
        for name in modes
    }
    seconds = dict.fromkeys(modes, 0.0)
    examples = dict.fromkeys(modes, 0)
    ex = prep.train_examples

    def step(name: str, timed: bool) -> None:
        batches = [[ex[j] for j in s.next()] for s in samplers[name]]
        engine.privacy = modes[name]
        start = time.perf_counter()
        engine.train_step(batches)
        if timed:
            seconds[name] += time.perf_counter() - start
            examples[name] += sum(len(x) for x in batches)

    for name in modes:  # warm-up
        for _ in range(2):
            step(name, False)
    for _ in range(0, args.steps, args.block):
        for name in modes:
            for _ in range(args.block):
                step(name, True)
    rate = {k: examples[k] / seconds[k] for k in modes}
    row = {
        "job": "demo (MiniLM, 10 peers, batch 4, 64 tokens)",
        "epsilon": args.epsilon,
        "noise_multiplier_max": float(cal.noise_multipliers.max()),
        "steps": args.steps,
        "threads": args.threads,
        "examples": examples,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "examples_per_second": {k: round(v, 2) for k, v in rate.items()},
        "ratio_dp_to_non_dp": round(rate["dp-sgd"] / rate["non-dp"], 3),
        "machine": f"{cpu_model()}, {args.threads} thread(s)",
        "torch": torch.__version__,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    print(json.dumps(row, indent=1))
    if not args.no_write:
        ROWS.parent.mkdir(parents=True, exist_ok=True)
        with ROWS.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
