"""The run's summary table, its plots and report.md."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from declora.algorithms.registry import label
from declora.config.schema import RunConfig, peer_ranks
from declora.reporting.rundir import RunDir

if TYPE_CHECKING:
    from declora.engine.round_loop import Result
    from declora.runners.build import Prepared

LABELS = {
    "accuracy": "accuracy",
    "macro_f1": "macro-F1",
    "loss": "loss",
    "perplexity": "perplexity",
    "answer_f1": "answer F1",
}
CLASSIFICATION_COLUMNS = ("accuracy", "macro_f1")


def rank_text(cfg: RunConfig) -> str:
    """`r=8`, or each peer's rank with `lora.ranks` (issue 17)."""
    ranks = peer_ranks(cfg)
    if ranks is None:
        return f"r={cfg.lora.r}"
    return f"per-peer ranks {list(ranks)} (scale {cfg.lora.alpha / cfg.lora.r:g})"


def summary_rows(
    results: dict[str, Result],
    main: str,
    columns: tuple[str, ...] = CLASSIFICATION_COLUMNS,
    primary: str = "accuracy",
    higher_is_better: bool = True,
    peers: int | None = None,
) -> list[dict[str, Any]]:
    """One row per (algorithm, view): averaged model and, with several peers, mean of peers.
    `peers` overrides the peer count read from the final adapters (distributed runs hold one)."""
    rows = []
    for name, res in results.items():
        where = "." if name == main else f"baselines/{name}"
        n_peers = peers or len(res.final[next(iter(res.final))])
        views = [("averaged model", "")] if n_peers > 1 else [("single model", "")]
        if res.peer_metrics:
            views.append(("mean of peers", "peers_"))
        for view, prefix in views:
            row: dict[str, Any] = {
                "algorithm": name,
                "label": f"{label(name)} ({view})",
            }
            for col in columns:
                row[col] = res.last(f"{prefix}{col}")
            row[f"best_{primary}"] = res.best(primary, higher_is_better) if not prefix else None
            row["bytes_per_peer"] = res.last("bytes_sent")
            # as metrics.jsonl has them: at one decimal, a short loop on a fast machine showed 0
            row["wall_seconds"] = round(res.wall_seconds, 3)
            row["cpu_seconds"] = None if res.cpu_seconds is None else round(res.cpu_seconds, 3)
            row["dir"] = where
            rows.append(row)
    return rows


def _network_markdown(cfg: Any) -> str:
    """A note when the network is not the fixed graph with every peer there (dynamic runs)."""
    t, parts = cfg.topology, []
    if t.dynamic != "static":
        parts.append(
            f"the graph is drawn anew every round (topology.dynamic={t.dynamic}); the graph "
            "and spectral gap above describe the configured base graph, which it does not use"
        )
    if t.offline_prob > 0:
        parts.append(f"each peer is offline in a round with probability {t.offline_prob}")
    if cfg.train.straggler_prob > 0:
        parts.append(
            f"an online peer straggles (1..K-1 local steps) with probability "
            f"{cfg.train.straggler_prob}"
        )
    return f"\nNetwork: {'; '.join(parts)}.\n" if parts else ""


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def _mb(x: float | None) -> str:
    return "-" if x is None else f"{x / 1e6:.2f} MB"


def _columns(rows: list[dict[str, Any]], columns: Sequence[str] | None) -> list[str]:
    if columns is not None:
        return list(columns)
    return [c for c in LABELS if rows and c in rows[0]] or list(CLASSIFICATION_COLUMNS)


