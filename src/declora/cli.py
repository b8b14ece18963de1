"""The `declora` command line: a thin layer over the library.

User mistakes (DecloraError) print one clear line and exit with code 2, never a traceback.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

from declora.errors import DecloraError

if TYPE_CHECKING:
    from declora.config.schema import RunConfig

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Decentralized LoRA fine-tuning: peers on a graph, gossip-averaged adapters, no server.",
)


def _fail(exc: DecloraError) -> None:
    msg = str(exc)
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@app.command()
def run(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="YAML config; default: the demo job")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", help="override a key, e.g. --set topology.kind=er"),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="run directory (default runs/<time>-<name>)")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing run directory")] = False,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
    resume: Annotated[
        Path | None,
        typer.Option(help="continue an interrupted run directory from its newest checkpoints"),
    ] = None,
) -> None:
    """Train the peers (and the configured baselines) and write a run directory.

    Under torchrun (`declora launch`), this process runs one peer of a distributed run instead."""
    from declora.network.distributed import launched
    from declora.reporting.rundir import RunDir

    distributed = launched()
    try:
        cfg, out = _run_config(config, set_ or [], out, resume, distributed)
        _quiet_libraries()
        if distributed:
            assert out is not None  # _run_config refuses a distributed run without one
            _run_peer(cfg, out, resume is not None, overwrite, quiet)
            return
        from declora.runners.build import check_inputs
        from declora.runners.simulate import execute

        check_inputs(cfg)
        target = out or Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.name}"
        RunDir.preflight(target, overwrite=overwrite, resume=resume is not None)
        typer.echo(
            f"declora: {cfg.algorithm.name} on {cfg.topology.peers} peers "
            f"({cfg.topology.kind}, {cfg.topology.mixing}), data {cfg.data.name}, "
            f"model {cfg.model.name} -> {target}",
            err=True,
        )
        from declora.runners.signals import stop_on_signals

        try:
            with stop_on_signals():  # SIGTERM / SIGHUP: run.json records it, the lock is freed
                rundir, _ = execute(
                    cfg, target, overwrite=overwrite, progress=not quiet, resume=resume is not None
                )
        except KeyboardInterrupt as exc:
            from declora.reporting.rundir import resume_command

            again = f"; continue it with: {resume_command(target)}"
            _exit_stopped(exc, again if cfg.train.checkpoint_every != 0 else "")
    except DecloraError as exc:
        _fail(exc)
        return
    _print_outcome(rundir.path, cfg)


def _run_config(
    config: Path | None,
    sets: list[str],
    out: Path | None,
    resume: Path | None,
    distributed: bool,
) -> tuple[RunConfig, Path | None]:
    """The config and run directory `declora run`'s arguments ask for (`--resume DIR`: DIR's
    own config.yaml, written into DIR); refuses arguments that do not go together. Shared by
    `declora run` and the launcher, which refuses them once before any peer starts."""
    from declora.config.schema import load_config
    from declora.reporting.rundir import resume_mismatch

    if resume is not None:
        if config is not None or sets:
            raise DecloraError(
                "--resume continues with the run's own config.yaml; drop --config and --set"
            )
        if out is not None and out != resume:
            raise DecloraError("--resume DIR writes into DIR; drop --out")
        if not resume.is_dir():
            what = "is a file" if resume.exists() else "does not exist"
            raise DecloraError(f"--resume {str(resume)!r} {what}; give a run directory")
        config, out = resume / "config.yaml", resume
        if not config.is_file():
            raise DecloraError(f"--resume {str(resume)!r} has no config.yaml; not a run directory")
        if why := resume_mismatch(resume, distributed):
            raise DecloraError(why)
    elif distributed and out is None:
        raise DecloraError(
            "a distributed run needs --out DIR (the same on every peer; a default name would "
            "differ between processes)"
        )
    cfg = load_config(config, sets)
    if resume is not None and cfg.train.checkpoint_every == 0:
        raise DecloraError(
            f"--resume {str(resume)!r}: this run writes no checkpoints "
            "(train.checkpoint_every=0), so there is nothing to continue from; start it "
            "again with --out DIR --overwrite"
        )
    return cfg, out


def _exit_stopped(exc: KeyboardInterrupt, then: str) -> NoReturn:
    """Ctrl-C or a stop signal (`Stopped`) ended the work: say which, and `then` (what
    continues it), and exit with the shell's code for it (130 for Ctrl-C)."""
    from declora.runners.signals import Stopped

    stop = exc if isinstance(exc, Stopped) else None
    typer.echo(f"\n{stop or 'interrupted'}{then}", err=True)
    raise typer.Exit(stop.exit_code if stop else 130) from None


