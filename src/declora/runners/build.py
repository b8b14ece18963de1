"""One way to build a run, for both run modes: all peers in this process (`declora run`) or
peer i of n in its own process (torchrun / `declora launch`).

`prepare` loads and checks everything that can fail because of user input (data, graph,
partition, model) before any run directory exists; `build_algorithm` then makes one algorithm's
parts from the config: plan, engine, evaluator, communicator, what is sent, checkpointing. The
simulation and the peer process differ only in the `PeerSide` they pass: none (every peer here)
or this process's place in the group.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from declora.algorithms import Algorithm, make_algorithm
from declora.config.schema import RunConfig, hetero_rule, peer_ranks
from declora.data.causal_lm import (
    LMData,
    check_lm_dataset_source,
    generation_prompts,
    load_lm_data,
    pack_text,
    tokenize_chat,
)
from declora.data.classification import (
    TextClassificationData,
    check_dataset_source,
    load_classification_data,
)
from declora.data.partition import label_counts, partition
from declora.engine.batched import BatchedEngine
from declora.engine.checkpoint import fingerprint_of
from declora.engine.plan import Plan
from declora.engine.privacy import DPSGD, Calibration, PrivacyLedger, calibrate, require_opacus
from declora.engine.round_loop import (
    Checkpointing,
    Communicator,
    Engine,
    EvaluatorLike,
    LoopParts,
    LoopSettings,
)
from declora.errors import ConfigError, DataError
from declora.model.adapters import AdapterSpec, OptimSettings, initial_state, ranked_spec
from declora.model.dropout import set_dropout
from declora.model.peft_methods import method_spec
from declora.network.attacks import Attack
from declora.network.compress import Compressor, make_compressor
from declora.network.compressed import ChocoGossip, CompressedGossip
from declora.network.hetero import HeteroGossip
from declora.network.mixing import DecafGossip, decaf_mix
from declora.network.overlap import OverlappedGossip
from declora.network.robust import RobustGossip, check_graph, compressed_for, rule_of
from declora.network.schedules import Schedule, make_schedule
from declora.network.simulated import SimulatedGossip
from declora.network.topology import Topology, build_topology
from declora.tasks.evaluate import Evaluator, ValidationEvaluator
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
    val_examples: list[Example] = field(default_factory=list)  # empty: no data.val_size

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
    topology = build_topology(
        t.kind,
        t.peers,
        t.mixing,
        p=t.p,
        seed=cfg.seed if t.seed is None else t.seed,
        degree=t.degree,
        edge_file=t.edge_file,
        matrix_file=t.matrix_file,
    )
    check_graph(cfg, topology.degrees)  # a robust rule's trimming needs enough neighbours
    return topology


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


def _source_options(cfg: RunConfig, *keys: str) -> dict[str, Any]:
    """The data.* keys every loader takes, plus the named task-specific ones."""
    common = ("path", "test_path", "text_column", "group_column", "test_size", "split_seed")
    common += ("max_train_examples", "max_test_examples")
    return {k: getattr(cfg.data, k) for k in (*common, *keys)}


def check_inputs(cfg: RunConfig) -> None:
    """Refuse a data source or model that cannot be read as configured (an unknown name, a
    missing or ignored path, a folder that is not a model, a hub id neither cached nor
    reachable). Cheap (reading no file; a hub id costs one probe of the hub), so callers do it
    before they announce a run; the loaders make the same checks."""
    from declora.model.causal_lm import check_causal_model_name
    from declora.model.classifier import OFFLINE_CLASSIFIERS, resolve_model
    from declora.model.loading import hub_options

    d = cfg.data
    if cfg.task == "causal-lm":
        check_lm_dataset_source(d.name, d.path, d.test_path, d.group_column)
        check_causal_model_name(cfg.model.name)
    else:
        check_dataset_source(d.name, d.path, d.test_path)
        hub_options(resolve_model(cfg.model.name), OFFLINE_CLASSIFIERS)


def load_data(cfg: RunConfig) -> TextClassificationData:
    opts = _source_options(cfg, "text_pair_column", "label_column", "val_size")
    return load_classification_data(cfg.data.name, **opts)


def load_lm(cfg: RunConfig) -> LMData:
    if cfg.data.val_size is not None:
        raise ConfigError("data.val_size is for classification; causal-lm has no validation split")
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
    if cfg.privacy.on:
        require_opacus()  # a missing extra stops the run before any work
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
    set_dropout(model, m.dropout)
    spec = method_spec(model, cfg)
    init = initial_state(model, spec, cfg.seed)
    ml = cfg.data.max_length
    train_ex, cut_train = tokenize_classification(
        tokenizer, data.train_text, data.train_text_pair, data.train_labels, ml
    )
    test_ex, cut_test = tokenize_classification(
        tokenizer, data.test_text, data.test_text_pair, data.test_labels, ml
    )
    truncated = {"train": cut_train, "test": cut_test}
    val_ex: list[Example] = []
    if data.val_labels is not None and data.val_text is not None:
        val_ex, truncated["val"] = tokenize_classification(
            tokenizer, data.val_text, data.val_text_pair, data.val_labels, ml
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
        truncated,
        counts=label_counts(data.train_labels, parts, data.num_classes),
        schedule=schedule,
        val_examples=val_ex,
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
    set_dropout(model, m.dropout)
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


def make_evaluator(
    prep: Prepared,
    peers: list[int] | None = None,
    *,
    best_path: Path | None = None,
    resume: bool = False,
) -> EvaluatorLike:
    """The held-out scorer; with `data.val_size`, rounds are scored on validation and test
    once at the end (`best_path` keeps the best-validation adapters across a resume)."""
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
    common: dict[str, Any] = dict(
        binary_f1=prep.data.binary_f1,
        batch_size=e.batch_size,
        max_examples=e.max_examples,
        final_max_examples=e.final_max_examples,
        peer_max_examples=e.peer_max_examples,
        seed=cfg.data.split_seed,
        label_mix=label_mix(prep.counts, peers),
    )
    if prep.val_examples:
        return ValidationEvaluator(
            prep.val_examples,
            prep.test_examples,
            prep.data.num_classes,
            best_path=best_path,
            resume=resume,
            final_test=e.final_test,
            **common,
        )
    return Evaluator(prep.test_examples, prep.data.num_classes, **common)


def label_mix(counts: np.ndarray, peers: list[int] | None) -> np.ndarray | None:
    """Each peer's class proportions in its training share (rows: `peers`, all by default):
    what its own model is scored on for the personalized metric."""
    if counts.size == 0:
        return None
    rows = counts if peers is None else counts[peers]
    totals = rows.sum(axis=1, keepdims=True)
    return rows / np.maximum(totals, 1)


def averaged_export(
    cfg: RunConfig, spec: AdapterSpec, values: dict[str, torch.Tensor]
) -> tuple[AdapterSpec, dict[str, torch.Tensor]]:
    """The averaged adapter as written to adapters/average: the mean factors (at the largest
    rank), or with `export.rank` k the truncated SVD of each layer's B A at rank k (computed
    through the low-rank core, split B = U S, A = V^T; same scale alpha / r)."""
    k = cfg.export.rank
    if k is None or not spec.lora_modules:
        return spec, values
    one = {name: v.unsqueeze(0) for name, v in values.items()}
    mixed = decaf_mix(one, np.ones((1, 1)), spec.lora_modules, k, method="lowrank")
    return ranked_spec(spec, k), {name: v[0] for name, v in mixed.items()}


def plan_ranks(cfg: RunConfig, n: int, rank: int | None = None) -> tuple[int, ...] | None:
    """The LoRA ranks of a plan's peers (`lora.ranks`): every peer's, peer `rank`'s alone in
    its own process, or the largest for a one-model plan (centralized); None: all at lora.r."""
    ranks = peer_ranks(cfg)
    if ranks is None:
        return None
    if rank is not None:
        return (ranks[rank],)
    return ranks if n == len(ranks) else (max(ranks),) * n


def make_engine(
    prep: Prepared,
    plan: Plan,
    ranks: tuple[int, ...] | None = None,
    privacy: DPSGD | None = None,
) -> Engine:
    """The engine of a plan's peers; `privacy` makes its steps DP-SGD steps (batched only)."""
    t = prep.cfg.train
    n_peers, batch_size = plan.n, plan.batch_size
    kwargs: dict[str, Any] = dict(peer_weights=plan.weights.tolist(), **asdict(OptimSettings.of(t)))
    if ranks is not None:
        kwargs["ranks"] = list(ranks)
    if t.engine == "reference" or prep.spec.method != "lora":  # other PEFT methods: PEFT's own
        from declora.engine.reference import ReferenceEngine  # (imports PEFT: 2-3 s)

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
        length_sort=t.length_sort,
        privacy=privacy,
        **kwargs,
    )


