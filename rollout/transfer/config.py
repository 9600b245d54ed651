"""Typed configuration of the weight transfer: how bytes move, how big a bucket is, when a buffer may be reused."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class Transport(str, Enum):
    """How bucket bytes move from the trainer to the rollout worker."""

    auto = "auto"  # resolved by rollout.platform: cuda -> cuda_ipc, npu/cpu -> shm (no NPU IPC transport exists)
    shm = "shm"  # POSIX shared memory (CPU, NPUs without IPC)
    cuda_ipc = "cuda_ipc"  # one device buffer shared through CUDA IPC
    nccl = "nccl"  # packed buckets broadcast over NCCL (engine on other GPUs)


class Sync(str, Enum):
    """When the sender may overwrite a bucket buffer."""

    fenced = "fenced"  # one buffer: consume -> device sync -> ack
    double_buffer = "double_buffer"  # two buffers in turn, each ack frees a named buffer
    clone = "clone"  # pre-fix baseline: receiver copies out, acks early


class TransferMode(str, Enum):
    """Whether the tensors travel through bucket buffers or the engine reads them where they live."""

    bucketed = "bucketed"  # pack into bucket buffers, the receiver loads from them: two copies
    direct = "direct"  # the receiver maps the trainer's own storages once: one copy (rollout/transfer/direct.py)


class DirectFallback(str, Enum):
    """What mode=direct does with a refit holding a tensor it cannot map (sharded, on another device, strided)."""

    error = "error"  # raise ValueError naming the tensor
    bucketed = (
        "bucketed"  # send that refit through buckets instead, with a warning naming the tensor
    )


def coerce_enum(enum_cls: type[Enum], value: object, key: str) -> Enum:
    """`value` as a member of `enum_cls` (by value), or ValueError naming config key `key` and the choices."""
    try:
        return enum_cls(value.value if isinstance(value, Enum) else value)
    except ValueError:
        allowed = ", ".join(m.value for m in enum_cls)
        raise ValueError(f"{key}={value!r} is not one of: {allowed}") from None


@dataclass
class NcclConfig:
    """The `rollout.transfer.nccl` node: what only the nccl transport reads.

    Example:
        TransferConfig(transport="nccl", nccl=NcclConfig(watchdog_s=1800.0, nvls=False))
    """

    # where the receiver reaches the sender's rendezvous store; the channel is ipc://, so one host
    store_host: str = "127.0.0.1"
    # NCCL's watchdog ends the process when a collective outlives it: it must stay far past our own
    # deadlines, which abort the group first (checked against timeout_s by TransferConfig)
    watchdog_s: float = 1800.0
    # NVLink multicast (NCCL's NVLS): off, as the lent H200 machines require; on only where it works
    nvls: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.store_host, str) or not self.store_host:
            raise ValueError(
                f"rollout.transfer.nccl.store_host must be a host name or address, got {self.store_host!r}"
            )
        if not self.watchdog_s > 0:
            raise ValueError(
                f"rollout.transfer.nccl.watchdog_s must be > 0 seconds, got {self.watchdog_s!r}"
            )
        if not isinstance(self.nvls, bool):
            raise ValueError(f"rollout.transfer.nccl.nvls must be true or false, got {self.nvls!r}")


def resolve_transport(transport: Transport | str, device_type: str) -> Transport:
    """The one place `auto` is decided: cuda -> cuda_ipc (the bucket stays on the GPU), anything else -> shm.
    An NPU gets shm even where its driver could share device memory: this package has no NPU IPC transport,
    and cuda_ipc serves CUDA devices only. An explicit choice is returned as is."""
    transport = coerce_enum(Transport, transport, "rollout.transfer.transport")
    if transport is not Transport.auto:
        return transport
    return Transport.cuda_ipc if device_type == "cuda" else Transport.shm


@dataclass
class TransferConfig:
    """The `rollout.transfer` node.

    Example:
        cfg = TransferConfig(transport="shm", bucket_mb=64, sync="fenced", timeout_s=30.0)
        one_copy = TransferConfig(transport="shm", mode="direct")   # bucket_mb unused
    """

    transport: Transport = Transport.auto
    bucket_mb: int = 256
    sync: Sync = Sync.fenced
    timeout_s: float = 60.0
    verify: bool = False  # xxhash checksum per bucket, checked by the receiver
    # Busy-poll each wait for the peer this long before sleeping in the kernel: a sleeping process
    # wakes tens to hundreds of microseconds after the message lands (CPU idle states), which a GPU
    # refit pays on every bucket. 0 always sleeps. Costs at most this much CPU per message.
    spin_us: int = 2000
    mode: TransferMode = TransferMode.bucketed
    direct_fallback: DirectFallback = DirectFallback.error
    nccl: NcclConfig = field(default_factory=NcclConfig)  # read only by transport=nccl

    def __post_init__(self) -> None:
        self.transport = coerce_enum(Transport, self.transport, "rollout.transfer.transport")
        self.sync = coerce_enum(Sync, self.sync, "rollout.transfer.sync")
        self.mode = coerce_enum(TransferMode, self.mode, "rollout.transfer.mode")
        self.direct_fallback = coerce_enum(
            DirectFallback, self.direct_fallback, "rollout.transfer.direct_fallback"
        )
        if self.mode is TransferMode.direct and self.transport is Transport.nccl:
            raise ValueError(
                "rollout.transfer.mode=direct maps the trainer's memory on its own device: it needs "
                "transport shm, cuda_ipc or auto, not nccl"
            )
        if (
            isinstance(self.bucket_mb, bool)
            or not isinstance(self.bucket_mb, int)
            or self.bucket_mb < 1
        ):
            raise ValueError(
                f"rollout.transfer.bucket_mb must be an integer >= 1 (MB), got {self.bucket_mb!r}"
            )
        if isinstance(self.spin_us, bool) or not isinstance(self.spin_us, int) or self.spin_us < 0:
            raise ValueError(
                f"rollout.transfer.spin_us must be an integer >= 0 (microseconds), got {self.spin_us!r}"
            )
        if not self.timeout_s > 0:
            raise ValueError(
                f"rollout.transfer.timeout_s must be > 0 seconds, got {self.timeout_s!r}"
            )
        if isinstance(self.nccl, dict):  # the worker gets its config as plain fields
            self.nccl = NcclConfig(**self.nccl)
        # A broadcast stays in flight while the sender waits for its Ack and then for its completion,
        # each up to timeout_s: NCCL's watchdog must outlast both, or it ends the process first.
        if self.transport == Transport.nccl and not self.nccl.watchdog_s > 2 * self.timeout_s:
            raise ValueError(
                f"rollout.transfer.nccl.watchdog_s={self.nccl.watchdog_s!r} must exceed twice "
                f"rollout.transfer.timeout_s={self.timeout_s!r}"
            )

    @property
    def bucket_bytes(self) -> int:
        return self.bucket_mb << 20

    @property
    def spin_s(self) -> float:
        return self.spin_us * 1e-6
