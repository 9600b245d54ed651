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

from rollout.config import RolloutConfig
from rollout.transfer.config import _coerce


class Algorithm(str, Enum):
    grpo = "grpo"  # n samples per prompt, group-relative advantages, no critic
    ppo = "ppo"  # value model + GAE


@dataclass
class ModelConfig:
    """`model.path`: any Hugging Face model directory; null builds and caches the embedded tiny model."""

    path: Optional[str] = None
    cache_dir: str = "~/.cache/refit"


@dataclass
class AlgorithmConfig:
    name: Algorithm = Algorithm.grpo

    def __post_init__(self) -> None:
        self.name = _coerce(Algorithm, self.name, "algorithm.name")


@dataclass
class TaskConfig:
    name: str = "toy"


@dataclass
class TrainerConfig:
    total_steps: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        if self.total_steps < 0:
            raise ValueError(f"trainer.total_steps must be >= 0, got {self.total_steps!r}")


@dataclass
class LoggerConfig:
    console: Optional[dict[str, Any]] = None


@dataclass
class PPOConfig:
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


def register_configs() -> None:
    ConfigStore.instance().store(name="ppo_schema", node=PPOConfig)


def to_typed(cfg: DictConfig) -> PPOConfig:
    """Convert a composed DictConfig into dataclasses, running every `__post_init__` check."""
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]