def calibration_of(cfg: RunConfig, plan: Plan) -> Calibration | None:
    """The DP-SGD noise of every peer of `plan` (privacy.*), None without DP: each peer's own
    data size N_i gives its sample rate batch_size / N_i and default delta 1 / N_i."""
    if not cfg.privacy.on:
        return None
    steps = cfg.train.rounds * cfg.train.local_steps
    sizes = [len(p) for p in plan.parts]
    return calibrate(cfg.privacy, sizes, plan.batch_size, steps, cfg.seed)


def compressor_of(cfg: RunConfig) -> Compressor:
    """What one peer puts on the wire for one tensor, from `comm.*` (simulated or real)."""
    c = cfg.comm
    return make_compressor(c.bits, c.rounding, c.granularity, c.block_size, half=c.half)


def simulated_communicator(cfg: RunConfig, algorithm: Algorithm, plan: Plan) -> Communicator:
    """How the peers of a simulation combine what they receive, from the algorithm's mixing
    rule and `comm.*`. Only gossip is compressed; FedAvg's server averaging, local-only and
    centralized training stay exact (they send nothing or are not the object of study)."""
    c = cfg.comm
    rule = hetero_rule(cfg)
    if rule is not None and algorithm.gossips:  # lora.ranks: each peer at its own rank
        return HeteroGossip(plan.mixing, plan_ranks(cfg, plan.n) or (), rule)  # type: ignore[arg-type]
    if algorithm.mixing_rule == "product-svd":
        return DecafGossip(plan.mixing, rank=cfg.lora.r)
    attack, robust = attack_of(cfg, algorithm), rule_of(cfg) if algorithm.gossips else None
    if attack is not None or robust is not None:  # faults / robust rules: per-peer combine
        comp = None
        if not c.exact:
            comp = compressed_for(
                compressor_of(cfg), plan.mixing, error_feedback=c.error_feedback, seed=cfg.seed
            )
        return RobustGossip(plan.mixing, robust, attack, compressed=comp)
    if c.exact or not algorithm.gossips:
        return SimulatedGossip(plan.mixing)
    comp = compressor_of(cfg)
    if c.scheme == "choco":
        return ChocoGossip(plan.mixing, comp, gamma=c.gamma, seed=cfg.seed)
    return CompressedGossip(plan.mixing, comp, error_feedback=c.error_feedback, seed=cfg.seed)


