"""The run's summary table, its plots and report.md."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from declora import plots
from declora.rundir import RunDir

if TYPE_CHECKING:
    from declora.run import Prepared
    from declora.trainer import Result

NAMES = {
    "dec-lora": "Dec-LoRA",
    "centralized": "Centralized LoRA",
    "local-only": "Local-only",
    "fedavg": "FedAvg",
}


def summary_rows(results: dict[str, Result], main: str) -> list[dict[str, Any]]:
    """One row per (algorithm, view): averaged model and, with several peers, mean of peers."""
    rows = []
    for name, res in results.items():
        where = "." if name == main else f"baselines/{name}"
        n_peers = len(res.final[next(iter(res.final))])
        views = [("averaged model", "")] if n_peers > 1 else [("single model", "")]
        if res.peer_metrics:
            views.append(("mean of peers", "peers_"))
        for view, prefix in views:
            rows.append(
                {
                    "algorithm": name,
                    "label": f"{NAMES.get(name, name)} ({view})",
                    "accuracy": res.last(f"{prefix}accuracy"),
                    "macro_f1": res.last(f"{prefix}macro_f1"),
                    "best_accuracy": res.best(f"{prefix}accuracy") if not prefix else None,
                    "bytes_per_peer": res.last("bytes_sent"),
                    "wall_seconds": round(res.wall_seconds, 1),
                    "dir": where,
                }
            )
    return rows


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def _mb(x: float | None) -> str:
    return "-" if x is None else f"{x / 1e6:.2f} MB"


def table_markdown(rows: list[dict[str, Any]]) -> str:
    head = "| run | accuracy | macro-F1 | best acc. (rounds) | sent per peer | wall s |\n"
    head += "|---|---:|---:|---:|---:|---:|\n"
    body = "".join(
        f"| {r['label']} | {_fmt(r['accuracy'])} | {_fmt(r['macro_f1'])} | "
        f"{_fmt(r['best_accuracy'])} | {_mb(r['bytes_per_peer'])} | {r['wall_seconds']} |\n"
        for r in rows
    )
    return head + body


def table_text(rows: list[dict[str, Any]]) -> str:
    width = max(len(r["label"]) for r in rows)
    lines = [f"{'run':<{width}}  accuracy  macro-F1  sent/peer"]
    for r in rows:
        lines.append(
            f"{r['label']:<{width}}  {_fmt(r['accuracy']):>8}  {_fmt(r['macro_f1']):>8}  "
            f"{_mb(r['bytes_per_peer']):>9}"
        )
    return "\n".join(lines)


def _series(results: dict[str, Result], key: str, peers_too: bool) -> dict:
    out = {}
    for name, res in results.items():
        recs = [r for r in res.records if key in r]
        out[NAMES.get(name, name)] = ([r["round"] for r in recs], [r[key] for r in recs])
        peer = [r for r in res.records if f"peers_{key}" in r]
        if peers_too and len(peer) > 1:
            out[f"{NAMES.get(name, name)} (peers)"] = (
                [r["round"] for r in peer],
                [r[f"peers_{key}"] for r in peer],
            )
    return out


def write_report(
    rundir: RunDir, prep: Prepared, results: dict[str, Result], rows: list[dict[str, Any]]
) -> None:
    cfg, topo = prep.cfg, prep.topology
    p = rundir.path
    plots.metric_per_round(
        _series(results, "accuracy", True),
        "accuracy (held-out)",
        p / "accuracy.png",
        title="Held-out accuracy per round (averaged model)",
    )
    plots.metric_per_round(
        _series(results, "consensus_distance", False),
        "consensus distance",
        p / "consensus.png",
        title="Disagreement between peers' B_i A_i",
        log=True,
    )
    plots.metric_per_round(
        _series(results, "train_loss", False),
        "train loss",
        p / "train_loss.png",
        title="Training loss (mean over peers)",
    )
    d = prep.data
    main = results[cfg.algorithm.name]
    final_n = main.last("eval_examples")
    peer_n = min(cfg.eval.peer_max_examples or len(prep.test_examples), len(prep.test_examples))
    text = f"""# declora run: {cfg.name}

{NAMES.get(cfg.algorithm.name, cfg.algorithm.name)} with {topo.n} peers on a {topo.kind} graph
({topo.rule} mixing, spectral gap {topo.spectral_gap:.4f}); model `{cfg.model.name}` with LoRA
r={cfg.lora.r} on {", ".join(cfg.lora.targets)}; data `{d.name}` ({len(d.train_labels)} train /
{len(d.test_labels)} test, {d.num_classes} classes) split with `{cfg.data.partition}`
(alpha={cfg.data.alpha}); {cfg.train.rounds} rounds x {cfg.train.local_steps} local steps x batch
{cfg.train.batch_size} per peer; seed {cfg.seed}.

## Results

Final round: the averaged model on {final_n} held-out examples, each peer's own model on
{peer_n}; "best acc." is the best averaged-model accuracy over the evaluated rounds (the paper's
metric; rounds before the last use {cfg.eval.max_examples or "all"} examples).

{table_markdown(rows)}
The averaged model uses the mean of every peer's A and of every peer's B (the paper's
evaluation); "mean of peers" averages each peer's own model's metric.

![accuracy](accuracy.png)
![consensus](consensus.png)
![train loss](train_loss.png)

## Data over peers

![labels](label_distribution.png)

Per-peer label counts: `label_counts.json`. Graph: `topology.json`.

![topology](topology.png)

## Files
- `config.yaml`: the fully resolved configuration (rerun with `declora run --config`).
- `metrics.jsonl`: one line per evaluated round.
- `adapters/average/`, `adapters/peer-<i>/`: PEFT adapters (`PeftModel.from_pretrained`).
- `baselines/<name>/`: the same for each baseline.
"""
    rundir.write_text("report.md", text)
