"""The transport interface (how bucket bytes move) and the plain factory that picks one by config."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from rollout.transfer import wire
from rollout.transfer.config import TransferConfig, Transport


class BucketTransport(Protocol):
    """What sender and receiver need from a transport; buffers are flat uint8 tensors."""

    kind: str
    device: torch.device  # where the buffers live

    def describe(self) -> dict[str, list]: ...  # the Hello's buffer fields
    def buffer(self, index: int) -> torch.Tensor: ...
    def region(self, index: int, offset: int, nbytes: int) -> torch.Tensor: ...
    def synchronize(self) -> None: ...  # make our writes/reads of the buffers complete
    def mark_packed(self, index: int) -> None: ...  # sender, after packing `index`: its bytes may be read
    def wait_packed(self, index: int, deadline: float, what: str) -> None: ...  # receiver, before reading `index`
    def unlink(self) -> None: ...  # drop filesystem names once both ends have attached
    def close(self) -> None: ...


@runtime_checkable
class CopyingTransport(BucketTransport, Protocol):
    """A transport whose ends own separate buffers (nccl): each bucket's bytes move explicitly, and a
    failed refit may leave a transfer in flight, so both ends rebuild the transport after one."""

    def reclaim(self, index: int, deadline: float, what: str) -> None: ...  # sender, before packing `index`
    def push(self, index: int, nbytes: int, what: str) -> None: ...  # sender, after Packed
    def pull(self, index: int, nbytes: int, deadline: float, what: str) -> None: ...  # receiver, before the views


def resolve_transport(cfg: TransferConfig, device: torch.device | str) -> Transport:
    """`auto` -> cuda_ipc for a cuda device, else shm; an explicit choice is returned as is."""
    if cfg.transport != Transport.auto:
        return cfg.transport
    return Transport.cuda_ipc if torch.device(device).type == "cuda" else Transport.shm


def allocate(kind: Transport, num_buffers: int, nbytes: int, device: torch.device | str | None, timeout_s: float) -> BucketTransport:
    if kind == Transport.shm:
        from rollout.transfer.shm import ShmTransport

        return ShmTransport.allocate(num_buffers, nbytes)
    if kind == Transport.cuda_ipc:
        from rollout.transfer.cuda_ipc import CudaIpcTransport

        return CudaIpcTransport.allocate(num_buffers, nbytes, device)
    if kind == Transport.nccl:
        from rollout.transfer.nccl import NcclTransport

        return NcclTransport.allocate(num_buffers, nbytes, device, timeout_s)
    raise ValueError(f"rollout.transfer.transport={kind.value!r} is not implemented by WeightSender (shm, cuda_ipc, nccl)")


def attach(hello: wire.Hello, device: torch.device, timeout_s: float) -> BucketTransport:
    if hello.transport == Transport.shm.value:
        from rollout.transfer.shm import ShmTransport

        return ShmTransport.attach(hello, device)
    if hello.transport == Transport.cuda_ipc.value:
        from rollout.transfer.cuda_ipc import CudaIpcTransport

        return CudaIpcTransport.attach(hello, device)
    if hello.transport == Transport.nccl.value:
        from rollout.transfer.nccl import NcclTransport

        return NcclTransport.attach(hello, device, timeout_s)
    raise ValueError(f"the sender offers transport {hello.transport!r}, which this receiver cannot attach")