def overlapped(
    cfg: RunConfig, algorithm: Algorithm, communicator: Communicator, background: bool
) -> Communicator:
    """With `comm.overlap`, a gossip algorithm's exchange runs during the local steps (one
    round stale, `declora.network.overlap`): in a background thread on real peers, deferred to
    the same arithmetic in simulation. Other algorithms stay synchronous."""
    if not cfg.comm.overlap or not algorithm.gossips:
        return communicator
    return OverlappedGossip(communicator, background=background)


def attack_of(cfg: RunConfig, algorithm: Algorithm) -> Attack | None:
    """The poisoned senders `faults.*` asks for: gossip algorithms only (the others send
    nothing to a neighbour, or average on a server)."""
    f = cfg.faults
    if not f.byzantine or f.attack is None or not algorithm.gossips:
        return None
    return Attack(f.attack, f.byzantine, cfg.seed, f.strength)


def checkpointing(
    cfg: RunConfig, root: Path, *, resume: bool, extra: object = None
) -> Checkpointing | None:
    """Checkpoint settings of a run (None when `train.checkpoint_every` is 0). The fingerprint
    ties a checkpoint to the configuration (all but the thread count) that wrote it: the keys
    set to other than their defaults, so a key that a later declora adds, with a default that
    changes nothing, leaves the run's checkpoints resumable."""
    every = cfg.train.checkpoint_every
    every = cfg.eval.every if every is None else every
    if every == 0:
        return None
    return Checkpointing(
        root,
        every,
        fingerprint_of([_fingerprinted(cfg.model_dump(mode="json", exclude_defaults=True)), extra]),
        keep=cfg.train.keep_checkpoints,
        resume=resume,
        also_accepted=(fingerprint_of([_legacy_fingerprinted(cfg), extra]),),
    )


def _fingerprinted(dumped: dict[str, Any]) -> dict[str, Any]:
    """A config dump without what may change between a run and its resume (the threads)."""
    dumped.get("train", {}).pop("threads", None)
    return dumped


def _legacy_fingerprinted(cfg: RunConfig) -> dict[str, Any]:
    """The whole configuration as declora fingerprinted it up to 2026-12-02, before
    comm.mix_momentum and comm.final_gossip existed: checkpoints written then still resume."""
    dumped = _fingerprinted(cfg.model_dump(mode="json"))
    for key in ("mix_momentum", "final_gossip"):  # keys added since: absent at their default
        if not getattr(cfg.comm, key):
            dumped["comm"].pop(key, None)
    return dumped


