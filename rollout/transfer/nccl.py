"""The `nccl` transport: buckets broadcast over a private torch.distributed group of the sender (rank 0) and
its N receivers (rank 1 + receiver rank), for rollout engines on other GPUs than the trainer (standalone mode).
One broadcast per bucket reaches every receiver.

Unlike shm and cuda_ipc the two ends share no memory: the sender packs into its own buffers (one per
sync-policy buffer) and `publish` starts one broadcast per bucket from rank 0; the receiver's `acquire`
takes it into a single buffer of its own (its fence-before-ack already frees that buffer before the next
bucket) and hands out views of it. The collective backend follows the device, cuda -> NCCL and
cpu -> gloo, so this same code runs, and is tested, on CPU.

The group is private: the sender runs a TCPStore on a free port of NcclConfig.store_host (the ZMQ
channel is ipc://, so both ends share a host anyway) for each buffer generation and names it in the handshake;
both ends build the backend object from that store and never call init_process_group, so a vLLM
worker's or trainer's default group is left alone. Receiver r claims its rank with store.add: a second
receiver of that rank (a restarted worker) finds it claimed and asks for a fresh generation, as with shm.

Every wait polls `work.is_completed()` against a deadline, since NCCL's work.wait() only orders
streams. A failed refit may leave a broadcast unmatched, so both ends then close the group (abort)
and the next refit rendezvous afresh. NCCL's watchdog (NcclConfig.watchdog_s) is set far past our
deadlines so that it never fires first (it ends the process). One wait is not ours to bound: NCCL's
own communicator set-up, on the first bucket of a group, if the peer dies exactly then.
"""

from __future__ import annotations

import contextlib
import os
import time
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from rollout.transfer import wire
from rollout.transfer.config import NcclConfig
from rollout.transfer.errors import TransferError, TransferTimeout

_CLAIM_KEY = "refit/receiver/{rank}"
_RANK_SENDER = 0  # receiver r is rank 1 + r


@contextlib.contextmanager
def nccl_environment(cfg: NcclConfig):
    """The one place the library touches os.environ, and only while our group creates its NCCL
    communicator: NCCL reads NCCL_NVLS_ENABLE from the environment then, and neither
    ProcessGroupNCCL.Options nor the ncclConfig_t that torch exposes carries it. The previous value
    is put back. NCCL caches it per process, so a communicator made earlier in the process (a
    trainer's own group) has already fixed it."""
    key, previous = "NCCL_NVLS_ENABLE", os.environ.get("NCCL_NVLS_ENABLE")
    os.environ[key] = "1" if cfg.nvls else "0"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = previous


def backend_for(device: torch.device) -> str:
    if device.type == "cuda":
        return "nccl"
    if device.type == "cpu":
        return "gloo"
    raise TransferError(f"transport nccl moves cuda (NCCL) or cpu (gloo) buffers, not {device}")