def _print_outcome(path: Path, cfg) -> None:
    from declora.reporting.report import table_text

    summary = json.loads((path / "summary.json").read_text())
    typer.echo("")
    typer.echo(table_text(summary["rows"], summary.get("columns")))
    typer.echo("")
    cut = json.loads((path / "label_counts.json").read_text())["truncated_at_max_length"]
    if cut.get("train") or cut.get("test"):
        typer.echo(
            f"cut at data.max_length={cfg.data.max_length} tokens: {cut['train']} training and "
            f"{cut['test']} test examples"
        )
    typer.echo(f"run directory: {path}")
    typer.echo(f"report:        {path / 'report.md'}")
    typer.echo(f"adapters:      {path / 'adapters'} (PEFT format)")


def _run_peer(cfg, out: Path, resume: bool, overwrite: bool, quiet: bool) -> None:
    """One peer of a torchrun job; rank 0 prints the outcome."""
    import signal

    from declora.network import distributed
    from declora.runners.peer import run_peer

    # Ctrl-C reaches the launcher too, which records the stop and says how to continue. As a
    # KeyboardInterrupt here it would unwind through gloo's threads ("terminate called
    # recursively") and race the neighbours' errors to run.json: end at once, as on SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        proc, _ = run_peer(cfg, out, resume=resume, overwrite=overwrite, progress=not quiet)
    except DecloraError as exc:
        if distributed.ops_abandoned():
            # ops still wait on a peer that went silent without closing its connection (a cut
            # link): the process group's teardown at exit would wait for them for ever
            typer.echo(f"error: {exc}", err=True)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        raise
    finally:
        distributed.stop()
    if proc.leader:
        _print_outcome(out, cfg)


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def launch(
    ctx: typer.Context,
    peers: Annotated[int, typer.Option(min=1, help="peer processes on this machine")],
    nnodes: Annotated[str, typer.Option(help="machines (or MIN:MAX)")] = "1",
    node_rank: Annotated[int, typer.Option(help="this machine's rank (multi-machine)")] = 0,
    rdzv_endpoint: Annotated[
        str | None, typer.Option(help="HOST:PORT every machine can reach (multi-machine)")
    ] = None,
    max_restarts: Annotated[
        int, typer.Option(min=0, help="restart the group this often after a peer fails")
    ] = 0,
    local_addr: Annotated[
        str | None,
        typer.Option(help="this machine's address the others reach (default: towards endpoint)"),
    ] = None,
    rdzv_timeout: Annotated[
        float, typer.Option(min=1, help="seconds to wait for the other machines (multi-machine)")
    ] = 300.0,
    exit_wait: Annotated[
        float,
        typer.Option(
            min=0,
            help="seconds a machine whose peers finished waits for the others' (multi-machine; "
            "lower it with comm.on_peer_failure=skip, where another machine may be gone)",
        ),
    ] = 300.0,
) -> None:
    """Run `declora run ARGS...` as one process per peer with torch.distributed's launcher.

    On one machine every socket listens on loopback only.

    Example: declora launch --peers 4 -- --config job.yaml --out runs/dist"""
    from declora.runners import launch as launcher

    launcher.quiet_cpp_warnings()
    extra = [a for a in ctx.args if a != "--"]
    if "--help" in extra:  # `declora run`'s help, once, instead of once from every peer
        run_command = typer.main.get_command(app).commands["run"]  # type: ignore[attr-defined]
        typer.echo(run_command.get_help(run_command.make_context("declora run", [])))
        raise typer.Exit(0)
    from declora.reporting.rundir import machine_options

    folder = None
    again = (peers, machine_options(nnodes, rdzv_endpoint))  # what continues it
    try:
        folder = _launch_preflight(extra, peers, nnodes)
        launcher.run(
            ["declora", "run", *extra],
            peers=peers,
            nnodes=nnodes,
            node_rank=node_rank,
            rdzv_endpoint=rdzv_endpoint,
            max_restarts=max_restarts,
            local_addr=local_addr,
            rdzv_timeout_s=rdzv_timeout,
            exit_wait_s=exit_wait,
        )
    except DecloraError as exc:
        if hint := _resume_hint(folder, again):  # peers' own errors, a lost rendezvous
            typer.echo(f"error: {exc}", err=True)
            typer.echo(hint, err=True)
            raise typer.Exit(2) from None
        _fail(exc)
    except launcher.PeersFailed as exc:
        _peers_failed(exc, folder, again)
    except KeyboardInterrupt as exc:  # Ctrl-C or a stop signal to the launcher: see launch.run
        _launch_stopped(exc, folder, again)
    except Exception as exc:  # the launcher's own failure: the peers, if any, printed theirs
        typer.echo(f"error: the distributed run failed ({type(exc).__name__}: {exc})", err=True)
        raise typer.Exit(1) from None