@dataclass
class PeerSide:
    """This process's place in a distributed run: which peer it holds and how it reaches the
    others. A simulation has none (every peer lives in the process)."""

    proc: Any  # declora.network.distributed.PeerProcess
    network: Any  # declora.network.distributed.PeerNetwork

    @property
    def rank(self) -> int:
        return int(self.proc.rank)


@dataclass
class AlgorithmRun:
    """One algorithm's parts, ready for the round loop, and how long it runs."""

    algorithm: Algorithm
    parts: LoopParts
    settings: LoopSettings

    @property
    def engine(self) -> Engine:
        return self.parts.engine

    @property
    def plan(self) -> Plan:
        return self.parts.plan

    @property
    def evaluator(self) -> EvaluatorLike:
        return self.parts.evaluator


def build_algorithm(
    prep: Prepared,
    name: str,
    checkpoint_root: Path,
    *,
    resume: bool = False,
    side: PeerSide | None = None,
) -> AlgorithmRun:
    """The parts of one algorithm's run from the config: in simulation (`side` None) every
    peer is here and the communicator is the stacked simulator; as peer i of n the engine
    holds one peer and the communicator is the torch.distributed transport with the same
    combine rule."""
    cfg = prep.cfg
    algorithm = make_algorithm(name, cfg)
    plan = algorithm.plan(prep.topology, prep.parts, cfg.train.batch_size, prep.schedule)
    keys = [k for k in prep.init if cfg.lora.mix_head or k.endswith((".lora_A", ".lora_B"))]
    mix_keys = algorithm.sent_keys(keys)
    settings = LoopSettings.of(
        cfg,
        n_peers=plan.n,
        lora_modules=prep.spec.lora_modules,
        gossip_steps=algorithm.gossip_steps(),
        final_gossip_steps=algorithm.final_gossip_steps(),
        lora_scale=prep.spec.scaling if prep.spec.lora_modules else 1.0,
    )
    ranks = plan_ranks(cfg, plan.n, None if side is None else side.rank)
    settings = replace(settings, ranks=ranks)
    cal = calibration_of(cfg, plan)
    ledger = None if cal is None else PrivacyLedger(cal)
    if side is None:
        secure = cfg.privacy.noise == "secure"  # auto: seeded in simulation
        dp = None if cal is None else DPSGD(cal, range(plan.n), secure=secure)
        parts = LoopParts(
            make_engine(prep, plan, ranks, dp),
            plan,
            make_evaluator(prep, best_path=checkpoint_root / "best_val.safetensors", resume=resume),
            overlapped(cfg, algorithm, simulated_communicator(cfg, algorithm, plan), False),
            mix_keys,
            checkpointing(cfg, checkpoint_root, resume=resume, extra=name),
            privacy=ledger,
        )
        return AlgorithmRun(algorithm, parts, settings)
    from declora.network import distributed as dd

    rank = side.rank
    secure = cfg.privacy.noise != "seeded"  # auto: secure on real peers
    dp = None if cal is None else DPSGD(cal, [rank], secure=secure)
    engine = dd.TimedEngine(make_engine(prep, plan.one_peer(rank), ranks, dp))
    evaluator = dd.MonitoredEvaluator(make_evaluator(prep, [rank]), side.network)
    c = cfg.comm
    communicator: Communicator
    if algorithm.server_average:
        communicator = dd.AllReduceAverage(
            side.proc, plan.mixing, timeout_s=max(c.timeout_s, dd.STARTUP_S)
        )
    else:
        communicator = dd.PeerGossip(
            rank,
            plan.mixing,
            compressor_of(cfg),
            scheme=c.scheme,
            error_feedback=c.error_feedback,
            gamma=c.gamma,
            seed=cfg.seed,
            timeout_s=c.timeout_s,
            on_failure=c.on_peer_failure,
            device=side.proc.device,
            rule=algorithm.mixing_rule,
            rank_r=cfg.lora.r,
            ranks=peer_ranks(cfg),
            hetero=hetero_rule(cfg),
        )
        communicator.attack = attack_of(cfg, algorithm)
        communicator.robust = rule_of(cfg)
    communicator = overlapped(cfg, algorithm, communicator, True)
    checkpoints = checkpointing(cfg, checkpoint_root, resume=resume, extra=[name, rank])
    parts = LoopParts(
        engine,
        plan,
        evaluator,
        communicator,
        mix_keys,
        checkpoints,
        [rank],
        side.network,
        privacy=ledger,
    )
    return AlgorithmRun(algorithm, parts, settings)
