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
from safetensors.torch import load_file

from declora.config.schema import load_config
from declora.errors import DecloraError
from declora.model.export import peft_key, save_peft_adapter
from declora.runners.rundir import RunDir


def peer_adapters(run: Path, canonical: list[str], spec: Any, n: int) -> list[dict]:
    """Every peer's adapter under canonical names; an error names what is missing."""
    names = {peft_key(spec, k): k for k in canonical}
    out = []
    for i in range(n):
        f = run / "adapters" / f"peer-{i}" / "adapter_model.safetensors"
        if not f.is_file():
            raise DecloraError(
                f"{str(run)!r} lacks peer {i}'s adapter ({f.relative_to(run)}); the averaged "
                f"model needs all {n} peers' adapters (copy them from the peers' machines)"
            )
        raw = load_file(str(f))
        missing = sorted(set(names) - set(raw))
        if missing:
            raise DecloraError(f"{f} has no tensor {missing[0]!r}; it is not this run's adapter")
        out.append({names[k]: raw[k] for k in names})
    return out


def evaluate_average(run_dir: str | Path) -> dict[str, Any]:
    """Average the peers' adapters of a run, evaluate, save, and update summary.json."""
    from declora.engine.round_loop import Plan
    from declora.reporting.report import table_text
    from declora.runners.simulate import make_engine, make_evaluator, prepare

    run = Path(run_dir)
    rd = RunDir(run)
    cfg = load_config(run / "config.yaml", [])
    prep = prepare(cfg)
    n = cfg.topology.peers
    adapters = peer_adapters(run, list(prep.init), prep.spec, n)
    avg = {k: torch.stack([a[k].float() for a in adapters]).mean(dim=0) for k in prep.init}
    plan = Plan("average", [np.arange(1)], np.eye(1), 1, np.zeros(1), np.ones(1))
    engine = make_engine(prep, plan)
    engine.load_stacked({k: v.unsqueeze(0) for k, v in avg.items()})
    evaluator = make_evaluator(prep)
    metrics = evaluator.average(engine, final=True)
    save_peft_adapter(
        run / "adapters" / "average", prep.spec, avg, prep.model_path, prep.peft_task_type
    )
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