def _resume_hint(folder: Path | None, again: tuple[int, str]) -> str:
    """How to continue a distributed run in `folder` (`again`: the launch's peers and
    multi-machine options); empty
    when this machine has no checkpoint of it yet, the run is complete, or another process
    holds it (a second launch refused by the first one's lock)."""
    from declora.reporting.rundir import launch_hint, lock_holder, read_record

    if folder is None or not any((folder / "checkpoints").glob("peer-*/round-*")):
        return ""
    try:
        complete = (read_record(folder) or {}).get("status") == "complete"
    except DecloraError:  # a damaged run.json: the hint still holds
        complete = False
    if complete or lock_holder(folder) is not None:
        return ""
    return launch_hint(folder, *again)


def _launch_stopped(
    exc: KeyboardInterrupt, folder: Path | None, again: tuple[int, str]
) -> NoReturn:
    """The launcher was stopped and stopped its peers: that is the run's outcome, whatever a
    peer recorded while its neighbours went. Recorded where the run directory holds run.json
    and no process holds the folder any more (peer 0's machine)."""
    from declora.reporting.rundir import failure_text, record_lost_run

    if folder is not None and folder.is_dir():
        record_lost_run(folder, failure_text(exc), over_failed=True)
    hint = _resume_hint(folder, again)
    _exit_stopped(exc, f"; {hint}" if hint else "")


def _peers_failed(exc: Exception, folder: Path | None, again: tuple[int, str]) -> NoReturn:
    """Say which peers ended and how (each one's own words are above), record it in the run
    directory when no peer could (the launcher stopped them all), and say how to continue."""
    from declora.reporting.rundir import record_lost_run

    what = f"the distributed run failed: {exc}"
    typer.echo(f"error: {what}; what each peer printed is above", err=True)
    if folder is not None and folder.is_dir():
        record_lost_run(folder, what)
    if hint := _resume_hint(folder, again):
        typer.echo(hint, err=True)
    raise typer.Exit(1) from None


def _launch_preflight(extra: list[str], peers: int, nnodes: str) -> Path | None:
    """On one machine, refuse in the launcher what every peer would refuse (a config error, a
    wrong process count, a baseline that needs no network, `declora run`'s arguments that do
    not go together, a run directory it would not write), before any process starts. Across
    machines the peers' handshake does it, so that every machine stops with the message
    instead of waiting for one that refused alone. Returns the run directory the peers will
    write (when the arguments name it; on every machine of a multi-machine run)."""
    from declora.reporting.rundir import RunDir
    from declora.runners.build import check_inputs
    from declora.runners.placement import refusal

    command = typer.main.get_command(app)
    try:
        params = command.commands["run"].make_context("run", list(extra)).params  # type: ignore[attr-defined]
    except (typer.Exit, typer.Abort):  # the peers say what made it stop
        return None
    except Exception as exc:  # a UsageError of the click that typer uses (its own copy, lately)
        message = getattr(exc, "format_message", None)
        if message is None:
            raise
        if nnodes != "1":
            return None  # every machine's peers say it (see above)
        raise DecloraError(
            f"`declora run` refuses the arguments the launcher passes on to it: {message()} "
            "(what `declora launch` does not take itself goes to every peer's `declora run`)"
        ) from None
    if nnodes != "1":
        return params.get("resume") or params.get("out")
    resume = params.get("resume")
    cfg, out = _run_config(
        params.get("config"), params.get("set_") or [], params.get("out"), resume, True
    )
    check_inputs(cfg)
    why = refusal(cfg, peers)
    if why:
        raise DecloraError(why)
    # the peers share this folder on one machine: a busy, non-empty or missing one is refused
    # here, before they load data and model to find it out (and print it once per peer)
    RunDir.preflight(out, overwrite=params["overwrite"], resume=resume is not None)
    return out


