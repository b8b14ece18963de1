"""One `declora run`: check everything, then train the main algorithm and its baselines.

Everything that can fail because of user input (data, graph, partition, model) is checked in
`prepare` before the run directory is created.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from declora import plots
from declora.adapters import AdapterSpec, build_spec, initial_state
from declora.batched import BatchedEngine
from declora.compress import make_compressor
from declora.compressed_gossip import ChocoGossip, CompressedGossip
from declora.config import RunConfig
from declora.data import TextClassificationData, load_classification_data
from declora.errors import ConfigError
from declora.export import save_peft_adapter
from declora.features import tokenize_classification
from declora.gossip import average
from declora.partition import label_counts, partition, skew_summary
from declora.reference import ReferenceEngine
from declora.report import summary_rows, write_report
from declora.rundir import RunDir
from declora.task import ClassificationTask, Example
from declora.topology import Topology, build_topology
from declora.trainer import Communicator, Engine, Evaluator, Plan, Result, make_plan, train


@dataclass
class Prepared:
    """Everything a run needs, loaded and checked once and shared by all its algorithms."""

    cfg: RunConfig
    data: TextClassificationData
    topology: Topology
    parts: list[np.ndarray]
    model: torch.nn.Module
    model_path: str
    task: ClassificationTask
    spec: AdapterSpec
    init: dict[str, torch.Tensor]
    train_examples: list[Example]
    test_examples: list[Example]
    truncated: dict[str, int]


def build_topology_from(cfg: RunConfig) -> Topology:
    t = cfg.topology
    return build_topology(
        t.kind,
        t.peers,
        t.mixing,
        p=t.p,
        seed=cfg.seed if t.seed is None else t.seed,
        degree=t.degree,
        edge_file=t.edge_file,
        matrix_file=t.matrix_file,
    )


def load_data(cfg: RunConfig) -> TextClassificationData:
    d = cfg.data
    return load_classification_data(
        d.name,
        path=d.path,
        test_path=d.test_path,
        text_column=d.text_column,
        text_pair_column=d.text_pair_column,
        label_column=d.label_column,
        group_column=d.group_column,
        test_size=d.test_size,
        split_seed=d.split_seed,
        max_train_examples=d.max_train_examples,
        max_test_examples=d.max_test_examples,
    )


def split_over_peers(cfg: RunConfig, data: TextClassificationData) -> list[np.ndarray]:
    d = cfg.data
    if d.partition == "natural" and data.train_groups is None:
        raise ConfigError("data.partition=natural needs data.group_column (e.g. a topic column)")
    parts = partition(
        data.train_labels,
        cfg.topology.peers,
        d.partition,
        seed=cfg.seed,
        alpha=d.alpha,
        min_size=min(d.min_size, len(data.train_labels) // cfg.topology.peers or 1),
        proportions=d.proportions,
        groups=data.train_groups,
    )
    return parts


def prepare(cfg: RunConfig) -> Prepared:
    """Load and check data, graph, partition and model. Raises DecloraError on bad input."""
    from declora.models import load_classifier

    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    topology = build_topology_from(cfg)
    data = load_data(cfg)
    parts = split_over_peers(cfg, data)
    model, tokenizer, path = load_classifier(cfg.model.name, data.label_names, cfg.seed)
    lo = cfg.lora
    spec = build_spec(model, lo.targets, lo.r, lo.alpha, lo.dropout, lo.train_head)
    init = initial_state(model, spec, cfg.seed)
    ml = cfg.data.max_length
    train_ex, cut_train = tokenize_classification(
        tokenizer, data.train_text, data.train_text_pair, data.train_labels, ml
    )
    test_ex, cut_test = tokenize_classification(
        tokenizer, data.test_text, data.test_text_pair, data.test_labels, ml
    )
    return Prepared(
        cfg,
        data,
        topology,
        parts,
        model,
        path,
        ClassificationTask(tokenizer),
        spec,
        init,
        train_ex,
        test_ex,
        {"train": cut_train, "test": cut_test},
    )


def make_engine(prep: Prepared, n_peers: int, batch_size: int) -> Engine:
    t = prep.cfg.train
    kwargs: dict[str, Any] = dict(
        lr=t.lr,
        head_lr=t.head_lr,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optimizer=t.optimizer,
        momentum=t.momentum,
        schedule=t.schedule,
        total_steps=t.rounds * t.local_steps,
    )
    if t.engine == "reference":
        return ReferenceEngine(prep.model, prep.spec, n_peers, prep.init, prep.task, **kwargs)
    chunk = t.peer_chunk or max(1, t.max_pass_examples // batch_size)
    return BatchedEngine(
        prep.model,
        prep.spec,
        n_peers,
        prep.init,
        prep.task,
        peer_chunk=chunk,
        micro_batch=t.max_pass_examples,
        **kwargs,
    )


def make_gossip(cfg: RunConfig, plan: Plan) -> Communicator | None:
    """Compressed communication for gossip algorithms; None means exact fp32 mixing.

    Only Dec-LoRA's neighbour exchange is compressed; FedAvg's server averaging, local-only and
    centralized training stay exact (they send nothing or are not the object of study)."""
    c = cfg.comm
    if c.exact or plan.algorithm != "dec-lora":
        return None
    comp = make_compressor(c.bits, c.rounding, c.granularity, c.block_size, half=c.half)
    if c.scheme == "choco":
        return ChocoGossip(plan.mixing, comp, gamma=c.gamma, seed=cfg.seed)
    return CompressedGossip(plan.mixing, comp, error_feedback=c.error_feedback, seed=cfg.seed)


def run_algorithm(
    prep: Prepared, algorithm: str, out: RunDir, *, export_peers: bool, progress: bool
) -> Result:
    cfg = prep.cfg
    # every algorithm starts from the same RNG state (dropout masks), whatever ran before it
    torch.manual_seed(cfg.seed)
    plan = make_plan(algorithm, prep.topology, prep.parts, cfg.train.batch_size)
    engine = make_engine(prep, plan.n, plan.batch_size)
    evaluator = Evaluator(
        prep.test_examples,
        prep.data.num_classes,
        binary_f1=prep.data.binary_f1,
        batch_size=cfg.eval.batch_size,
        max_examples=cfg.eval.max_examples,
        final_max_examples=cfg.eval.final_max_examples,
        peer_max_examples=cfg.eval.peer_max_examples,
        seed=cfg.data.split_seed,
    )
    mix_keys = None
    if not cfg.lora.mix_head:
        mix_keys = {k for k in prep.init if k.endswith((".lora_A", ".lora_B"))}
    eval_peers = cfg.eval.peers if plan.n > 1 else "never"
    try:
        result = train(
            engine,
            plan,
            prep.train_examples,
            evaluator,
            rounds=cfg.train.rounds,
            local_steps=cfg.train.local_steps,
            seed=cfg.seed,
            eval_every=cfg.eval.every,
            eval_peers=eval_peers,
            lora_modules=prep.spec.lora_modules,
            on_record=out.append_metrics,
            progress=progress,
            mix_keys=mix_keys,
            gossip=make_gossip(cfg, plan),
        )
    finally:
        remove = getattr(engine, "remove", None)
        prep.model = remove() if remove else prep.model
    save_peft_adapter(
        out.path / "adapters" / "average", prep.spec, average(result.final), prep.model_path
    )
    if export_peers and plan.n > 1:
        for i in range(plan.n):
            values = {k: v[i] for k, v in result.final.items()}
            save_peft_adapter(
                out.path / "adapters" / f"peer-{i}", prep.spec, values, prep.model_path
            )
    out.write_json("peer_metrics.json", result.peer_metrics)
    return result


def execute(
    cfg: RunConfig, out: str | Path, *, overwrite: bool = False, progress: bool = True
) -> tuple[RunDir, dict[str, Result]]:
    """The whole run; returns the run directory and each algorithm's result."""
    prep = prepare(cfg)
    rundir = RunDir.create(out, overwrite=overwrite)
    try:
        results = _execute(prep, rundir, progress)
    except BaseException as exc:
        rundir.set_status("failed", error=f"{type(exc).__name__}: {exc}"[:500])
        raise
    return rundir, results


