"""mode=direct on a GPU: a trainer's storage exported through CUDA IPC, and the receiver's handle on it.

`UntypedStorage._share_cuda_()` gives the storage's IPC handle as plain bytes and ints (the fields torch's
own pickling would carry); the receiver rebuilds the storage with `rebuild_cuda_tensor`, without pickle.
Both ends keep what they made: the sender exports a storage once, the receiver opens it once, until the
storage changes. While the receiver holds a storage, torch keeps the sender's memory from being reused
(its IPC reference counter), so a freed and re-allocated parameter always gets new memory.
"""

from __future__ import annotations

import torch
from torch.multiprocessing.reductions import rebuild_cuda_tensor

from rollout.transfer import wire
from rollout.transfer.errors import TransferError


def _uuid(device: torch.device) -> str:
    return str(torch.cuda.get_device_properties(device).uuid)


def export(
    storage: torch.UntypedStorage, segment_id: int, device: torch.device
) -> wire.CudaSegment:
    (_, handle, storage_nbytes, storage_offset, rc_handle, rc_offset, ev_handle, ev_sync) = (
        storage._share_cuda_()
    )
    ipc = wire.CudaIpcBuffer(
        _uuid(device),
        device.index,
        bytes(handle),
        int(storage_nbytes),
        int(storage_offset),
        bytes(rc_handle),
        int(rc_offset),
        bytes(ev_handle or b""),
        bool(ev_sync),
        storage.nbytes(),
        b"",
    )
    return wire.CudaSegment(segment_id, ipc)


def open_segment(segment: wire.CudaSegment, device: torch.device) -> torch.Tensor:
    """The sender's storage as a flat uint8 tensor on this process's view of the same GPU."""
    d = segment.ipc
    if d.device_uuid != _uuid(device):
        raise TransferError(
            f"the trainer's storage lives on GPU {d.device_uuid}, but this receiver's {device} is {_uuid(device)}: "
            "mode=direct on CUDA needs both processes on the same GPU"
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
