"""What the `refit` backend's trainer side tells vLLM's workers through vLLM's own control plane.

vLLM forwards `init_info` and `update_info` as plain dicts (JSON over HTTP, collective_rpc
offline); these typed messages are what they hold, parsed with the same protocol, unknown-field
and missing-field checks as our worker RPC (rollout/worker/rpc.py). The tensors never ride them:
they come through our transfer (ZMQ metadata, shared memory or CUDA IPC, no pickle).
"""

from __future__ import annotations

from dataclasses import dataclass

from rollout.load_path import LoadPath
from rollout.transfer.config import TransferConfig
from rollout.worker.rpc import Message, ReceiveRequest, coerce_fields


@dataclass(frozen=True)
class BackendInit(Message):
    """`init_weight_transfer_engine`'s info: where every worker's receiver connects, and how."""

    endpoint: str
    transfer: TransferConfig
    next_bucket_s: float
    receiver_exit_s: float
    load_path: LoadPath = LoadPath.auto
    rank_offset: int = 0  # worker w of the engine is receiver rank_offset + w of the sender

    def __post_init__(self) -> None:
        coerce_fields(self)

    def request(self, version: int) -> ReceiveRequest:
        """The worker's refit of `version` from this trainer."""
        return ReceiveRequest(
            self.endpoint,
            self.transfer,
            version,
            self.next_bucket_s,
            self.receiver_exit_s,
            self.load_path,
            self.rank_offset,
        )


@dataclass(frozen=True)
class BackendUpdate(Message):
    """`update_weights`' info: the version the sender is about to send (the whole of it)."""

    version: int
