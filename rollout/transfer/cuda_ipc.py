"""The `cuda_ipc` transport: bucket buffers in the sender's GPU memory, opened by the receiver via CUDA IPC.

The sender allocates the buffers once and exports each storage with `UntypedStorage._share_cuda_()`;
the resulting handles are plain bytes and ints, sent in the handshake as a wire.CudaIpcBuffer and
rebuilt explicitly on the receiver with `rebuild_cuda_tensor` — the same fields torch's own
pickling would carry, without pickle. Both processes must see the same physical GPU (colocated
trainer and rollout); the GPU's UUID is checked, because device indices differ between processes
with different CUDA_VISIBLE_DEVICES.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch.multiprocessing.reductions import rebuild_cuda_tensor

from rollout.transfer import wire
from rollout.transfer.errors import TransferError, TransferTimeout


def _uuid(device: torch.device) -> str:
    return str(torch.cuda.get_device_properties(device).uuid)


def share(
    storage: torch.UntypedStorage, device: torch.device, nbytes: int, packed_event: bytes = b""
) -> wire.CudaIpcBuffer:
    """`storage` as a CudaIpcBuffer: the fields torch's own CUDA IPC pickling carries, as plain bytes
    and ints (`nbytes` of it are named; `packed_event` is the bucket transport's interprocess event)."""
    (_, handle, storage_nbytes, storage_offset, rc_handle, rc_offset, ev_handle, ev_sync) = (
        storage._share_cuda_()
    )
    return wire.CudaIpcBuffer(
        _uuid(device),
        device.index,
        bytes(handle),
        int(storage_nbytes),
        int(storage_offset),
        bytes(rc_handle),
        int(rc_offset),
        bytes(ev_handle or b""),
        bool(ev_sync),
        nbytes,
        packed_event,
    )


def open_shared(d: wire.CudaIpcBuffer, device: torch.device, what: str, needs: str) -> torch.Tensor:
    """The storage `d` names as a flat uint8 tensor of d.nbytes on this process's view of the same
    GPU, rebuilt without pickle; TransferError naming `what` (and that `needs` one GPU) when `d` lives
    on another GPU than `device`."""
    if d.device_uuid != _uuid(device):
        raise TransferError(
            f"{what} lives on GPU {d.device_uuid}, but this receiver's {device} is {_uuid(device)}: "
            f"{needs} needs both processes on the same GPU"
        )
    return rebuild_cuda_tensor(
        torch.Tensor,
        (d.nbytes,),
        (1,),
        0,
        torch.UntypedStorage,
        torch.uint8,
        device.index,
        d.handle,
        d.storage_nbytes,
        d.storage_offset_bytes,
        False,
        d.ref_counter_handle,
        d.ref_counter_offset,
        d.event_handle or None,
        d.event_sync_required,
    )


def _cuda_device(device: torch.device | str | None) -> torch.device:
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if device is None
        else torch.device(device)
    )
    if device.type != "cuda":
        raise TransferError(f"transport cuda_ipc needs a cuda device, got {device}")
    return torch.device(
        "cuda", torch.cuda.current_device() if device.index is None else device.index
    )


class CudaIpcTransport:
    """One set of GPU buffers seen by both processes; an interprocess event per buffer tells the
    receiver when the sender's packing copies, queued on the GPU, are done.

    Example:
    sender_side = CudaIpcTransport.allocate(num_buffers=1, nbytes=256 << 20, device="cuda:0")
    receiver_side = CudaIpcTransport.attach(hello, device=torch.device("cuda:0"))
    pack into sender_side.reclaim(0, deadline, what)   # the buffer, free since the last Ack
    sender_side.publish(0, nbytes, announce, what)     # records the event, then announce() sends Packed
    receiver_side.acquire(0, nbytes, deadline, what)   # waits for that event: a uint8 view of the sender's GPU memory
    """

    def __init__(
        self,
        buffers: list[torch.Tensor],
        device: torch.device,
        descs: list[wire.CudaIpcBuffer],
        events: list[torch.cuda.Event],
    ) -> None:
        self._buffers = buffers
        self._descs = descs
        self._events = events  # one interprocess "packed" event per buffer, shared with the peer
        self.device = device

    @classmethod
    def allocate(
        cls, num_buffers: int, nbytes: int, device: torch.device | str | None = None
    ) -> CudaIpcTransport:
        device = _cuda_device(device)
        buffers = [
            torch.empty(nbytes, dtype=torch.uint8, device=device) for _ in range(num_buffers)
        ]
        with torch.cuda.device(device):
            events = [torch.cuda.Event(enable_timing=False, interprocess=True) for _ in buffers]
        descs = [
            share(buf.untyped_storage(), device, nbytes, bytes(event.ipc_handle()))
            for buf, event in zip(buffers, events)
        ]
        return cls(buffers, device, descs, events)

    @classmethod
    def attach(cls, hello: wire.Hello, device: torch.device) -> CudaIpcTransport:
        device = _cuda_device(device)
        buffers, events = [], []
        for d in hello.cuda_buffers:
            buffers.append(open_shared(d, device, "cuda_ipc buffer", "CUDA IPC"))
            if not d.packed_event:
                raise TransferError("cuda_ipc buffer without a packed event: the sender is too old")
            events.append(torch.cuda.Event.from_ipc_handle(device, d.packed_event))
        return cls(buffers, device, list(hello.cuda_buffers), events)

    def describe(self) -> dict[str, list]:
        return {"shm_buffers": [], "cuda_buffers": list(self._descs)}

    def reclaim(self, index: int, deadline: float, what: str) -> torch.Tensor:
        """The buffer at once: every receiver acks only after synchronizing its device, so its reads of
        `index` are done."""
        return self._buffers[index]

    def publish(self, index: int, nbytes: int, announce: Callable[[], None], what: str) -> None:
        """Record the buffer's event behind the packing copies instead of blocking the host until they end,
        then announce: the receiver starts polling the event while the GPU still packs. Never announce
        first: the receiver would find the event of the buffer's previous use already complete."""
        self._events[index].record(torch.cuda.current_stream(self.device))
        announce()

    def buffer(self, index: int) -> torch.Tensor:
        return self._buffers[index]

    def acquire(self, index: int, nbytes: int, deadline: float, what: str) -> torch.Tensor:
        """The sender's bytes, once its packing of `index` has finished on the GPU: a host wait, not a
        stream wait, so it holds whatever streams or threads the consumer reads the views from. Polled, so
        a sender that died mid-pack costs at most the timeout."""
        event = self._events[index]
        while not event.query():
            if time.monotonic() > deadline:
                raise TransferTimeout(f"timed out waiting for {what} (the sender's packing copies)")
            time.sleep(0)  # yield; a pack lasts about a millisecond
        return self._buffers[index][:nbytes]

    def close(self) -> None:
        """Idempotent. Drops our references; the sender's memory is freed once the receiver's are gone."""
        self._buffers, self._events = [], []
        if torch.cuda.is_initialized():
            torch.cuda.ipc_collect()
