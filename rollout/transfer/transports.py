"""The transport interface (how bucket bytes move between the ends) and the plain factory that picks one by kind."""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from rollout.transfer import wire
from rollout.transfer.config import TransferConfig, Transport
from rollout.transfer.config import resolve_transport as resolve_for_device


class BucketTransport(Protocol):
    """What sender and receiver need from a transport. Buffers are flat uint8 tensors, indexed from 0;
    the sync policy decides which index a bucket uses and when the peer's Ack frees it.

    For every transport, the end shown calls each verb in this order (bucket k in buffer i):

        sender                                     receiver
        describe() -> Hello fields  ──BeginRefit──►  (the factory's attach(hello) maps or joins them)
                                    ──BucketMeta──►  views over buffer(i), built before the bytes come
        buf = reclaim(i, deadline, what)
        pack into buf
        publish(i, nbytes, announce, what) ─Packed─►  acquire(i, nbytes, deadline, what) -> buffer(i)[:nbytes]
                                                   consume the views, wait for `device`, then Ack (frees i)
        close(): at the end, and on both ends after a failed refit (a transfer may still be in
        flight), so that the next refit starts from a fresh allocate/attach.

    - `reclaim` (sender): buffer i, free to be packed: its last transfer is finished. shm and cuda_ipc
      return it at once (every receiver acked it only after its consume and device sync, and nothing
      else reads it); nccl first waits for the buffer's last broadcast.
    - `publish` (sender): makes the first nbytes of buffer i the receivers', and calls `announce()`
      (which sends Packed) exactly once, at the point from which they may `acquire`: at once (shm:
      the copies have returned; it first drops the segment names, which every receiver has mapped),
      after an event is recorded behind the packing copies (cuda_ipc), before a broadcast that
      needs the receivers in it (nccl).
    - `buffer` (receiver): the memory acquire(i) fills, so that the views are built while the sender
      still packs: shm's mapped pages, the sender's GPU memory (cuda_ipc), our one receive buffer (nccl).
    - `acquire` (receiver): the bucket's bytes on `device`, buffer(i)[:nbytes], once they are all
      there: shm's are (Packed came after the copies returned); cuda_ipc waits for the sender's
      event, nccl receives the broadcast. The receiver checks it is buffer(i)'s memory and reads
      the checksum and a chunk's copy from it.

    Fit for what comes next without new members: a fan-out to N receivers is a transport whose
    describe() names one set of buffers for all (shm: one segment mapped by every receiver, its name
    dropped once every Ready is in; nccl: one broadcast group of 1+N ranks), whose announce() tells
    every receiver, and whose reclaim waits for every receiver's transfer (the sender collects N Acks
    per bucket before it calls reclaim). The trainer's own storages could be buffers too (one index
    per storage, named in describe(), no packing); mode=direct (direct.py) instead sends one
    DirectLayout per refit beside this interface.
    """

    device: torch.device  # where this end's buffers live; the receiver waits for it before an Ack

    def describe(self) -> dict[str, list]: ...
    def reclaim(self, index: int, deadline: float, what: str) -> torch.Tensor: ...
    def publish(self, index: int, nbytes: int, announce: Callable[[], None], what: str) -> None: ...
    def buffer(self, index: int) -> torch.Tensor: ...
    def acquire(self, index: int, nbytes: int, deadline: float, what: str) -> torch.Tensor: ...
    def close(self) -> None: ...


def resolve_transport(cfg: TransferConfig, device: torch.device | str) -> Transport:
    """The transport `cfg` asks for on `device` (`auto`: by the device's type, transfer.config.resolve_transport)."""
    return resolve_for_device(cfg.transport, torch.device(device).type)


def allocate(
    cfg: TransferConfig,
    kind: Transport,
    num_buffers: int,
    device: torch.device | str | None,
    num_receivers: int = 1,
) -> BucketTransport:
    """The sender's end of a `kind` transport: `num_buffers` buffers of cfg.bucket_bytes each, read by
    `num_receivers` receivers (shm and cuda_ipc share them as they are; nccl broadcasts to 1 + N ranks)."""
    if kind == Transport.shm:
        from rollout.transfer.shm import ShmTransport

        return ShmTransport.allocate(num_buffers, cfg.bucket_bytes)
    if kind == Transport.cuda_ipc:
        from rollout.transfer.cuda_ipc import CudaIpcTransport

        return CudaIpcTransport.allocate(num_buffers, cfg.bucket_bytes, device)
    if kind == Transport.nccl:
        from rollout.transfer.nccl import NcclTransport

        return NcclTransport.allocate(
            num_buffers, cfg.bucket_bytes, device, cfg.timeout_s, cfg.nccl, num_receivers
        )
    raise ValueError(
        f"rollout.transfer.transport={kind.value!r} is not implemented by WeightSender (shm, cuda_ipc, nccl)"
    )


def attach(
    cfg: TransferConfig, hello: wire.Hello, device: torch.device, rank: int = 0
) -> BucketTransport:
    """Receiver `rank`'s end of the sender's transport. Raises FileNotFoundError when another receiver
    took the buffers first (the caller asks for fresh ones), TransferError when they cannot serve `device`."""
    if hello.transport == Transport.shm.value:
        from rollout.transfer.shm import ShmTransport

        return ShmTransport.attach(hello)
    if hello.transport == Transport.cuda_ipc.value:
        from rollout.transfer.cuda_ipc import CudaIpcTransport

        return CudaIpcTransport.attach(hello, device)
    if hello.transport == Transport.nccl.value:
        from rollout.transfer.nccl import NcclTransport

        return NcclTransport.attach(hello, device, cfg.timeout_s, cfg.nccl, rank)
    raise ValueError(
        f"the sender offers transport {hello.transport!r}, which this receiver cannot attach"
    )
