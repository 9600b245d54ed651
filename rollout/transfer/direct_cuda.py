"""mode=direct on a GPU: a trainer's storage exported through CUDA IPC, and the receiver's handle on it.

`UntypedStorage._share_cuda_()` gives the storage's IPC handle as plain bytes and ints (the fields torch's
own pickling would carry); the receiver rebuilds the storage with `rebuild_cuda_tensor`, without pickle.
Both ends keep what they made: the sender exports a storage once, the receiver opens it once, until the
storage changes. While the receiver holds a storage, torch keeps the sender's memory from being reused
(its IPC reference counter), so a freed and re-allocated parameter always gets new memory.
"""

from __future__ import annotations

import torch

from rollout.transfer import wire
from rollout.transfer.cuda_ipc import open_shared, share


def export(
    storage: torch.UntypedStorage, segment_id: int, device: torch.device
) -> wire.CudaSegment:
    """A trainer's storage, whole, as segment `segment_id`."""
    return wire.CudaSegment(segment_id, share(storage, device, storage.nbytes()))


def open_segment(segment: wire.CudaSegment, device: torch.device) -> torch.Tensor:
    """The sender's storage as a flat uint8 tensor on this process's view of the same GPU."""
    return open_shared(segment.ipc, device, "the trainer's storage", "mode=direct on CUDA")
