"""Typed schema of the `python -m trainers.ppo` config tree, registered in Hydra's ConfigStore.

Every YAML under conf/ and recipes/ is validated against these dataclasses at compose time, so a
typo or an invalid choice fails before any engine starts, naming the key and the allowed values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from rollout.config import DEFAULT_LORA_MODULES, AdapterConfig, EngineKind, RolloutConfig
from rollout.transfer.config import coerce_enum
from trainers.distributed.cluster import RayConfig


class Algorithm(str, Enum):
    grpo = "grpo"  # n samples per prompt, group-relative advantages, no critic
    ppo = "ppo"  # value model + GAE


class KLEstimator(str, Enum):
    k1 = "k1"  # log(pi / ref): unbiased, can be negative per token
    k3 = "k3"  # ref/pi - log(ref/pi) - 1: unbiased, always >= 0


class TaskName(str, Enum):
    toy = (
        "toy"  # a+b= with single-digit operands, partial credit by distance (the embedded default)
    )
    gsm8k = "gsm8k"  # GSM8K-style word problems from a local json/jsonl/parquet file


def _positive(key: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{key} must be > 0, got {value!r}")


@dataclass
class LoraConfig:
    """`model.lora`: train a LoRA adapter (PEFT) on the frozen base model instead of the whole model;
    every refit then moves only the adapter (trainers/lora.py). `rank: null` = full fine-tuning."""

    rank: Optional[int] = None
    alpha: Optional[float] = None  # null: 2 x rank
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_MODULES))
    # the adapter's learning rate is algorithm.lr x lr_scale (LoRA wants a larger step than the
    # full model); the warm-start trains the base at trainer.warmup_lr, unscaled
    lr_scale: float = 10.0

    def __post_init__(self) -> None:
        if self.rank is None:
            return
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"model.lora.rank must be an integer >= 1 or null, got {self.rank!r}")
        self.alpha = 2.0 * self.rank if self.alpha is None else self.alpha
        if not self.alpha > 0 or not 0 <= self.dropout < 1 or not self.lr_scale > 0:
            raise ValueError(
                "model.lora.alpha and model.lora.lr_scale must be > 0 and model.lora.dropout in "
                f"[0, 1), got {self.alpha!r}, {self.lr_scale!r}, {self.dropout!r}"
            )
        if not self.target_modules:
            raise ValueError("model.lora.target_modules must name at least one module")

    @property
    def enabled(self) -> bool:
        return self.rank is not None


@dataclass
class ModelConfig:
    """`model.path`: any Hugging Face model directory; null builds and caches the embedded tiny model."""

    path: Optional[str] = None
    cache_dir: str = "~/.cache/refit"
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class AlgorithmConfig:
    """The `algorithm` node: the objective and its optimizer (the `algorithm` group: grpo | ppo)."""

    name: Algorithm = Algorithm.grpo
    num_samples: int = 16  # responses per prompt (GRPO's group size)
    temperature: float = 1.0
    lr: float = 5e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    clip_eps: float = 0.2
    num_epochs: int = 1  # passes over each step's rollouts
    num_minibatches: int = 4  # optimizer steps per pass; > 1 makes the clip bite
    entropy_coef: float = 0.0
    kl_coef: float = (
        0.001  # penalty to the frozen reference (the policy after the warm-start); 0 = no reference
    )
    kl_estimator: KLEstimator = KLEstimator.k3
    scale_adv_by_std: bool = True  # GRPO: divide by the group's std
    # Truncated importance sampling: weight each token's PG term by min(pi_trainer / pi_sampler, tis_cap),
    # the correction for samples from older weights (trainer.max_staleness > 0). null = off.
    tis_cap: Optional[float] = None
    # PPO only: the critic (a separate copy of the model with a scalar head) and GAE.
    critic_lr: float = 1e-3
    value_clip: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95

    def __post_init__(self) -> None:
        self.name = coerce_enum(Algorithm, self.name, "algorithm.name")
        self.kl_estimator = coerce_enum(KLEstimator, self.kl_estimator, "algorithm.kl_estimator")
        if self.name is Algorithm.grpo and self.num_samples < 2:
            raise ValueError(
                f"algorithm=grpo needs algorithm.num_samples >= 2 (a group), got {self.num_samples!r}"
            )
        if self.num_samples < 1 or self.num_epochs < 1 or self.num_minibatches < 1:
            raise ValueError("algorithm.num_samples, num_epochs and num_minibatches must be >= 1")
        for key in ("temperature", "lr", "critic_lr", "clip_eps", "max_grad_norm", "value_clip"):
            _positive(f"algorithm.{key}", getattr(self, key))
        if self.tis_cap is not None and not self.tis_cap > 0:
            raise ValueError(f"algorithm.tis_cap must be > 0 (or null: off), got {self.tis_cap!r}")
        if self.kl_coef < 0 or self.entropy_coef < 0:
            raise ValueError("algorithm.kl_coef and algorithm.entropy_coef must be >= 0")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ValueError(
                f"algorithm.gamma and algorithm.lam must be in [0, 1], got {self.gamma!r}, {self.lam!r}"
            )


@dataclass
class TaskConfig:
    """The `task` node: which prompts, how long an answer may be, and the reward (`_target_`)."""

    name: TaskName = TaskName.toy
    max_operand: int = 5  # toy: operands 0..max_operand
    data_path: Optional[str] = None  # gsm8k: a local .json / .jsonl / .parquet file
    question_key: str = "question"
    answer_key: str = "answer"
    prompt_template: str = "{question}"
    num_eval_prompts: int = 36
    max_tokens: int = 4
    # A `_target_` node that builds a callable (response: str, answer: str) -> float in [0, 1] (trainers/rewards.py).
    reward: Any = field(default_factory=lambda: {"_target_": "trainers.rewards.AdditionReward"})

    def __post_init__(self) -> None:
        self.name = coerce_enum(TaskName, self.name, "task.name")
        if self.max_tokens < 1 or self.num_eval_prompts < 1 or self.max_operand < 0:
            raise ValueError(
                "task.max_tokens and task.num_eval_prompts must be >= 1, task.max_operand >= 0"
            )
        if not isinstance(self.reward, dict) or "_target_" not in self.reward:
            raise ValueError(
                f"task.reward must be a node with a _target_ (a reward callable), got {self.reward!r}"
            )


@dataclass
class TrainerConfig:
    """The `trainer` node: the loop's length, batch shape, refit cadence, warm-start and checkpoints."""

    total_steps: int = 80
    seed: int = 0
    prompts_per_step: int = 32
    refit_every: int = (
        1  # update_weights every k steps; in between the engine samples with stale weights
    )
    # k >= 1: the engine (rollout.engine=async) generates the next k steps' batches while the trainer
    # trains; no sample more than k versions old is trained on. 0 = generate, then train (synchronous).
    max_staleness: int = 0
    # The refit canary (trainers/refit_canary.py): logprob_gap above this right after a refit warns, or fails
    # the run with strict_refit. None = by dtype: 1e-3 where engine and trainer run fp32, 2e-2 otherwise.
    refit_gap_threshold: Optional[float] = None
    strict_refit: bool = False
    micro_batch_size: int = (
        0  # sequences per forward/backward (gradients accumulate); 0 = a whole minibatch
    )
    warmup_steps: int = 10  # supervised warm-start steps before RL (0 = none)
    warmup_lr: float = 3e-3
    warmup_batch_size: int = 64
    eval_samples: int = 4  # samples per eval prompt for the pre-RL baseline and the final eval
    # Also at the last step and on a SIGINT / SIGTERM (trainers/interrupts.py); 0 = only then.
    checkpoint_every: int = 20
    resume: Optional[str] = None  # a checkpoint file (or its directory) to continue from
    out_dir: Optional[str] = None  # null = Hydra's run directory
    device: str = "auto"  # the trainer's device; auto = the rollout backend's (cpu, cuda, npu)
    # Trainer ranks: 1 = this process alone (no Ray); N > 1 = N Ray actors sharding the models with FSDP2
    # (see the `ray` node). Each minibatch's rows must be a multiple of N.
    num_workers: int = 1
    # torch threads of the trainer process (0 = torch's default). 1 by default: on a small CPU host the
    # trainer shares the cores with vLLM's worker, and oversubscribed OpenMP threads slowed steps ~10x.
    num_threads: int = 1

    def __post_init__(self) -> None:
        for key in (
            "total_steps",
            "micro_batch_size",
            "warmup_steps",
            "checkpoint_every",
            "num_threads",
            "max_staleness",
        ):
            if getattr(self, key) < 0:
                raise ValueError(f"trainer.{key} must be >= 0, got {getattr(self, key)!r}")
        for key in (
            "prompts_per_step",
            "refit_every",
            "warmup_batch_size",
            "eval_samples",
            "num_workers",
        ):
            if getattr(self, key) < 1:
                raise ValueError(f"trainer.{key} must be >= 1, got {getattr(self, key)!r}")
        if self.max_staleness > 0 and self.refit_every != 1:
            raise ValueError(
                f"trainer.max_staleness={self.max_staleness} bounds staleness by refitting after every "
                f"step: set trainer.refit_every=1 (got {self.refit_every!r})"
            )
        if self.refit_gap_threshold is not None and not self.refit_gap_threshold > 0:
            raise ValueError(
                f"trainer.refit_gap_threshold must be > 0 (or null), got {self.refit_gap_threshold!r}"
            )


