"""One `declora run`: check everything, then train the main algorithm and its baselines.

Everything that can fail because of user input (data, graph, partition, model) is checked in
`declora.runners.build.prepare` before the run directory is created; each algorithm's parts
come from `build_algorithm`, the same builder a torchrun peer uses.
"""

from __future__ import annotations

import platform
from collections.abc import Iterable
from pathlib import Path

import torch

from declora.config.schema import RunConfig
from declora.data.partition import skew_summary
from declora.engine.round_loop import LoopHooks, Result, train
from declora.model.adapters import average
from declora.model.export import save_at_rank, save_peft_adapter
from declora.reporting.report import summary_rows, write_report
from declora.reporting.rundir import RunDir, failure_text
from declora.reporting.trackers import Trackers, require
from declora.runners.build import (
    Prepared,
    averaged_export,
    build_algorithm,
    make_evaluator,
    plan_ranks,
    prepare,
)
from declora.tasks.evaluate import mark_best_round


def run_algorithm(
    prep: Prepared,
    algorithm: str,
    out: RunDir,
    *,
    export_peers: bool,
    progress: bool,
    resume: bool = False,
    trackers: Trackers | None = None,
) -> Result:
    cfg = prep.cfg
    # every algorithm starts from the same RNG state (dropout masks), whatever ran before it
    torch.manual_seed(cfg.seed)
    run = build_algorithm(prep, algorithm, out.path / "checkpoints", resume=resume)
    plan = run.plan
    try:
        result = train(
            run.parts,
            prep.train_examples,
            run.settings,
            LoopHooks(
                on_record=(trackers or Trackers.none()).on_record(algorithm, out.append_metrics),
                on_restore=out.rewrite_metrics,
                progress=progress,
            ),
        )
    finally:
        prep.model = run.engine.remove()  # the next algorithm wraps the bare base model
    if mark_best_round(result.records):  # data.val_size: the round the best adapters are from
        out.rewrite_metrics(result.records)
    kind = prep.peft_task_type
    avg_spec, avg = averaged_export(cfg, prep.spec, average(result.final))
    save_peft_adapter(
        out.path / "adapters" / "average", avg_spec, avg, prep.model_path, kind, model=prep.model
    )
    best = getattr(run.evaluator, "best_values", None)
    if best is not None:
        where = out.path / "adapters" / "best-val"
        save_peft_adapter(where, prep.spec, best, prep.model_path, kind, model=prep.model)
    if export_peers and plan.n > 1:
        ranks = plan_ranks(cfg, plan.n) or (prep.spec.r,) * plan.n  # each at its true rank
        for i in range(plan.n):
            values = {k: v[i] for k, v in result.final.items()}
            where = out.path / "adapters" / f"peer-{i}"
            save_at_rank(
                where, prep.spec, values, ranks[i], prep.model_path, kind, model=prep.model
            )
    out.write_json("peer_metrics.json", result.peer_metrics)
    if trackers:
        trackers.peer_table(algorithm, result.peer_metrics)
    if result.extras:
        out.write_json("samples.json", result.extras)
    return result


def execute(
    cfg: RunConfig,
    out: str | Path,
    *,
    overwrite: bool = False,
    progress: bool = True,
    resume: bool = False,
) -> tuple[RunDir, dict[str, Result]]:
    """The whole run; returns the run directory and each algorithm's result. With `resume`,
    `out` is an interrupted run's folder and every algorithm continues from its newest
    checkpoint (one that finished is restored, not retrained)."""
    require(cfg.log)  # a missing tracker extra stops here, before any data is loaded
    prep = prepare(cfg)
    rundir = RunDir.reopen(out) if resume else RunDir.create(out, overwrite=overwrite)
    try:
        results = _execute(prep, rundir, progress, resume)
    except BaseException as exc:
        rundir.set_status("failed", error=failure_text(exc))
        raise
    return rundir, results


def total_cpu_seconds(results: Iterable[Result]) -> float | None:
    """CPU seconds of the algorithms' loops together; None if one of them lacks its count (it
    resumed a checkpoint written before declora counted CPU time)."""
    total = 0.0
    for r in results:
        if r.cpu_seconds is None:
            return None
        total += r.cpu_seconds
    return round(total, 1)


def write_setup(rundir: RunDir, prep: Prepared) -> None:
    """What a run knows before training: resolved config, graph, data over peers, plots."""
    from declora.reporting import plots  # matplotlib: only where a plot is drawn

    cfg = prep.cfg
    rundir.write_text("config.yaml", cfg.to_yaml())
    rundir.write_json("topology.json", prep.topology.to_dict())
    names = prep.group_names
    counts = prep.counts  # per peer and class (or category; documents for plain text)
    rundir.write_json(
        "label_counts.json",
        {
            "label_names": names,
            "counts": counts.tolist(),
            "skew": skew_summary(counts),
            "data": prep.data.summary(),
            "truncated_at_max_length": prep.truncated,
        },
    )
    plots.label_distribution(
        counts,
        names,
        rundir.path / "label_distribution.png",
        title="Category distribution per peer" if prep.causal else "Label distribution per peer",
    )
    plots.topology(
        prep.topology.graph,
        rundir.path / "topology.png",
        title=f"{prep.topology.kind}, {prep.topology.n} peers, "
        f"gap {prep.topology.spectral_gap:.3f}",
    )


def _execute(prep: Prepared, rundir: RunDir, progress: bool, resume: bool) -> dict[str, Result]:
    cfg = prep.cfg
    write_setup(rundir, prep)
    trackers = Trackers.open(cfg, rundir.path, resume=resume)
    results: dict[str, Result] = {}
    main = cfg.algorithm.name
    results[main] = run_algorithm(
        prep, main, rundir, export_peers=True, progress=progress, resume=resume, trackers=trackers
    )
    for name in cfg.baselines:
        if name == main:
            continue
        sub = rundir.sub(f"baselines/{name}")
        results[name] = run_algorithm(
            prep, name, sub, export_peers=False, progress=progress, resume=resume, trackers=trackers
        )
    ev = make_evaluator(prep)
    rows = summary_rows(results, main, ev.columns, ev.primary, ev.higher_is_better)
    rundir.write_json(
        "summary.json",
        {"main": main, "task": cfg.task, "columns": list(ev.columns), "rows": rows},
    )
    write_report(rundir, prep, results, rows)
    trackers.end(rundir.path, main)  # report and plots as artifacts, then close every run
    rundir.set_status(
        "complete",
        machine=f"{platform.machine()}, {torch.get_num_threads()} threads",
        wall_seconds=round(sum(r.wall_seconds for r in results.values()), 1),
        cpu_seconds=total_cpu_seconds(results.values()),
    )
    return results