def table_markdown(rows: list[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    cols = _columns(rows, columns)
    best = next((k for k in rows[0] if k.startswith("best_")), None) if rows else None
    head = "| run | " + " | ".join(LABELS.get(c, c) for c in cols)
    head += f" | best {LABELS.get(best[5:], best[5:])} (rounds)" if best else ""
    head += " | sent per peer | wall s | CPU s |\n"
    head += "|---|" + "---:|" * (len(cols) + (1 if best else 0) + 3) + "\n"
    body = ""
    for r in rows:
        cells = [_fmt(r.get(c)) for c in cols] + ([_fmt(r.get(best))] if best else [])
        body += f"| {r['label']} | " + " | ".join(cells)
        wall, cpu = _fmt(r["wall_seconds"], ".1f"), _fmt(r.get("cpu_seconds"), ".1f")
        body += f" | {_mb(r['bytes_per_peer'])} | {wall} | {cpu} |\n"
    return head + body


def table_text(rows: list[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    cols = _columns(rows, columns)
    width = max(len(r["label"]) for r in rows)
    widths = [max(8, len(LABELS.get(c, c))) for c in cols]
    head = "  ".join(f"{LABELS.get(c, c):>{w}}" for c, w in zip(cols, widths, strict=True))
    lines = [f"{'run':<{width}}  {head}  sent/peer"]
    for r in rows:
        cells = "  ".join(f"{_fmt(r.get(c)):>{w}}" for c, w in zip(cols, widths, strict=True))
        lines.append(f"{r['label']:<{width}}  {cells}  {_mb(r['bytes_per_peer']):>9}")
    return "\n".join(lines)


def _series(results: dict[str, Result], key: str, peers_too: bool) -> dict:
    out = {}
    for name, res in results.items():
        recs = [r for r in res.records if key in r]
        out[label(name)] = ([r["round"] for r in recs], [r[key] for r in recs])
        peer = [r for r in res.records if f"peers_{key}" in r]
        if peers_too and len(peer) > 1:
            out[f"{label(name)} (peers)"] = (
                [r["round"] for r in peer],
                [r[f"peers_{key}"] for r in peer],
            )
    return out


def _samples_markdown(results: dict[str, Result], main: str) -> str:
    samples = results[main].extras.get("samples") if main in results else None
    if not samples:
        return ""
    out = "\n## Answers of the averaged model (greedy)\n\n"
    for s in samples:
        answer = " ".join(s["answer"].split()) or "(empty)"
        out += f"- **{s['prompt']}** {answer}\n"
    return out


def _robust_markdown(cfg: Any, main: Result) -> str:
    """Faults and robust rules: who the peers flagged, and how often (the last record)."""
    f, rule = cfg.faults, cfg.comm.robust
    if not f.byzantine and rule == "none" and cfg.comm.robust_stale is None:
        return ""
    out = "\n## Robustness\n\n"
    if f.byzantine:
        out += f"Fault injection: peer(s) {f.byzantine} send `{f.attack}` values. "
    out += f"Combine rule: `comm.robust={rule}`.\n"
    flags = main.last("robust_flags") if rule != "none" else None
    if isinstance(flags, dict) and flags:
        by_sender: dict[str, int] = {}
        for pair, count in flags.items():
            sender = pair.split("->")[0]
            by_sender[sender] = by_sender.get(sender, 0) + int(count)
        ranked = sorted(by_sender.items(), key=lambda kv: -kv[1])
        out += (
            "\nTimes a neighbour's message was clipped or mostly trimmed (summed over the "
            "peers that received it; per pair in `metrics.jsonl`, key `robust_flags`): "
            + ", ".join(f"peer {s}: {c}" for s, c in ranked[:10])
            + "\n"
        )
    removed = main.last("robust_removed") if rule != "none" else None
    if isinstance(removed, dict) and removed:
        top = sorted(removed.items(), key=lambda kv: -float(kv[1]))[:10]
        what = "clipping removed" if rule == "clip" else "the rule discarded"
        out += (
            f"\nMean share of a neighbour's messages {what} (sender->receiver, highest first; "
            "`robust_removed`): " + ", ".join(f"`{p}` {float(v):.2f}" for p, v in top) + "\n"
        )
    c = cfg.comm
    cutting = c.robust_exclude is not None or c.robust_stale is not None
    excluded = main.last("robust_excluded") if cutting else None
    if isinstance(excluded, list):
        keys = ", ".join(
            f"`comm.{k}={v:g}`"
            for k, v in (("robust_exclude", c.robust_exclude), ("robust_stale", c.robust_stale))
            if v is not None
        )
        stale = main.last("robust_stale") if c.robust_stale is not None else None
        out += (
            f"\nCut off ({keys}, sender->receiver): "
            + (", ".join(f"`{pair}`" for pair in excluded) if excluded else "none")
            + (
                f"; of them for repeating one message {c.robust_stale} times in a row: "
                + (", ".join(f"`{pair}`" for pair in stale) if stale else "none")
                if isinstance(stale, list)
                else ""
            )
            + ".\n"
        )
    return out


#: a gap (points of accuracy) between the averaged model and the mean of the peers' own models
#: past which the report says how to close it
PEERS_BEHIND_POINTS = 1.0


def peers_gap_markdown(cfg: Any, topology: Any, main: Result) -> str:
    """A note when the peers' own models end well below the averaged model (the peers had not
    agreed at the last round; usual under label skew on a slowly mixing graph): what
    `comm.final_gossip` does about it, and how many exchanges this graph needs."""
    from declora.algorithms import make_algorithm
    from declora.network.topology import gossip_rounds_to

    avg, own = main.last("accuracy"), main.last("peers_accuracy")
    algorithm = make_algorithm(cfg.algorithm.name, cfg)
    kept = "m.lora_B" not in algorithm.sent_keys({"m.lora_A", "m.lora_B"})
    if avg is None or own is None or not algorithm.gossips or kept:
        return ""  # no gossip, or peers that keep B their own (FedSA): apart by design
    behind = 100 * (avg - own)
    if behind < PEERS_BEHIND_POINTS:
        return ""
    tenfold = gossip_rounds_to(0.1, topology.spectral_gap)
    made = cfg.comm.final_gossip
    after = f" after the {made} exchanges that followed the last round" if made else ""
    how = (
        f"on this graph (|lambda_2| = {topology.second_eigenvalue_modulus:.3f}) about {tenfold} "
        "exchanges cut the disagreement tenfold"
        if tenfold
        else "this graph's mixing matrix never brings the peers together (spectral gap 0)"
    )
    apart = main.last("consensus_distance") or 0.0
    return (
        f"\n**Each peer's own model is {behind:.1f} points below the averaged model**{after}: "
        f"the peers had not agreed (consensus distance {apart:.4g}). No peer holds the "
        "averaged model. `comm.final_gossip=k` makes k more exchanges after the last round, "
        "with no training, which leave the average as it is and bring each peer towards it, "
        f"each at the bytes of a round's exchange; {how}.\n"
    )


def _privacy_markdown(cfg: Any, results: dict[str, Result]) -> str:
    """DP-SGD per peer: the target, and the epsilon each algorithm's peers spent."""
    p = cfg.privacy
    if not p.on:
        return ""
    delta = f"delta={p.delta:g}" if p.delta is not None else "delta=1/N_i (N_i: a peer's examples)"
    if p.epsilon is not None:
        how = f"target epsilon {p.epsilon:g}"
    else:
        how = f"noise multiplier {p.noise_multiplier:g}"
    out = (
        "\n## Privacy\n\n"
        f"DP-SGD per peer ({how}, {delta}, per-example clipping at {p.max_grad_norm:g}, "
        f"Poisson sampling, Opacus `{p.accountant}` accountant). Each peer's guarantee covers "
        "its own records against everything it sends; gossip, averaging and evaluation are "
        "post-processing (docs/privacy.md). Spent epsilon at the last evaluated round:\n\n"
        "| algorithm | max over peers | per peer |\n|---|---|---|\n"
    )
    for name, res in results.items():
        eps, per = res.last("epsilon"), res.last("epsilon_peers")
        if eps is None:
            continue
        shown = ", ".join(f"{e:.2f}" for e in per) if isinstance(per, list) else ""
        out += f"| {label(name)} | {eps:.3f} | {shown} |\n"
    return out


def write_report(
    rundir: RunDir, prep: Prepared, results: dict[str, Result], rows: list[dict[str, Any]]
) -> None:
    from declora.reporting import plots  # matplotlib: only where a plot is drawn

    cfg, topo = prep.cfg, prep.topology
    p = rundir.path
    causal = cfg.task == "causal-lm"
    primary = "perplexity" if causal else "accuracy"
    plots.metric_per_round(
        _series(results, primary, True),
        f"{primary} (held-out)",
        p / f"{primary}.png",
        title=f"Held-out {primary} per round (averaged model)",
        scale="log" if causal else "linear",
    )
    plots.metric_per_round(
        _series(results, "consensus_distance", False),
        "consensus distance",
        p / "consensus.png",
        title="Disagreement between peers' B_i A_i",
        scale="symlog",
    )
    plots.metric_per_round(
        _series(results, "train_loss", False),
        "train loss",
        p / "train_loss.png",
        title="Training loss (mean over peers)",
    )
    summary = prep.data.summary()
    main = results[cfg.algorithm.name]
    final_n = main.last("eval_examples")
    peer_n = min(cfg.eval.peer_max_examples or len(prep.test_examples), len(prep.test_examples))
    groups = len(prep.group_names)
    what = f"{groups} categories" if causal else f"{groups} classes"
    unit = "held-out conversations (loss on answer tokens only)" if causal else "held-out examples"
    best = "lowest perplexity" if causal else "best averaged-model accuracy"
    skew = f" (alpha={cfg.data.alpha})" if cfg.data.partition == "dirichlet" else ""
    privacy_md = _privacy_markdown(cfg, results)
    samples_md = _samples_markdown(results, cfg.algorithm.name)
    text = f"""# declora run: {cfg.name}

{label(cfg.algorithm.name)} with {topo.n} peers on a {topo.kind} graph
({topo.rule} mixing, spectral gap {topo.spectral_gap:.4f}); model `{cfg.model.name}` with LoRA
{rank_text(cfg)} on {", ".join(cfg.lora.targets)}; data `{cfg.data.name}` ({summary["train_size"]}
train / {summary["test_size"]} test, {what}) split with `{cfg.data.partition}`{skew};
{cfg.train.rounds} rounds x {cfg.train.local_steps} local steps x batch
{cfg.train.batch_size} per peer; seed {cfg.seed}.
{_network_markdown(cfg)}
## Results

Final round: the averaged model on {final_n} {unit}, each peer's own model on {peer_n}; the
"best" column is the {best} over the evaluated rounds (rounds before the last use
{cfg.eval.max_examples or "all"} examples).

{table_markdown(rows)}
The averaged model uses the mean of every peer's A and of every peer's B (the paper's
evaluation); "mean of peers" averages each peer's own model's metric.
{peers_gap_markdown(cfg, topo, main)}{samples_md}{_robust_markdown(cfg, main)}{privacy_md}
![{primary}]({primary}.png)
![consensus](consensus.png)
![train loss](train_loss.png)

## Data over peers

![labels](label_distribution.png)

Per-peer {"category" if causal else "label"} counts: `label_counts.json`. Graph: `topology.json`.

![topology](topology.png)

## Files
- `config.yaml`: the fully resolved configuration (rerun with `declora run --config`).
- `metrics.jsonl`: one line per evaluated round.
- `adapters/average/`, `adapters/peer-<i>/`: PEFT adapters (`PeftModel.from_pretrained`).
- `baselines/<name>/`: the same for each baseline.
"""
    rundir.write_text("report.md", text)