@app.command()
def sweep(
    grid: Annotated[
        list[str], typer.Option("--grid", "-g", help="key=v1,v2 (repeat for a product grid)")
    ],
    config: Annotated[Path | None, typer.Option("--config", "-c", help="base YAML")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", "-s", help="override a key in every cell")
    ] = None,
    seeds: Annotated[int, typer.Option(min=1, help="seeds 0..N-1 per grid point")] = 1,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="sweep directory")] = None,
    jobs: Annotated[int, typer.Option(min=1, help="cells run at the same time")] = 1,
) -> None:
    """Run a grid of configurations x seeds (resumable) and tabulate mean +- std over seeds."""
    from declora.runners.signals import stop_on_signals
    from declora.runners.sweep import parse_grid, run_sweep

    try:
        parsed = parse_grid(grid)
        target = out or Path("runs") / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
        _quiet_libraries()
        with stop_on_signals():  # a stop reaches the running cells, which record it
            res = run_sweep(
                config,
                parsed,
                list(range(seeds)),
                target,
                base_sets=set_ or [],
                jobs=jobs,
                echo=lambda m: typer.echo(m, err=True),
            )
    except KeyboardInterrupt as exc:  # the running cells were stopped, and recorded it
        _exit_stopped(exc, "; the same command continues the sweep")
    except DecloraError as exc:
        _fail(exc)
        return
    typer.echo(res["markdown"])
    typer.echo(f"results: {target / 'results.md'}, {target / 'results.csv'}")
    if res["failed"]:
        typer.echo(
            f"error: {len(res['failed'])} cell(s) failed: {', '.join(res['failed'])}", err=True
        )
        raise typer.Exit(1)


