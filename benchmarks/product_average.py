"""The averaged factors against the peers' weight average, on finished Dec-LoRA runs.

The paper (and the plateau study's tables) score the model of the averaged factors,
(mean B)(mean A). While the peers disagree, that is not the average of their models: it misses
the factors' covariance across peers. This script scores both on a run's final peer adapters:
the averaged factors, and the exact mean of the peers' updates, mean_i B_i A_i (one adapter of
rank n * r at the same scale, `declora.model.adapters.product_average`; heads averaged), on all
of the run's test tweets. Where the second scores higher, gossiping products instead of factors
(DeCAF's idea) could recover the difference; more gossip of the factors (`comm.final_gossip`)
could not, since it keeps the mean factors. Where the two agree, factor averaging costs nothing.

    .venv/bin/python benchmarks/product_average.py RUN_DIR [RUN_DIR ...]
    .venv/bin/python benchmarks/product_average.py --plateau   # the plateau study's main runs
    .venv/bin/python benchmarks/product_average.py --write-docs   # the table in docs/results.md

One JSON row per run, appended to `--rows` (resumable: a run with a row is skipped). Analysis
after a study's declared protocol: no verdict reads it.
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
ROWS = ROOT / "docs" / "results" / "data" / "product_average.jsonl"
PLATEAU_ROWS = ROOT / "docs" / "plateau" / "runs.jsonl"
PLATEAU_RUNS = ROOT / "runs" / "plateau"


def plateau_runs(rows_path: Path = PLATEAU_ROWS, runs: Path = PLATEAU_RUNS) -> list[Path]:
    """The run folders of the plateau study's main-table Dec-LoRA seeds that this machine
    holds: the main stage's runs, and the tuning run of seed 0 at the same LR (the main table's
    seed 0), from the committed rows; not the ablations' variants."""
    rows = [json.loads(x) for x in rows_path.read_text().splitlines() if x.strip()]
    main = [r for r in rows if r["stage"] == "main" and r["arm"].startswith("dec-lora")]
    lrs = {(r["task"], r["arm"], r["partition"]): r["lr"] for r in main}
    tuned = [
        r
        for r in rows
        if r["stage"] == "tune" and r["seed"] == 0
        and lrs.get((r["task"], r["arm"], r["partition"])) == r["lr"]
    ]  # fmt: skip
    folders = [runs / r["task"] / "cells" / r["cell"] for r in sorted(
        [*tuned, *main], key=lambda r: (r["task"], r["partition"], r["seed"])
    )]  # fmt: skip
    return [f for f in folders if (f / "adapters" / "peer-0").is_dir()]


