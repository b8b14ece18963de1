"""One `declora run`: check everything, then train the main algorithm and its baselines.

Everything that can fail because of user input (data, graph, partition, model) is checked in
`prepare` before the run directory is created.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from declora.config.schema import RunConfig
from declora.data.causal_lm import (
    LMData,
    generation_prompts,
    load_lm_data,
    pack_text,
    tokenize_chat,
)
from declora.data.classification import TextClassificationData, load_classification_data
from declora.data.partition import label_counts, partition, skew_summary
from declora.engine.batched import BatchedEngine
from declora.engine.reference import ReferenceEngine
from declora.engine.round_loop import (
    Checkpointing,
    Communicator,
    Engine,
    Evaluator,
    EvaluatorLike,
    Plan,
    Result,
    make_plan,
    train,
)
from declora.errors import ConfigError, DataError
from declora.model.adapters import AdapterSpec, initial_state
from declora.model.export import save_peft_adapter
from declora.model.peft_methods import check_method, method_spec
from declora.network.compress import Compressor, make_compressor
from declora.network.compressed import ChocoGossip, CompressedGossip
from declora.network.mixing import GOSSIP_ALGORITHMS, DecafGossip, mix_keys_for
from declora.network.schedules import Schedule, make_schedule
from declora.network.simulated import average
from declora.network.topology import Topology, build_topology
from declora.reporting import plots
from declora.reporting.report import summary_rows, write_report
from declora.runners.checkpoint import fingerprint_of
from declora.runners.rundir import RunDir
from declora.tasks.lm_eval import LMEvaluator
from declora.tasks.task import CausalLMTask, ClassificationTask, Example, Task
from declora.tasks.tokenize import tokenize_classification


@dataclass
class Prepared:
    """Everything a run needs, loaded and checked once and shared by all its algorithms."""

    cfg: RunConfig
    data: TextClassificationData | LMData
    topology: Topology
    parts: list[np.ndarray]
    model: torch.nn.Module
    model_path: str
    task: Task
    spec: AdapterSpec
    init: dict[str, torch.Tensor]
    train_examples: list[Example]
    test_examples: list[Example]
    truncated: dict[str, int]
    counts: np.ndarray = field(
        default_factory=lambda: np.zeros((0, 0), dtype=np.int64)
    )  # peer x class
    prompts: list[tuple[list[int], str]] = field(default_factory=list)
    samples: list[tuple[str, list[int]]] = field(default_factory=list)
    schedule: Schedule | None = None  # dynamic graph / availability of the gossip algorithms

    @property
    def causal(self) -> bool:
        return self.cfg.task == "causal-lm"

    @property
    def group_names(self) -> list[str]:
        """Names of what the partition splits on: classes, or categories for causal LM."""
        d = self.data
        return d.group_names if isinstance(d, LMData) else d.label_names

    @property
    def peft_task_type(self) -> str:
        return "CAUSAL_LM" if self.causal else "SEQ_CLS"


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


def schedule_from(cfg: RunConfig, topology: Topology) -> Schedule | None:
    """The per-round network (topology.dynamic, offline peers, stragglers); None when every
    round is the fixed topology with every peer online for K steps (the paper's setting)."""
    t = cfg.topology
    if t.dynamic == "static" and t.offline_prob == 0 and cfg.train.straggler_prob == 0:
        return None
    p = {"er-each-round": t.p, "random-pairs": t.pair_prob}.get(t.dynamic)
    return make_schedule(
        t.dynamic,
        t.peers,
        cfg.seed if t.seed is None else t.seed,
        p=p,
        offline_prob=t.offline_prob,
        straggler_prob=cfg.train.straggler_prob,
        base=topology,
        mixing_rule=t.mixing,
    )


def check_combinations(cfg: RunConfig) -> None:
    """Settings that are valid alone but not together, refused before any work.

    DeCAF with compressed messages is refused rather than half-supported: it would have to
    decode every neighbour's factors and refactor their products, which the compressed
    communicators do not do. CHOCO keeps copies of its neighbours' public values; when the graph
    changes or a peer is offline those copies would go stale at the peers that missed a message,
    which the simulation (one shared copy per peer) cannot show."""
    runs = {cfg.algorithm.name, *cfg.baselines}
    c, t = cfg.comm, cfg.topology
    method = getattr(cfg.lora, "method", "lora")
    follow_ups = sorted(runs & {"decaf", "ffa", "adf"})
    if follow_ups and method in ("ia3", "prompt-tuning"):
        raise ConfigError(
            f"algorithm {follow_ups[0]} works on LoRA's two factors; lora.method={method} has "
            "none (use algorithm.name=dec-lora, which mixes any adapter)"
        )
    if "decaf" in runs and not c.exact:
        raise ConfigError(
            f"algorithm decaf sends exact factors; comm.bits={c.bits}, comm.scheme={c.scheme} "
            "is not supported with it (use comm.bits=32 and comm.scheme=plain)"
        )
    changing = t.dynamic != "static" or t.offline_prob > 0
    if c.scheme == "choco" and changing and runs & {"dec-lora", "ffa", "adf"}:
        raise ConfigError(
            "comm.scheme=choco needs a fixed graph with every peer online (its copies of the "
            "neighbours' values would go stale); use comm.scheme=plain with topology.dynamic="
            f"{t.dynamic}, topology.offline_prob={t.offline_prob}"
        )


def _source_options(cfg: RunConfig, *keys: str) -> dict[str, Any]:
    """The data.* keys every loader takes, plus the named task-specific ones."""
    common = ("path", "test_path", "text_column", "group_column", "test_size", "split_seed")
    common += ("max_train_examples", "max_test_examples")
    return {k: getattr(cfg.data, k) for k in (*common, *keys)}


def load_data(cfg: RunConfig) -> TextClassificationData:
    opts = _source_options(cfg, "text_pair_column", "label_column")
    return load_classification_data(cfg.data.name, **opts)


def load_lm(cfg: RunConfig) -> LMData:
    opts = _source_options(cfg, "prompt_column", "response_column", "messages_column")
    return load_lm_data(cfg.data.name, **opts)


def split_over_peers(cfg: RunConfig, data: TextClassificationData | LMData) -> list[np.ndarray]:
    d = cfg.data
    if isinstance(data, LMData):
        groups = data.train_labels if len(data.group_names) > 1 else None
        what = "data.group_column (chatterbot has its categories)"
    else:
        groups = data.train_groups
        what = "data.group_column (e.g. a topic column)"
    if d.partition == "natural" and groups is None:
        raise ConfigError(f"data.partition=natural needs groups: set {what}")
    parts = partition(
        data.train_labels,
        cfg.topology.peers,
        d.partition,
        seed=cfg.seed,
        alpha=d.alpha,
        min_size=min(d.min_size, len(data.train_labels) // cfg.topology.peers or 1),
        proportions=d.proportions,
        groups=groups,
    )
    return parts


def prepare(cfg: RunConfig) -> Prepared:
    """Load and check data, graph, partition and model. Raises DecloraError on bad input."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    check_combinations(cfg)
    check_method(cfg)  # lora.method: refuse what it cannot do, pick the reference engine
    if cfg.task == "causal-lm":
        return prepare_causal(cfg)
    from declora.model.classifier import load_classifier

    topology = build_topology_from(cfg)
    schedule = schedule_from(cfg, topology)
    data = load_data(cfg)
    parts = split_over_peers(cfg, data)
    m = cfg.model
    model, tokenizer, path = load_classifier(
        m.name, data.label_names, cfg.seed, dtype=m.dtype, quantize=m.quantize
    )
    spec = method_spec(model, cfg)
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
        counts=label_counts(data.train_labels, parts, data.num_classes),
        schedule=schedule,
    )


def prepare_causal(cfg: RunConfig) -> Prepared:
    """The causal-LM counterpart of `prepare`: chat or text data, answer-token loss."""
    from declora.model.causal_lm import load_causal_lm

    topology = build_topology_from(cfg)
    schedule = schedule_from(cfg, topology)
    data = load_lm(cfg)
    parts = split_over_peers(cfg, data)
    m = cfg.model
    model, tokenizer, path = load_causal_lm(
        m.name, dtype=m.dtype, quantize=m.quantize, seed=cfg.seed
    )
    spec = method_spec(model, cfg)
    init = initial_state(model, spec, cfg.seed)
    ml = cfg.data.max_length
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and ml > limit:
        raise ConfigError(f"data.max_length={ml} exceeds what the model allows ({limit} tokens)")
    prompts: list[tuple[list[int], str]] = []
    doc_parts = parts
    if data.kind == "chat":
        train_ex, cut_train = tokenize_chat(tokenizer, data.train, ml)
        test_ex, cut_test = tokenize_chat(tokenizer, data.test, ml)
        prompts = generation_prompts(tokenizer, data.test, ml)
        truncated = {
            "train": cut_train["truncated"],
            "test": cut_test["truncated"],
            "train_dropped": cut_train["dropped"],
            "test_dropped": cut_test["dropped"],
        }
        if cut_train["dropped"]:  # keep the partition aligned with the kept examples
            raise DataError(
                f"{cut_train['dropped']} training conversations keep no answer token within "
                f"data.max_length={ml}; raise data.max_length"
            )
    else:  # each peer packs its own documents, so a block never mixes two peers' text
        doc_parts, parts, train_ex = parts, [], []
        for i, part in enumerate(doc_parts):
            try:
                blocks = pack_text(tokenizer, [data.train[j] for j in part], ml)
            except DataError as exc:
                raise DataError(f"peer {i}'s documents: {exc}") from None
            parts.append(np.arange(len(train_ex), len(train_ex) + len(blocks)))
            train_ex += blocks
        test_ex = pack_text(tokenizer, data.test, ml)
        truncated = {"train": 0, "test": 0}
    samples = []
    for q in cfg.eval.sample_prompts:
        conv = [{"role": "user", "content": q}, {"role": "assistant", "content": ""}]
        samples.append((q, generation_prompts(tokenizer, [conv], ml)[0][0]))
    return Prepared(
        cfg,
        data,
        topology,
        parts,
        model,
        path,
        CausalLMTask(tokenizer),
        spec,
        init,
        train_ex,
        test_ex,
        truncated,
        counts=label_counts(data.train_labels, doc_parts, len(data.group_names)),
        prompts=prompts,
        samples=samples,
        schedule=schedule,
    )


def make_evaluator(prep: Prepared) -> EvaluatorLike:
    cfg = prep.cfg
    e = cfg.eval
    if isinstance(prep.task, CausalLMTask):
        return LMEvaluator(
            prep.task,
            prep.test_examples,
            prep.prompts,
            batch_size=e.batch_size,
            max_examples=e.max_examples,
            final_max_examples=e.final_max_examples,
            peer_max_examples=e.peer_max_examples,
            generate_examples=e.generate_examples,
            max_new_tokens=e.max_new_tokens,
            samples=prep.samples,
            seed=cfg.data.split_seed,
        )
    assert isinstance(prep.data, TextClassificationData)
    return Evaluator(
        prep.test_examples,
        prep.data.num_classes,
        binary_f1=prep.data.binary_f1,
        batch_size=e.batch_size,
        max_examples=e.max_examples,
        final_max_examples=e.final_max_examples,
        peer_max_examples=e.peer_max_examples,
        seed=cfg.data.split_seed,
    )


def make_engine(prep: Prepared, plan: Plan) -> Engine:
    t = prep.cfg.train
    n_peers, batch_size = plan.n, plan.batch_size
    kwargs: dict[str, Any] = dict(
        peer_weights=plan.weights.tolist(),
        lr=t.lr,
        head_lr=t.head_lr,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optimizer=t.optimizer,
        momentum=t.momentum,
        schedule=t.schedule,
        total_steps=t.rounds * t.local_steps,
    )
    if t.engine == "reference" or prep.spec.method != "lora":  # other PEFT methods: PEFT's own
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


def compressor_of(cfg: RunConfig) -> Compressor:
    """What one peer puts on the wire for one tensor, from `comm.*` (simulated or real)."""
    c = cfg.comm
    return make_compressor(c.bits, c.rounding, c.granularity, c.block_size, half=c.half)


def make_gossip(cfg: RunConfig, plan: Plan) -> Communicator | None:
    """The communicator of a plan; None means exact fp32 mixing of the factors.

    DeCAF mixes products (always exact: see `check_combinations`). Only the gossip algorithms'
    neighbour exchange is compressed; FedAvg's server averaging, local-only and centralized
    training stay exact (they send nothing or are not the object of study)."""
    c = cfg.comm
    if plan.algorithm == "decaf":
        return DecafGossip(plan.mixing, rank=cfg.lora.r)
    if c.exact or plan.algorithm not in GOSSIP_ALGORITHMS:
        return None
    comp = compressor_of(cfg)
    if c.scheme == "choco":
        return ChocoGossip(plan.mixing, comp, gamma=c.gamma, seed=cfg.seed)
    return CompressedGossip(plan.mixing, comp, error_feedback=c.error_feedback, seed=cfg.seed)


def checkpointing(
    cfg: RunConfig, root: Path, *, resume: bool, extra: object = None
) -> Checkpointing | None:
    """Checkpoint settings of a run (None when `train.checkpoint_every` is 0). The fingerprint
    ties a checkpoint to the configuration (all but the thread count) that wrote it."""
    every = cfg.train.checkpoint_every
    every = cfg.eval.every if every is None else every
    if every == 0:
        return None
    resolved = cfg.model_dump(mode="json")
    resolved["train"].pop("threads", None)
    return Checkpointing(
        root,
        every,
        fingerprint_of([resolved, extra]),
        keep=cfg.train.keep_checkpoints,
        resume=resume,
    )


def loop_settings(prep: Prepared) -> dict[str, Any]:
    """The round loop's settings that every way of running it (simulated, one peer per
    process) takes from the config alike."""
    cfg = prep.cfg
    return {
        "rounds": cfg.train.rounds,
        "local_steps": cfg.train.local_steps,
        "seed": cfg.seed,
        "eval_every": cfg.eval.every,
        "lora_modules": prep.spec.lora_modules,
    }


def run_algorithm(
    prep: Prepared,
    algorithm: str,
    out: RunDir,
    *,
    export_peers: bool,
    progress: bool,
    resume: bool = False,
) -> Result:
    cfg = prep.cfg
    # every algorithm starts from the same RNG state (dropout masks), whatever ran before it
    torch.manual_seed(cfg.seed)
    plan = make_plan(
        algorithm,
        prep.topology,
        prep.parts,
        cfg.train.batch_size,
        cfg.train.peer_weighting,
        schedule=prep.schedule,
        period=cfg.algorithm.period,
        adf_start=cfg.algorithm.adf_start,
    )
    engine = make_engine(prep, plan)
    evaluator = make_evaluator(prep)
    keys = [k for k in prep.init if cfg.lora.mix_head or k.endswith((".lora_A", ".lora_B"))]
    mix_keys = mix_keys_for(algorithm, keys)  # FFA sends no A
    eval_peers = cfg.eval.peers if plan.n > 1 else "never"
    try:
        result = train(
            engine,
            plan,
            prep.train_examples,
            evaluator,
            **loop_settings(prep),
            eval_peers=eval_peers,
            on_record=out.append_metrics,
            progress=progress,
            mix_keys=mix_keys,
            gossip=make_gossip(cfg, plan),
            gossip_steps=cfg.comm.gossip_steps if algorithm in GOSSIP_ALGORITHMS else 1,
            checkpoints=checkpointing(
                cfg, out.path / "checkpoints", resume=resume, extra=algorithm
            ),
            on_restore=out.rewrite_metrics,
        )
    finally:
        remove = getattr(engine, "remove", None)
        prep.model = remove() if remove else prep.model
    kind = prep.peft_task_type
    save_peft_adapter(
        out.path / "adapters" / "average", prep.spec, average(result.final), prep.model_path, kind
    )
    if export_peers and plan.n > 1:
        for i in range(plan.n):
            values = {k: v[i] for k, v in result.final.items()}
            save_peft_adapter(
                out.path / "adapters" / f"peer-{i}", prep.spec, values, prep.model_path, kind
            )
    out.write_json("peer_metrics.json", result.peer_metrics)
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
    prep = prepare(cfg)
    rundir = RunDir.reopen(out) if resume else RunDir.create(out, overwrite=overwrite)
    try:
        results = _execute(prep, rundir, progress, resume)
    except BaseException as exc:
        rundir.set_status("failed", error=f"{type(exc).__name__}: {exc}"[:500])
        raise
    return rundir, results


def write_setup(rundir: RunDir, prep: Prepared) -> None:
    """What a run knows before training: resolved config, graph, data over peers, plots."""
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
    results: dict[str, Result] = {}
    main = cfg.algorithm.name
    results[main] = run_algorithm(
        prep, main, rundir, export_peers=True, progress=progress, resume=resume
    )
    for name in cfg.baselines:
        if name == main:
            continue
        sub = rundir.sub(f"baselines/{name}")
        results[name] = run_algorithm(
            prep, name, sub, export_peers=False, progress=progress, resume=resume
        )
    ev = make_evaluator(prep)
    rows = summary_rows(results, main, ev.columns, ev.primary, ev.higher_is_better)
    rundir.write_json(
        "summary.json",
        {"main": main, "task": cfg.task, "columns": list(ev.columns), "rows": rows},
    )
    write_report(rundir, prep, results, rows)
    rundir.set_status(
        "complete",
        machine=f"{platform.machine()}, {torch.get_num_threads()} threads",
        wall_seconds=round(sum(r.wall_seconds for r in results.values()), 1),
    )
    return results