@app.command()
def topology(
    kind: Annotated[
        str, typer.Option(help="ring, complete, star, er, torus, exponential, regular, edges")
    ] = "ring",
    peers: Annotated[int, typer.Option(min=1)] = 10,
    mixing: Annotated[
        str, typer.Option(help="laplacian, metropolis, uniform, fedavg, identity")
    ] = "laplacian",
    p: Annotated[float, typer.Option(help="edge probability for er")] = 0.3,
    seed: Annotated[int, typer.Option()] = 0,
    degree: Annotated[int | None, typer.Option(help="degree for regular")] = None,
    edge_file: Annotated[str | None, typer.Option(help="edge list for kind=edges")] = None,
    matrix_file: Annotated[str | None, typer.Option(help="custom mixing matrix")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Print a graph's mixing matrix, degrees and spectral gap."""
    from declora.network.topology import build_topology, format_topology

    try:
        topo = build_topology(
            kind,
            peers,
            mixing,
            p=p,
            seed=seed,
            degree=degree,
            edge_file=edge_file,
            matrix_file=matrix_file,
        )
    except DecloraError as exc:
        _fail(exc)
        return
    typer.echo(json.dumps(topo.to_dict(), indent=2) if as_json else format_topology(topo))


@app.command()
def report(
    run_dirs: Annotated[
        list[Path], typer.Argument(help="one run directory, or several to compare")
    ],
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="several runs: where the comparison goes"),
    ] = None,
    evaluate: Annotated[
        bool,
        typer.Option(
            help="average the peers' saved adapters and evaluate that model (done "
            "automatically when a distributed run did not monitor it)"
        ),
    ] = False,
) -> None:
    """Print the summary table of a finished run, or compare several runs.

    Several runs: one table, the settings they differ in, and their plots, in `--out`."""
    from declora.reporting.compare import finished_summary
    from declora.reporting.report import table_text

    if out is not None and len(run_dirs) == 1:
        _fail(DecloraError("--out is for comparing several runs; one run's report is printed"))
    if len(run_dirs) > 1:
        from declora.reporting.compare import compare_runs

        target = out or Path("runs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
        try:
            done = compare_runs(run_dirs, target)
        except DecloraError as exc:
            _fail(exc)
            return
        typer.echo(done["table"])
        typer.echo(f"comparison: {target / 'compare.md'}")
        return
    run_dir = run_dirs[0]
    try:
        summary = finished_summary(run_dir)
        primary = (summary.get("columns") or ["accuracy"])[0]
        unmonitored = any(
            r["label"].endswith("(averaged model)") and r.get(primary) is None
            for r in summary["rows"]
        )
        if evaluate or unmonitored:
            _quiet_libraries()
            from declora.runners.posthoc import evaluate_average

            typer.echo("evaluating the average of the peers' adapters ...", err=True)
            done = evaluate_average(run_dir)
            typer.echo(done["table"])
            return
    except DecloraError as exc:
        _fail(exc)
        return
    typer.echo(table_text(summary["rows"], summary.get("columns")))


#: Which of a finished run's models `predict` and `export` use.
AdapterOption = Annotated[
    str | None,
    typer.Option(
        help="best-val, average or peer-<i> (default: the model the run's summary reports)"
    ),
]
BaselineOption = Annotated[
    str | None, typer.Option(help="a baseline's model instead, e.g. centralized")
]


@app.command()
def predict(
    run_dir: Annotated[Path, typer.Argument(help="a finished run directory")],
    texts: Annotated[
        list[str] | None,
        typer.Argument(help="texts to label (a classifier) or prompts to answer (a causal LM)"),
    ] = None,
    file: Annotated[
        Path | None,
        typer.Option(
            "--file", "-f", help="a .csv, .tsv, .json, .jsonl or .parquet table of inputs"
        ),
    ] = None,
    column: Annotated[
        str | None,
        typer.Option(
            help="the file's input column (default: the run's data.text_column; for a chat "
            "model, data.prompt_column)"
        ),
    ] = None,
    adapter: AdapterOption = None,
    baseline: BaselineOption = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="write the rows to a .jsonl, .json, .csv or .tsv file"),
    ] = None,
    max_new_tokens: Annotated[
        int | None,
        typer.Option(
            min=1, help="causal LM: answer length (default: the run's eval.max_new_tokens)"
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="inputs per forward pass")] = 32,
) -> None:
    """Label new texts, or answer new prompts, with a finished run's model.

    The run's base model and exported adapter, loaded by PEFT, fed as the run fed its data.

    Example: declora predict runs/demo "what a lovely day" --out labels.csv"""
    from declora.runners import predict as p

    try:
        if (texts and file is not None) or (not texts and file is None):
            raise DecloraError("give the inputs either as arguments or as --file, one of the two")
        if out is not None:
            p.check_output_path(out)
        # every mistake is said before the model loads
        cfg, _ = p.locate(run_dir, adapter, baseline)
        d, causal = cfg.data, cfg.task == "causal-lm"
        pairs = None
        if file is not None:
            chat = causal and d.name != "text"
            col = column or (d.prompt_column if chat else d.text_column)
            texts, pairs = p.read_inputs(file, col, None if causal else d.text_pair_column)
        elif d.text_pair_column is not None and not causal:
            raise DecloraError(
                "this run classifies pairs of texts: give them with --file, in the columns "
                f"{d.text_column!r} and {d.text_pair_column!r}"
            )
        _quiet_libraries()
        model = p.load_predictor(run_dir, adapter, baseline)
        typer.echo(f"model: {model.cfg.model.name} + {model.adapter}", err=True)
        rows = p.predict_rows(model, list(texts or []), pairs, max_new_tokens, batch_size)
        if out is not None:
            typer.echo(f"{len(rows)} rows: {p.write_predictions(out, rows)}", err=True)
            return
    except DecloraError as exc:
        _fail(exc)
        return
    for r in rows:
        if model.causal:
            typer.echo(f"{r['prompt']}\n  -> {r['answer']}")
        else:
            typer.echo(f"{r['label']}\t{r['probability']:.3f}\t{r['text']}")


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="a finished run directory")],
    out: Annotated[Path, typer.Argument(help="the folder the merged model goes to")],
    adapter: AdapterOption = None,
    baseline: BaselineOption = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing folder")] = False,
) -> None:
    """Merge a finished run's adapter into its base model and save a plain transformers model.

    It loads with transformers alone (pipelines too), tokenizer and label names included.

    Example: declora export runs/demo models/demo-merged"""
    from declora.runners import predict as p

    try:
        p.check_merge_target(out, overwrite)
        cfg, _ = p.locate(run_dir, adapter, baseline)
        p.check_mergeable(cfg)  # every mistake is said before the model loads
        _quiet_libraries()
        model = p.load_predictor(run_dir, adapter, baseline)
        done = p.merge(model, out, overwrite)
    except DecloraError as exc:
        _fail(exc)
        return
    typer.echo(f"{model.cfg.model.name} + {model.adapter}, merged: {done}")


@app.command()
def algorithms() -> None:
    """List the algorithms `algorithm.name` and `baselines` accept, with what each does."""
    from declora.algorithms import algorithm_class, names

    rows = []
    for name in names():
        cls = algorithm_class(name)
        traits = []
        if cls.gossips:
            traits.append("gossips with graph neighbours")
        if cls.server_average:
            traits.append("exact average (all-reduce on real peers)")
        if cls.single_process:
            traits.append("no network: `declora run` only")
        if cls.exact_messages_only:
            traits.append("exact messages only")
        if cls.needs_lora_factors:
            traits.append("LoRA factors only")
        if cls.mixing_rule != "average":
            traits.append(f"combine: {cls.mixing_rule}")
        doc = " ".join((sys.modules[cls.__module__].__doc__ or "").split("\n\n")[0].split())
        doc = doc if len(doc) <= 88 else doc[:87].rsplit(" ", 1)[0] + " ..."
        rows.append(f"{name:<12} {cls.label:<18} {'; '.join(traits)}\n{'':<13}{doc}")
    typer.echo("\n".join(rows))


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