def _execute(prep: Prepared, rundir: RunDir, progress: bool) -> dict[str, Result]:
    cfg = prep.cfg
    rundir.write_text("config.yaml", cfg.to_yaml())
    rundir.write_json("topology.json", prep.topology.to_dict())
    counts = label_counts(prep.data.train_labels, prep.parts, prep.data.num_classes)
    rundir.write_json(
        "label_counts.json",
        {
            "label_names": prep.data.label_names,
            "counts": counts.tolist(),
            "skew": skew_summary(counts),
            "data": prep.data.summary(),
            "truncated_at_max_length": prep.truncated,
        },
    )
    plots.label_distribution(counts, prep.data.label_names, rundir.path / "label_distribution.png")
    plots.topology(
        prep.topology.graph,
        rundir.path / "topology.png",
        title=f"{prep.topology.kind}, {prep.topology.n} peers, "
        f"gap {prep.topology.spectral_gap:.3f}",
    )
    results: dict[str, Result] = {}
    main = cfg.algorithm.name
    results[main] = run_algorithm(prep, main, rundir, export_peers=True, progress=progress)
    for name in cfg.baselines:
        if name == main:
            continue
        sub = rundir.sub(f"baselines/{name}")
        results[name] = run_algorithm(prep, name, sub, export_peers=False, progress=progress)
    rows = summary_rows(results, main)
    rundir.write_json("summary.json", {"main": main, "rows": rows})
    write_report(rundir, prep, results, rows)
    rundir.set_status(
        "complete",
        machine=f"{platform.machine()}, {torch.get_num_threads()} threads",
        wall_seconds=round(sum(r.wall_seconds for r in results.values()), 1),
    )
    return results