def _normalized(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class NcclTransport:
    """Example:
    sender_side = NcclTransport.allocate(num_buffers=2, nbytes=256 << 20, device="cuda:0", timeout_s=60,
                                         cfg=NcclConfig())
    hello_fields = sender_side.describe()                # -> Hello(nccl_buffers=...)
    receiver_side = NcclTransport.attach(hello, torch.device("cuda:1"), timeout_s=60, cfg=NcclConfig())
    pack into sender_side.reclaim(i, deadline, what)     # once buffer i's last broadcast is done
    sender_side.publish(i, n, announce, what)            # announce() sends Packed, then the broadcast starts
    receiver_side.acquire(i, n, deadline, what)          # the bytes, received into receiver_side.buffer(i)
    """

    def __init__(
        self,
        buffers: list[torch.Tensor],
        device: torch.device,
        rank: int,
        store: dist.Store,
        descs: list[wire.NcclBuffer],
        timeout_s: float,
        cfg: NcclConfig,
        world_size: int = 2,
    ) -> None:
        self._buffers = buffers
        self._cfg = cfg
        self.device = device
        self._rank = rank
        self._world_size = world_size
        self._store: dist.Store | None = store
        self._descs = descs
        self._timeout_s = timeout_s
        self._backend = backend_for(device)
        self._group = None  # built on the first broadcast: both ends must join it at the same time
        # the broadcast in flight per buffer; only here, so that close() (and not some traceback's
        # frame) holds the last reference to what keeps the group's sockets open
        self._works: dict[int, object] = {}

    @classmethod
    def allocate(
        cls,
        num_buffers: int,
        nbytes: int,
        device: torch.device | str,
        timeout_s: float,
        cfg: NcclConfig,
        num_receivers: int = 1,
    ) -> NcclTransport:
        device = _normalized(device)
        backend = backend_for(device)
        store = dist.TCPStore(
            cfg.store_host,
            0,
            is_master=True,
            wait_for_workers=False,
            timeout=timedelta(seconds=timeout_s),
        )
        buffers = [
            torch.empty(nbytes, dtype=torch.uint8, device=device) for _ in range(num_buffers)
        ]
        descs = [
            wire.NcclBuffer(cfg.store_host, store.port, backend, nbytes) for _ in range(num_buffers)
        ]
        return cls(buffers, device, _RANK_SENDER, store, descs, timeout_s, cfg, 1 + num_receivers)

    @classmethod
    def attach(
        cls,
        hello: wire.Hello,
        device: torch.device,
        timeout_s: float,
        cfg: NcclConfig,
        rank: int = 0,
    ) -> NcclTransport:
        """Join the sender's store and claim its group. Raises FileNotFoundError when another receiver
        claimed it first (the caller then asks for fresh buffers), TransferError on a bad handshake."""
        device = _normalized(device)
        descs = hello.nccl_buffers
        if (
            not descs
            or len({(d.store_host, d.store_port, d.backend, d.nbytes) for d in descs}) != 1
        ):
            raise TransferError(
                f"the handshake's nccl buffers disagree or are missing: {descs!r:.200}"
            )
        d = descs[0]
        if d.backend != backend_for(device):
            raise TransferError(
                f"the sender broadcasts over {d.backend}, but this receiver's device {device} needs "
                f"{backend_for(device)}"
            )
        if d.nbytes != hello.bucket_bytes or not 0 < d.store_port < 65536:
            raise TransferError(f"nccl buffer {d!r} does not fit the handshake")
        try:
            store = dist.TCPStore(
                d.store_host, d.store_port, is_master=False, timeout=timedelta(seconds=timeout_s)
            )
            claimed = store.add(_CLAIM_KEY.format(rank=rank), 1)
        except RuntimeError as exc:  # DistNetworkError, DistStoreError
            raise TransferError(
                f"cannot reach the sender's rendezvous store at {d.store_host}:{d.store_port}: {exc}"
            ) from exc
        if claimed != 1:
            raise FileNotFoundError(
                f"receiver {rank}'s place in the group at {d.store_host}:{d.store_port} was claimed earlier"
            )
        buffer = torch.empty(d.nbytes, dtype=torch.uint8, device=device)
        return cls(
            [buffer], device, 1 + rank, store, list(descs), timeout_s, cfg, 1 + hello.num_receivers
        )

    def describe(self) -> dict[str, list]:
        return {"shm_buffers": [], "cuda_buffers": [], "nccl_buffers": list(self._descs)}

    def reclaim(self, index: int, deadline: float, what: str) -> torch.Tensor:
        """Sender: buffer `index`, once the last broadcast out of it is done (its Acks say the receivers
        have the bytes; this also orders our packing stream after NCCL's)."""
        if index in self._works:
            self._finish(index, deadline, what)
        return self._buffers[index]

    def publish(self, index: int, nbytes: int, announce: Callable[[], None], what: str) -> None:
        """Sender: wait for the packing copies on our stream only (a broadcast to a dead peer may hang
        the device's NCCL stream until we abort), announce, then start broadcasting the first `nbytes`
        of buffer `index` without waiting. Announce first: the first broadcast of a group waits, up to
        timeout_s, for the receiver to join, which it does only once it has the announcement."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        announce()
        if nbytes:
            self._works[index] = self._broadcast(self._buffers[index][:nbytes], what)

    def buffer(self, index: int) -> torch.Tensor:
        """Our buffer `index`; a receiver's one buffer serves every index (see the module docstring)."""
        return self._buffers[index if self._rank == _RANK_SENDER else 0]

    def acquire(self, index: int, nbytes: int, deadline: float, what: str) -> torch.Tensor:
        """Receiver: the bucket's `nbytes`, received into our buffer."""
        received = self.buffer(index)[:nbytes]
        if nbytes:
            self._works[index] = self._broadcast(received, what)
            self._finish(index, deadline, what)
        return received

    def _broadcast(self, tensor: torch.Tensor, what: str):
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = _RANK_SENDER, 0
        first = self._group is None
        try:
            with (
                self._on_device(),
                (
                    nccl_environment(self._cfg)
                    if first and self._backend == "nccl"
                    else contextlib.nullcontext()
                ),
            ):
                return self._connect(what).broadcast(
                    [tensor], opts
                )  # NCCL makes its communicator in the first one
        except TransferError:
            raise
        except RuntimeError as exc:
            raise TransferError(f"{what}: {self._backend} broadcast failed: {exc}") from exc

    def _connect(self, what: str):
        if self._group is not None:
            return self._group
        if self._store is None:
            raise TransferError(f"{what}: the transport is closed")
        try:
            if self._backend == "nccl":
                opts = dist.ProcessGroupNCCL.Options()
                opts.is_high_priority_stream = False
                opts._timeout = timedelta(seconds=self._cfg.watchdog_s)
                with self._on_device():
                    self._group = dist.ProcessGroupNCCL(
                        self._store, self._rank, self._world_size, opts
                    )
            else:  # gloo connects all ranks here, waiting up to timeout_s for the peers
                self._group = dist.ProcessGroupGloo(
                    self._store, self._rank, self._world_size, timedelta(seconds=self._timeout_s)
                )
        except RuntimeError as exc:
            raise TransferError(
                f"{what}: could not join the {self._backend} group (peer gone?): {exc}"
            ) from exc
        return self._group

    def _on_device(self):
        """NCCL calls run with our GPU current, whichever GPU the calling thread had selected."""
        return (
            torch.cuda.device(self.device)
            if self.device.type == "cuda"
            else contextlib.nullcontext()
        )

    def _finish(self, index: int, deadline: float, what: str) -> None:
        timed_out = TransferTimeout(
            f"{what}: timed out after {self._timeout_s}s waiting for the {self._backend} broadcast "
            "(peer dead, stuck, or never started?)"
        )
        pause = 20e-6
        while not self._works[index].is_completed():
            if time.monotonic() > deadline:
                raise timed_out
            time.sleep(pause)
            pause = min(2 * pause, 1e-4)  # a completion is seen at most ~0.1 ms late
        try:
            self._works.pop(
                index
            ).wait()  # raises the backend's error; on NCCL it also orders our stream after it
        except RuntimeError as exc:
            # gloo's own op timeout is timeout_s too (it also bounds its connect): whichever fires first,
            # a broadcast that outlived timeout_s is a timeout, not some other failure.
            if time.monotonic() > deadline - 0.1 * self._timeout_s:
                raise timed_out from exc
            raise TransferError(
                f"{what}: {self._backend} broadcast failed (peer dead?): {exc}"
            ) from exc

    def close(self) -> None:
        """Idempotent. Aborts the group (ending any broadcast still in flight), stops or leaves the
        store, frees the buffers."""
        group, self._group = self._group, None
        if group is not None:
            group.abort()
        self._works.clear()
        self._store = None
        self._buffers = []
