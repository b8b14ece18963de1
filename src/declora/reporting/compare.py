"""`declora report DIR DIR ...`: several finished runs side by side, in one table and plots.

Per-run plots (label distribution per peer, topology) are already in each run directory; this
draws what only a comparison shows: the averaged model's metric per round for every run, the
final metric against bytes each peer sent, and the consensus distance per round.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from declora.errors import DecloraError
from declora.reporting.rundir import STATUS_FILE, RunDir, read_metrics, read_record


def finished_summary(run: Path) -> dict[str, Any]:
    """A complete run's summary.json, checked: every way it can be missing or unreadable is
    one DecloraError naming the folder."""
    if not run.is_dir():
        raise DecloraError(f"{str(run)!r} is not a directory")
    status = RunDir(run).status()
    if status is None:
        raise DecloraError(f"{str(run)!r} is not a declora run directory (no {STATUS_FILE})")
    if status != "complete":
        raise DecloraError(f"run {str(run)!r} is not complete (status: {status})")
    summary = read_record(run, "summary.json")
    if summary is None:
        raise DecloraError(
            f"run {str(run)!r} has no summary.json although run.json says complete; the folder "
            "was changed after the run (run it again with --overwrite)"
        )
    rows = summary.get("rows")
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise DecloraError(f"{str(run / 'summary.json')!r} has no table rows; it was damaged")
    return summary


def _load(run: Path) -> dict[str, Any]:
    return {"summary": finished_summary(run), "metrics": read_metrics(run)}


def check_out(out: Path, runs: list[Path]) -> None:
    """A comparison goes into a folder of its own: never a file, a run directory, or a folder
    inside one of the compared runs (their plots have the same names)."""
    if out.exists() and not out.is_dir():
        raise DecloraError(f"--out {str(out)!r} is a file; the comparison needs a folder")
    target = out.resolve()
    for run in runs:
        r = run.resolve()
        if target == r or r in target.parents:
            raise DecloraError(
                f"--out {str(out)!r} is inside run {str(run)!r}; its plots would be overwritten, "
                "choose a folder of its own"
            )
    for folder in (target, *target.parents):
        if (folder / STATUS_FILE).is_file():
            raise DecloraError(
                f"--out {str(out)!r} is inside the run directory {str(folder)!r}; choose a "
                "folder of its own"
            )


def _names(runs: list[Path]) -> list[str]:
    """Short unique labels: the folder names, with parents added where they clash."""
    names = [r.name for r in runs]
    if len(set(names)) < len(names):
        names = [f"{r.parent.name}/{r.name}" for r in runs]
    return names


def compare_runs(runs: list[Path], out: Path, names: list[str] | None = None) -> dict[str, Any]:
    """Table and plots of `runs` in `out`; `names` labels them (default: their folder names)."""
    from declora.reporting import plots  # matplotlib: only where a plot is drawn

    loaded = [_load(r) for r in runs]
    if names is not None and len(names) != len(runs):
        raise DecloraError(f"{len(names)} names for {len(runs)} runs")
    check_out(out, runs)
    names = names or _names(runs)
    columns = loaded[0]["summary"].get("columns") or ["accuracy"]
    primary = columns[0]
    causal = loaded[0]["summary"].get("task") == "causal-lm"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DecloraError(f"cannot create --out {str(out)!r}: {exc.strerror or exc}") from None
    series, consensus, points, rows = {}, {}, {}, []
    for name, run in zip(names, loaded, strict=True):
        recs = [r for r in run["metrics"] if primary in r]
        series[name] = ([r["round"] for r in recs], [r[primary] for r in recs])
        cons = [r for r in run["metrics"] if r.get("consensus_distance") is not None]
        consensus[name] = ([r["round"] for r in cons], [r["consensus_distance"] for r in cons])
        main = run["summary"]["rows"][0]
        row = {"run": name, "label": main["label"]}
        row.update({c: main.get(c) for c in columns})
        row["bytes_per_peer"] = main.get("bytes_per_peer")
        row["wall_seconds"] = main.get("wall_seconds")
        row["cpu_seconds"] = main.get("cpu_seconds")  # runs from before 2026-12-03: none
        rows.append(row)
        if main.get(primary) is not None:
            points[name] = (float(main.get("bytes_per_peer") or 0.0), float(main[primary]))
    scale = "log" if causal else "linear"
    plots.metric_per_round(
        series, primary, out / f"{primary}.png", title=f"Averaged model: {primary}", scale=scale
    )
    plots.metric_per_round(
        consensus,
        "consensus distance",
        out / "consensus.png",
        title="Consensus distance",
        scale="symlog",
    )
    plots.metric_vs_bytes(
        points, primary, out / f"{primary}_vs_bytes.png", title=f"Final {primary} against bytes"
    )
    head = ["run", *columns, "MB sent/peer", "wall s", "CPU s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        vals = ["-" if r[c] is None else f"{r[c]:.4f}" for c in columns]
        mb = "-" if r["bytes_per_peer"] is None else f"{r['bytes_per_peer'] / 1e6:.2f}"
        wall = "-" if r["wall_seconds"] is None else f"{r['wall_seconds']:.1f}"
        cpu = "-" if r["cpu_seconds"] is None else f"{r['cpu_seconds']:.1f}"
        lines.append(f"| {r['run']} | " + " | ".join(vals) + f" | {mb} | {wall} | {cpu} |")
    table = "\n".join(lines) + "\n"
    text = (
        f"# Comparison of {len(runs)} runs\n\n{table}\n"
        f"![{primary}]({primary}.png)\n![vs bytes]({primary}_vs_bytes.png)\n"
        "![consensus](consensus.png)\n\nRuns: " + ", ".join(f"`{r}`" for r in runs) + "\n"
    )
    (out / "compare.md").write_text(text)
    return {"table": table, "rows": rows}
