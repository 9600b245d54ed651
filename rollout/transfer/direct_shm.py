"""mode=direct on the CPU: a trainer's storage moved into shared memory in place, and the receiver's mapping of it.

The sender calls torch's own `UntypedStorage._share_fd_cpu_()` (what `Module.share_memory()` does with the
file_descriptor strategy): the storage's bytes are copied once into a fresh shared-memory file and the SAME
storage object takes its data pointer, so every tensor viewing it (the Parameter, the optimizer's reference,
a state_dict view) keeps working unchanged. torch unlinks that file's /dev/shm name while creating it and
keeps only a descriptor, so no name can outlive a SIGKILL of either side; the memory lives as long as the
trainer's storage or a receiver's mapping. The receiver opens the descriptor as /proc/<pid>/fd/<fd> (same
host and user, as colocation is) and maps it read-only: a consumer that tried to write the trainer's
tensors would fault instead of corrupting them silently.
"""

from __future__ import annotations

import mmap
import os
import warnings

import torch

from rollout.transfer import wire
from rollout.transfer.errors import TransferError

SHM_DIR = "/dev/shm"


def export(storage: torch.UntypedStorage, segment_id: int, name: str) -> wire.ShmSegment:
    """Move `storage` into shared memory in place (once: a shared storage is only described) and describe it."""
    nbytes = storage.nbytes()
    if not storage.is_shared():
        # torch sizes the file with ftruncate, which reserves nothing: writing past a full /dev/shm would be
        # a SIGBUS in the middle of the copy, so check the room first.
        stat = os.statvfs(SHM_DIR)
        if stat.f_bavail * stat.f_frsize < nbytes:
            raise TransferError(
                f"{name!r}: mode=direct moves the trainer's tensors into {SHM_DIR}, which has "
                f"{stat.f_bavail * stat.f_frsize} bytes free for this storage of {nbytes}: enlarge it or use "
                "mode=bucketed"
            )
    try:
        fd, size = storage._share_fd_cpu_()
    except RuntimeError as exc:  # e.g. "Too many open files": one descriptor per storage stays open
        raise TransferError(
            f"{name!r}: cannot move its storage into shared memory ({exc}); "
            "mode=direct keeps one descriptor per storage open (raise `ulimit -n`)"
        ) from exc
    if (
        fd < 0
    ):  # a storage mapped from a file (torch.load(mmap=True), the file_system sharing strategy)
        raise ValueError(
            f"{name!r}: its storage is a file mapping that torch cannot share by descriptor"
        )
    return wire.ShmSegment(segment_id, os.getpid(), fd, os.fstat(fd).st_ino, int(size))


def open_segment(segment: wire.ShmSegment) -> torch.Tensor:
    """Map the sender's storage read-only as a flat uint8 tensor; the mapping lives as long as a view of it."""
    path = f"/proc/{segment.pid}/fd/{segment.fd}"
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise TransferError(
            f"cannot open the sender's storage {path} (sender gone, or another host/user?): {exc}"
        ) from exc
    try:
        stat = os.fstat(fd)
        if stat.st_ino != segment.inode:
            raise TransferError(
                f"{path} names another file than the sender described (it closed the storage)"
            )
        if (
            stat.st_size < segment.nbytes
        ):  # reading past the end of a mapped file is a SIGBUS, not an error
            raise TransferError(
                f"{path} has {stat.st_size} bytes, the layout says {segment.nbytes}"
            )
        # MAP_POPULATE: fault every page in now, once, rather than on the first refit's reads
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        mapping = mmap.mmap(fd, segment.nbytes, flags=flags, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="The given buffer is not writable"
        )  # read-only on purpose
        return torch.frombuffer(mapping, dtype=torch.uint8)
