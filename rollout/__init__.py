"""The rollout side of refit: a live vLLM engine that generates versioned samples and takes refits.

`import rollout` stays light: vLLM is imported only when an engine is built.

Example:
    from rollout import RolloutConfig, build_rollout
    with build_rollout(RolloutConfig(), model_path) as ro:     # RolloutConfig() = vLLM on the CPU
        samples = ro.generate(prompts, n=4, max_tokens=32, temperature=1.0, seed=0)
        stats = ro.refit(1, send_tensors(model.named_parameters()))   # == ro.update_weights(params, 1)
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from rollout.api import (
    RefitEndpoint,
    RefitError,
    RefitPort,
    RefitStats,
    RolloutEngine,
    Sample,
    Send,
    send_tensors,
)
from rollout.config import (
    AdapterConfig,
    Backend,
    BackendConfig,
    CacheReset,
    EngineKind,
    Mode,
    PauseMode,
    RolloutConfig,
)

if TYPE_CHECKING:
    from rollout.async_engine import AsyncVllmRollout
    from rollout.engine import VllmRollout
    from rollout.engine_group import EngineGroup
    from rollout.vllm_backend.trainer import RefitTrainerInitInfo

__all__ = [
    "AdapterConfig",
    "AsyncVllmRollout",
    "Backend",
    "BackendConfig",
    "CacheReset",
    "EngineKind",
    "EngineGroup",
    "Mode",
    "PauseMode",
    "RefitEndpoint",
    "RefitError",
    "RefitPort",
    "RefitStats",
    "RefitTrainerInitInfo",
    "RolloutConfig",
    "RolloutEngine",
    "Sample",
    "Send",
    "VllmRollout",
    "build_rollout",
    "send_tensors",
]


def build_rollout(
    cfg: RolloutConfig, model_path: str | os.PathLike, worker_extension: str | None = None
) -> RolloutEngine:
    """Start a vLLM engine for `cfg.backend` on the Hugging Face model at `model_path` (`cfg.engine`: vLLM's
    LLM, or its AsyncLLM, whose submit() returns at once; `worker_extension`: see VllmRollout), or
    `cfg.num_engines` of them behind the same API (an EngineGroup)."""
    if cfg.num_engines > 1:
        from rollout.engine_group import EngineGroup

        return EngineGroup(cfg, str(model_path), worker_extension=worker_extension)
    if cfg.engine is EngineKind("async"):
        from rollout.async_engine import AsyncVllmRollout

        return AsyncVllmRollout(cfg, str(model_path), worker_extension=worker_extension)
    from rollout.engine import VllmRollout

    return VllmRollout(cfg, str(model_path), worker_extension=worker_extension)


def __getattr__(name: str):
    if name == "VllmRollout":
        from rollout.engine import VllmRollout

        return VllmRollout
    if name == "AsyncVllmRollout":
        from rollout import async_engine

        return async_engine.AsyncVllmRollout
    if name == "EngineGroup":
        from rollout.engine_group import EngineGroup

        return EngineGroup
    if name == "RefitTrainerInitInfo":  # vLLM's trainer-side API (vLLM >= 0.32): imports vLLM
        from rollout.vllm_backend.trainer import RefitTrainerInitInfo

        return RefitTrainerInitInfo
    raise AttributeError(f"module 'rollout' has no attribute {name!r}")