@dataclass
class ConsoleLoggerConfig:
    progress_bar: bool = True


@dataclass
class JsonlLoggerConfig:
    filename: str = "metrics.jsonl"


@dataclass
class TensorboardLoggerConfig:
    subdir: str = "tensorboard"


@dataclass
class WandbLoggerConfig:
    project: str = "refit"
    entity: Optional[str] = None
    name: Optional[str] = None
    mode: str = "online"  # online | offline | disabled


@dataclass
class LoggerConfig:
    """The `logger` node: each selected option of the `logger` group fills its own key (null = off)."""

    console: Optional[ConsoleLoggerConfig] = None
    jsonl: Optional[JsonlLoggerConfig] = None
    tensorboard: Optional[TensorboardLoggerConfig] = None
    wandb: Optional[WandbLoggerConfig] = None


@dataclass
class PPOConfig:
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    ray: RayConfig = field(default_factory=RayConfig)  # used only when trainer.num_workers > 1

    def __post_init__(self) -> None:
        if self.trainer.max_staleness > 0 and self.rollout.engine is not EngineKind("async"):
            raise ValueError(
                f"trainer.max_staleness={self.trainer.max_staleness} needs rollout.engine=async "
                f"(got {self.rollout.engine.value}: the sync engine cannot generate while the trainer trains)"
            )
        self._check_lora()

    def _check_lora(self) -> None:
        """model.lora sets the engine's adapter (rollout.adapter): the shape every refit installs."""
        lora, ro = self.model.lora, self.rollout
        if not lora.enabled:
            if ro.adapter is not None:
                raise ValueError(
                    "rollout.adapter is set from model.lora: set model.lora.rank (and leave "
                    "rollout.adapter null) to train a LoRA adapter"
                )
            return
        if self.trainer.num_workers > 1:
            raise ValueError(
                f"model.lora.rank={lora.rank} with trainer.num_workers={self.trainer.num_workers}: "
                "LoRA trains in one process for now (set trainer.num_workers=1)"
            )
        if ro.adapter is None:
            ro.adapter = AdapterConfig(
                lora.rank, lora.alpha, list(lora.target_modules), self.trainer.max_staleness + 1
            )
        ro.check_adapter()  # the engine's side: the engines and settings it supports


