"""Zero-copy bucketed weight transfer from a trainer process to a rollout (vLLM worker) process.

Tensors are packed into bucket buffers shared by both processes (POSIX shared memory or CUDA IPC),
or broadcast bucket by bucket over a private torch.distributed group (nccl: an engine on other GPUs),
or with mode=direct read by the receiver where they live, the trainer's storages mapped once (direct.py);
typed metadata travels over a ZMQ socket (msgpack, no pickle); a sync policy decides when a buffer
may be reused. Either side may start first; one connection serves many refits.

Example:
    cfg = TransferConfig(transport="shm", bucket_mb=64, sync="fenced", timeout_s=30.0)
    endpoint = new_endpoint()
    with WeightSender(cfg, endpoint) as sender:                     # trainer process
        stats = sender.send(model.named_parameters(), version=7)
    with WeightReceiver(cfg, endpoint, device="cpu") as receiver:  # rollout process
        stats = receiver.receive(consume)                         # consume(weights, is_last)
"""

from importlib import import_module
from typing import TYPE_CHECKING

from rollout.transfer.config import (
    DirectFallback,
    Sync,
    TransferConfig,
    TransferMode,
    Transport,
)
from rollout.transfer.errors import (
    IntegrityError,
    PeerError,
    TransferError,
    TransferTimeout,
)
from rollout.transfer.stats import TransferStats

if TYPE_CHECKING:
    from rollout.transfer.channel import new_endpoint
    from rollout.transfer.receiver import WeightReceiver
    from rollout.transfer.sender import WeightSender
    from rollout.transfer.transports import resolve_transport
    from rollout.transfer.wire import ProtocolError

# The implementation is imported on first use: a config (rollout.config, trainers.config) imports the
# typed choices above and no transport, socket or wire code.
_LAZY = {
    "new_endpoint": "channel",
    "WeightReceiver": "receiver",
    "WeightSender": "sender",
    "resolve_transport": "transports",
    "ProtocolError": "wire",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f"rollout.transfer.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'rollout.transfer' has no attribute {name!r}")


__all__ = [
    "DirectFallback",
    "IntegrityError",
    "PeerError",
    "ProtocolError",
    "Sync",
    "TransferConfig",
    "TransferError",
    "TransferMode",
    "TransferStats",
    "TransferTimeout",
    "Transport",
    "WeightReceiver",
    "WeightSender",
    "new_endpoint",
    "resolve_transport",
]
