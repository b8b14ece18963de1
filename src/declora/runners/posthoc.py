"""The averaged model of a finished run, computed afterwards from the peers' saved adapters.

Distributed runs with `eval.monitor=false` (large runs) or `comm.on_peer_failure=skip` never
gather the model during training; `declora report DIR --evaluate` does it once at the end:
read every `adapters/peer-<i>/`, average each tensor (the paper's averaged model), evaluate it
on the run's held-out split, save it as `adapters/average/` and fill the summary's row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from declora.config.schema import load_config, peer_ranks
from declora.data.tables import one_line
from declora.errors import DecloraError
from declora.model.adapters import at_rank, average, padded
from declora.model.export import peft_key, save_peft_adapter
from declora.reporting.rundir import RunDir


def peer_adapters(
    run: Path,
    canonical: list[str],
    spec: Any,
    n: int,
    like: dict[str, torch.Tensor] | None = None,
    ranks: tuple[int, ...] | None = None,
) -> list[dict]:
    """Every peer's adapter under canonical names; an error names what is missing, unreadable
    or of another shape than `like` (this run's adapter: another rank, another model). With
    `ranks` (`lora.ranks`), peer i's adapter has rank ranks[i] and is zero-padded to spec.r."""
    names = {peft_key(spec, k): k for k in canonical}
    out = []
    full = like
    for i in range(n):
        if ranks is not None and full is not None:
            like = at_rank(full, ranks[i])
        f = run / "adapters" / f"peer-{i}" / "adapter_model.safetensors"
        if not f.is_file():
            raise DecloraError(
                f"{str(run)!r} lacks peer {i}'s adapter ({f.relative_to(run)}); the averaged "
                f"model needs all {n} peers' adapters (copy them from the peers' machines)"
            )
        try:
            raw = load_file(str(f))
        except (SafetensorError, OSError) as exc:
            raise DecloraError(
                f"{f} is not a readable safetensors file ({one_line(exc)}); copy peer {i}'s "
                "adapter again"
            ) from None
        missing = sorted(set(names) - set(raw))
        if missing:
            raise DecloraError(f"{f} has no tensor {missing[0]!r}; it is not this run's adapter")
        for key, name in names.items():
            want = None if like is None else tuple(like[name].shape)
            if want is not None and tuple(raw[key].shape) != want:
                raise DecloraError(
                    f"{f}: tensor {key!r} has shape {tuple(raw[key].shape)} where this run's "
                    f"adapter has {want} (another lora.r or model?); it is not this run's adapter"
                )
            if not bool(torch.isfinite(raw[key].float()).all()):
                raise DecloraError(f"{f}: tensor {key!r} holds non-finite values (NaN or inf)")
        got = {names[k]: raw[k] for k in names}
        out.append(got if ranks is None else padded(got, spec.r))
    return out


def evaluate_average(run_dir: str | Path) -> dict[str, Any]:
    """Average the peers' adapters of a run, evaluate, save, and update summary.json."""
    from declora.algorithms import make_algorithm
    from declora.reporting.report import table_text
    from declora.runners.build import make_engine, make_evaluator, prepare

    run = Path(run_dir)
    rd = RunDir(run)
    cfg = load_config(run / "config.yaml", [])
    prep = prepare(cfg)
    n = cfg.topology.peers
    ranks = peer_ranks(cfg)  # lora.ranks: each adapter at its true rank, padded to the largest
    adapters = peer_adapters(run, list(prep.init), prep.spec, n, like=prep.init, ranks=ranks)
    avg = average({k: torch.stack([a[k].float() for a in adapters]) for k in prep.init})
    # one model (the average) evaluated: centralized's plan over a single one-example share
    plan = make_algorithm("centralized", cfg).plan(prep.topology, [np.arange(1)], 1)
    engine = make_engine(prep, plan)
    engine.load_stacked({k: v.unsqueeze(0) for k, v in avg.items()})
    evaluator = make_evaluator(prep)
    metrics = evaluator.average(engine, final=True)
    where = run / "adapters" / "average"
    save_peft_adapter(where, prep.spec, avg, prep.model_path, prep.peft_task_type, model=prep.model)
    rd.write_json("average_metrics.json", {"peers": n, **metrics})
    summary_file = run / "summary.json"
    if summary_file.is_file():
        import json

        summary = json.loads(summary_file.read_text())
        for row in summary["rows"]:
            if row["label"].endswith("(averaged model)") and row.get("dir") == ".":
                row.update({c: metrics.get(c) for c in evaluator.columns})
        rd.write_json("summary.json", summary)
        return {"metrics": metrics, "table": table_text(summary["rows"], summary.get("columns"))}
    return {"metrics": metrics, "table": ""}