def _schema_child(tp: Any, key: str) -> Any:
    """The type under `key` of the dataclass `tp` (Optional unwrapped); KeyError if it has none."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(tp)
    if key not in {f.name for f in dataclasses.fields(tp)}:
        raise KeyError(key)
    child = hints[key]
    args = [a for a in typing.get_args(child) if a is not type(None)]
    if typing.get_origin(child) is typing.Union and len(args) == 1:
        child = args[0]
    return child


def _schema_keys(tp: Any, prefix: str = "") -> list[str]:
    """Every dotted key of the dataclass `tp`, nested ones included."""
    import dataclasses

    keys = []
    for f in dataclasses.fields(tp):
        key, child = f"{prefix}{f.name}", _schema_child(tp, f.name)
        keys.append(key)
        if dataclasses.is_dataclass(child):
            keys += _schema_keys(child, key + ".")
    return keys


def check_override_keys(overrides: list[str], groups: set[str]) -> None:
    """Command-line `key=value` overrides name keys of the schema: an unknown one (a typo, or Hydra's
    suggested `+key=`, which would add a key nothing reads) fails before anything starts, naming the
    closest keys. Config-group choices (`groups`: `model=tiny`, `rollout/backend=vllm_gpu`), `hydra.*`
    keys and keys below a free-form node (a dict, a list) are left to Hydra."""
    import dataclasses
    import difflib

    from hydra.core.override_parser.overrides_parser import OverridesParser

    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        if key in groups or "/" in key or key.split(".")[0] == "hydra" or override.package:
            continue
        node: Any = PPOConfig
        for depth, part in enumerate(key.split(".")):
            if not dataclasses.is_dataclass(node):
                break  # a dict, a list or a value: Hydra and OmegaConf check it
            try:
                node = _schema_child(node, part)
            except KeyError:
                prefix = ".".join(key.split(".")[:depth])
                names = [f.name for f in dataclasses.fields(node)]
                rest = key.split(".")[depth + 1 :]
                close = [
                    ".".join([*key.split(".")[:depth], c, *rest])
                    for c in difflib.get_close_matches(part, names, n=2, cutoff=0.6)
                ]
                close = close or [
                    k for k in _schema_keys(PPOConfig) if k.rsplit(".", 1)[-1] == part
                ]
                hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
                raise ValueError(
                    f"unknown config key {key!r} (command line: {override.input_line!r}){hint} "
                    f"The keys of {prefix or 'the config'}: {', '.join(names)}"
                ) from None


def register_configs() -> None:
    ConfigStore.instance().store(name="ppo_schema", node=PPOConfig)


def to_typed(cfg: DictConfig) -> PPOConfig:
    """Convert a composed DictConfig into dataclasses, running every `__post_init__` check."""
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]
