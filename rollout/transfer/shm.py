"""The `shm` transport: bucket buffers in POSIX shared memory (files under /dev/shm), mapped by both ends.

The sender creates one segment per buffer (`refit-<uuid>-<i>`, mode 0600) and names them in the
handshake. As soon as the receiver has mapped them, both ends unlink the names: the memory lives on
in the two mappings and disappears with the last of them, so no segment can outlive a SIGKILLed
peer. With several receivers (fan-out) every one maps the same segments and only the sender unlinks
them, at its first publish (every Ready is in by then) or close: a sender SIGKILLed before that leaves
them behind, as one receiver's would before it mapped them. A receiver that arrives later (a restarted
worker) finds the names gone and asks the sender for fresh buffers. posix_fallocate reserves the pages
up front, so a full /dev/shm fails here with
ENOSPC instead of a SIGBUS in the middle of a copy. Files are mapped by torch.from_file, so the
mapping is released when the last tensor viewing it dies, never under a live view.
"""

from __future__ import annotations

import os
import re
import uuid
from typing import Callable

import torch

from rollout.transfer import wire
from rollout.transfer.errors import TransferError

SHM_DIR = "/dev/shm"
SEGMENT_PREFIX = "refit-"
_SEGMENT_NAME = re.compile(
    r"^refit-[0-9a-f]{32}-[0-9]+$"
)  # never a path: the name comes off the wire


class ShmTransport:
    """Both ends map the same pages, and CPU copies are complete when copy_ returns: the Packed and Ack
    messages alone hand a buffer over, so reclaim and acquire hand out the pages without waiting.

    Example:
    sender_side = ShmTransport.allocate(num_buffers=2, nbytes=64 << 20)
    hello_fields = sender_side.describe()            # -> Hello(shm_buffers=...)
    receiver_side = ShmTransport.attach(hello)       # maps the segments, drops their names
    pack into sender_side.reclaim(0, deadline, what); sender_side.publish(0, nbytes, announce, what)
    receiver_side.acquire(0, nbytes, deadline, what)  # uint8 view of the sender's pages, no copy
    """

    def __init__(self, buffers: list[torch.Tensor], names: list[str], unlinks: bool = True) -> None:
        self._buffers = buffers
        self._names = names
        self._unlinks = unlinks  # False for one of several receivers: the others may still have to map the names
        self._named = True  # the names still exist
        self.device = torch.device("cpu")

    @classmethod
    def allocate(cls, num_buffers: int, nbytes: int) -> ShmTransport:
        stem = f"{SEGMENT_PREFIX}{uuid.uuid4().hex}"
        names: list[str] = []
        buffers: list[torch.Tensor] = []
        try:
            for i in range(num_buffers):
                names.append(f"{stem}-{i}")
                path = os.path.join(SHM_DIR, names[-1])
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    os.posix_fallocate(fd, 0, nbytes)
                finally:
                    os.close(fd)
                buffers.append(torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8))
        except OSError as exc:
            cls(buffers, names).close()
            raise TransferError(
                f"cannot allocate {num_buffers} x {nbytes} bytes in {SHM_DIR}: {exc}"
            ) from exc
        return cls(buffers, names)

    @classmethod
    def attach(cls, hello: wire.Hello) -> ShmTransport:
        """Map the sender's segments, then unlink their names. Raises FileNotFoundError when a name is
        already gone (another receiver attached first): the caller then asks for fresh buffers."""
        buffers, names = [], []
        for desc in hello.shm_buffers:
            if not _SEGMENT_NAME.match(desc.name):
                raise TransferError(f"refusing shared-memory segment name {desc.name!r}")
            path = os.path.join(SHM_DIR, desc.name)
            size = os.stat(path).st_size
            if (
                size < desc.nbytes
            ):  # reading past the end of a mapped file is a SIGBUS, not an error
                raise TransferError(
                    f"segment {desc.name} has {size} bytes, the handshake says {desc.nbytes}"
                )
            buffers.append(torch.from_file(path, shared=True, size=desc.nbytes, dtype=torch.uint8))
            names.append(desc.name)
        transport = cls(buffers, names, unlinks=hello.num_receivers == 1)
        transport.unlink()
        return transport

    def describe(self) -> dict[str, list]:
        return {
            "shm_buffers": [
                wire.ShmBuffer(n, b.numel()) for n, b in zip(self._names, self._buffers)
            ],
            "cuda_buffers": [],
        }

    def reclaim(self, index: int, deadline: float, what: str) -> torch.Tensor:
        """The pages at once: every receiver's Ack came after its consumer stopped reading (and nothing else reads)."""
        return self._buffers[index]

    def publish(self, index: int, nbytes: int, announce: Callable[[], None], what: str) -> None:
        """The packing copies have returned, so the bytes are in the shared pages: announce at once. Every
        receiver has mapped the segments by now (all Readies came before the first bucket): drop the names."""
        self.unlink()
        announce()

    def buffer(self, index: int) -> torch.Tensor:
        return self._buffers[index]

    def acquire(self, index: int, nbytes: int, deadline: float, what: str) -> torch.Tensor:
        """The mapped bytes at once: Packed was sent after the copies returned, so they are already here."""
        return self._buffers[index][:nbytes]

    def unlink(self) -> None:
        """Remove the names; the mappings stay valid. Idempotent. Not by one of several receivers (one that
        gives up must not take the names from the others; the sender removes them)."""
        if not (self._unlinks and self._named):
            return
        for name in self._names:
            try:
                os.unlink(os.path.join(SHM_DIR, name))
            except FileNotFoundError:
                pass
        self._named = False

    def close(self) -> None:
        """Idempotent. Views a consumer still holds keep their mapping alive until they die."""
        self.unlink()
        self._buffers = []