def score(run: Path) -> dict[str, Any]:
    """`run`'s final peer adapters scored as averaged factors and as their weight average."""
    from declora.config.schema import load_config
    from declora.errors import DecloraError
    from declora.model.adapters import average, product_average
    from declora.network.simulated import consensus_distance
    from declora.reporting.machine import host
    from declora.runners.build import build_algorithm, prepare
    from declora.runners.posthoc import peer_adapters
    from declora.tasks.evaluate import ValidationEvaluator
    from declora.tasks.metrics import classification_metrics

    cfg = load_config(run / "config.yaml", [])
    if cfg.lora.method not in ("lora", "rslora") or cfg.lora.ranks is not None:
        raise DecloraError(
            f"{run}: lora.method={cfg.lora.method} with lora.ranks={cfg.lora.ranks}; the weight "
            "average as one adapter needs plain LoRA or rsLoRA factors of one rank"
        )
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
    prep = prepare(cfg)
    n = cfg.topology.peers
    adapters = peer_adapters(run, list(prep.init), prep.spec, n, like=prep.init)
    stacked = {k: torch.stack([a[k].float() for a in adapters]) for k in prep.init}
    # the same model at rank n * r, with alpha chosen so that the scale s stays the same
    wide_r = n * cfg.lora.r
    wide_alpha = prep.spec.scaling * (wide_r**0.5 if cfg.lora.method == "rslora" else wide_r)
    wide = load_config(run / "config.yaml", [f"lora.r={wide_r}", f"lora.alpha={wide_alpha!r}"])
    rows, logits = {}, {}
    t0 = time.process_time()
    for name, c, values in (
        ("averaged_factors", cfg, average(stacked)),
        ("weight_average", wide, product_average(stacked)),
    ):
        p = prep if c is cfg else prepare(c)
        assert abs(p.spec.scaling - prep.spec.scaling) < 1e-9 * prep.spec.scaling
        with tempfile.TemporaryDirectory() as tmp:
            parts = build_algorithm(p, cfg.algorithm.name, Path(tmp)).parts
        # with a validation split the evaluator scores validation, and its test_eval test
        ev = parts.evaluator
        test = ev.test_eval if isinstance(ev, ValidationEvaluator) else ev
        with torch.no_grad():
            logits[name], labels = test.logits(parts.engine, values)
        got = classification_metrics(
            logits[name].argmax(-1).numpy(), labels, test.num_classes, binary_f1=test.binary_f1
        )
        rows[name] = got["accuracy"]
        rows[f"{name}_macro_f1"] = got["macro_f1"]
    a, w = logits["averaged_factors"].float(), logits["weight_average"].float()
    best = next((m for m in reversed(metrics) if "val_best_test_accuracy" in m), {})
    spec = prep.spec
    return {
        "run": run.name,
        "data": cfg.data.name,
        "algorithm": cfg.algorithm.name,
        "partition": cfg.data.partition,
        "topology": cfg.topology.kind,
        "peers": n,
        "seed": cfg.seed,
        "rounds": cfg.train.rounds,
        "lr": cfg.train.lr,
        "averaged_factors_test_accuracy": rows["averaged_factors"],
        "weight_average_test_accuracy": rows["weight_average"],
        "averaged_factors_macro_f1": rows["averaged_factors_macro_f1"],
        "weight_average_macro_f1": rows["weight_average_macro_f1"],
        "run_test_accuracy": metrics[-1].get("test_accuracy"),  # the final model, if scored
        "run_test_examples": metrics[-1].get("test_eval_examples"),
        "run_val_best_test_accuracy": best.get("val_best_test_accuracy"),
        "consensus_distance": consensus_distance(stacked, spec.lora_modules, spec.scaling),
        "test_examples": len(a),
        # how far apart the two models are, whatever their accuracy
        "mean_abs_logit_difference": float((w - a).abs().mean()),
        "prediction_agreement": float((w.argmax(-1) == a.argmax(-1)).float().mean()),
        "cpu_seconds": round(time.process_time() - t0, 1),
        "machine": host(),
    }


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: per task and setting, both scores (mean ± std over runs) and their paired
    difference in points (mean, and min to max over runs)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        key = (r["data"], r["algorithm"], r["partition"], r["topology"], r["peers"])
        groups.setdefault(key, []).append(r)
    out = [
        "| data | algorithm | partition | graph | runs (seeds) | averaged factors (mean B)(mean A) "
        "| weight average mean(B A) | difference (points; min to max) | consensus distance |",
        "|---|---|---|---|---|---|---|---|---:|",
    ]

    def ms(xs: list[float]) -> str:
        return f"{np.mean(xs):.3f}" + (f" ± {np.std(xs, ddof=1):.3f}" if len(xs) > 1 else "")

    for (data, algo, part, graph, n), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        a = [r["averaged_factors_test_accuracy"] for r in rs]
        w = [r["weight_average_test_accuracy"] for r in rs]
        d = [100 * (y - x) for x, y in zip(a, w, strict=True)]
        out.append(
            f"| {data} | {algo} | {part} | {graph}, {n} peers | {len(rs)} "
            f"({', '.join(str(r['seed']) for r in rs)}) | {ms(a)} | {ms(w)} | "
            f"{np.mean(d):+.2f} ({min(d):+.2f} to {max(d):+.2f}) | "
            f"{np.mean([r['consensus_distance'] for r in rs]):.3f} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="*", type=Path, help="finished run directories")
    ap.add_argument(
        "--plateau", action="store_true", help="also the plateau study's main Dec-LoRA runs here"
    )
    ap.add_argument("--rows", type=Path, default=ROWS)
    ap.add_argument(
        "--write-docs", action="store_true", help="only write the rows' table into the docs"
    )
    args = ap.parse_args(argv)
    if args.write_docs:
        from declora.reporting.generated import write_rows_table

        write_rows_table(args.rows, [ROOT / "docs" / "results.md"], "product-average", table)
        return 0
    from declora.errors import DecloraError

    old = []
    if args.rows.is_file():
        old = [json.loads(x) for x in args.rows.read_text().splitlines() if x]
    done = {r["run"] for r in old}
    for run in [*args.runs, *(plateau_runs() if args.plateau else [])]:
        if not (run / "config.yaml").is_file() or not (run / "metrics.jsonl").is_file():
            print(f"error: {run} is not a finished run directory", file=sys.stderr)
            return 2
        if run.name in done:
            continue
        try:
            row = score(run)
        except DecloraError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        args.rows.parent.mkdir(parents=True, exist_ok=True)
        with args.rows.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
