"""`declora report DIR DIR ...`: several finished runs side by side, in one table and plots.

Per-run plots (label distribution per peer, topology) are already in each run directory; this
draws what only a comparison shows: the averaged model's metric per round for every run, the
final metric against bytes each peer sent, and the consensus distance per round. Next to the
table it lists the settings the runs differ in, and it says when their test sets differ (their
scores then do not compare).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from declora.errors import DecloraError
from declora.reporting.rundir import (
    STATUS_FILE,
    RunDir,
    continue_hint,
    lock_holder,
    read_metrics,
    read_record,
)


def finished_summary(run: Path) -> dict[str, Any]:
    """A complete run's summary.json, checked: every way it can be missing or unreadable is
    one DecloraError naming the folder."""
    if not run.is_dir():
        raise DecloraError(f"{str(run)!r} is not a directory")
    status = RunDir(run).status()
    if status is None:
        raise DecloraError(f"{str(run)!r} is not a declora run directory (no {STATUS_FILE})")
    if status != "complete":
        raise DecloraError(f"run {str(run)!r} is not complete: {unfinished_state(run, status)}")
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


# settings that change neither what a run trains nor what it scores: the run's name, and the
# prefixes of logging and export
UNSCORED = ("log.", "export.")
# settings that fix the examples a run is scored on
TEST_SET = (
    "task",
    "data.name",
    "data.path",
    "data.test_path",
    "data.test_size",
    "data.split_seed",
    "data.max_test_examples",
    "eval.final_max_examples",  # the final score's subset of the test split
)


def run_settings(run: Path) -> dict[str, str]:
    """A run's config.yaml as dotted keys and compact values ({} if it has none): read as
    plain YAML, so that runs written by an older declora still compare."""
    try:
        data = yaml.safe_load((run / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            flat[prefix[:-1]] = text

    if isinstance(data, dict):
        walk("", data)
    return flat


def differing_settings(settings: list[dict[str, str]]) -> dict[str, list[str]]:
    """The settings whose values are not the same in every run (a run without the key: "-"),
    leaving out those that change neither training nor scoring."""
    keys = sorted({k for s in settings for k in s})
    out = {}
    for k in keys:
        if k == "name" or k.startswith(UNSCORED):
            continue
        values = [s.get(k, "-") for s in settings]
        if len(set(values)) > 1:
            out[k] = values
    return out


def unfinished_state(run: Path, status: str) -> str:
    """Why a run is not complete, in words: still going (a process holds its lock), stopped
    with its recorded error, or stopped without a word (killed: it still says "running")."""
    again = continue_hint(run)
    if run_settings(run).get("train.checkpoint_every") == "0":
        again = "it wrote no checkpoints (train.checkpoint_every=0): run it again with --overwrite"
    if status == "running":
        holder = lock_holder(run)
        if holder:
            return f"it is still running, in {holder}"
        return (
            'run.json says "running" but no process holds the run: it was killed before it '
            f"could record it (SIGKILL, a lost machine); {again}"
        )
    error = (read_record(run) or {}).get("error")
    return f"status {status}{f' ({error})' if error else ''}; {again}"


def _load(run: Path) -> dict[str, Any]:
    return {
        "summary": finished_summary(run),
        "metrics": read_metrics(run),
        "settings": run_settings(run),
    }


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
    """Table, differing settings and plots of `runs` in `out`; `names` labels them (default:
    their folder names). Runs of different tasks are refused (DecloraError): no metric is
    common to a classifier and a causal LM."""
    from declora.reporting import plots  # matplotlib: only where a plot is drawn

    loaded = [_load(r) for r in runs]
    if names is not None and len(names) != len(runs):
        raise DecloraError(f"{len(names)} names for {len(runs)} runs")
    check_out(out, runs)
    names = names or _names(runs)
    tasks = [str(r["summary"].get("task") or "classification") for r in loaded]
    if len(set(tasks)) > 1:
        kinds = ", ".join(f"{n}: {t}" for n, t in zip(names, tasks, strict=True))
        raise DecloraError(
            f"runs of different tasks have no metric in common and cannot share a table ({kinds}); "
            "compare runs of one task"
        )
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
    table = "\n".join(lines) + "\n" + settings_text(names, [r["settings"] for r in loaded])
    text = (
        f"# Comparison of {len(runs)} runs\n\n{table}\n"
        f"![{primary}]({primary}.png)\n![vs bytes]({primary}_vs_bytes.png)\n"
        "![consensus](consensus.png)\n\nRuns: " + ", ".join(f"`{r}`" for r in runs) + "\n"
    )
    (out / "compare.md").write_text(text)
    return {"table": table, "rows": rows}


def settings_text(names: list[str], settings: list[dict[str, str]]) -> str:
    """The settings the runs differ in, as a table, and a warning when those include the test
    set: two runs scored on different examples do not compare."""
    diff = differing_settings(settings)
    if not diff:
        return "\nThe runs differ in no setting (other than the run name, logging and export).\n"
    lines = [
        "",
        "Settings that differ:",
        "",
        "| setting | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    lines += [f"| {k} | " + " | ".join(v) + " |" for k, v in diff.items()]
    test = [k for k in diff if k in TEST_SET]
    if test:
        lines += [
            "",
            f"warning: the runs were scored on different test sets (they differ in "
            f"{', '.join(test)}); their scores do not compare.",
        ]
    return "\n".join(lines) + "\n"
