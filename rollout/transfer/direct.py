"""mode=direct: the engine reads the trainer's own tensors where they live, one copy per refit and no bucket.

On the first refit each storage behind the sent tensors is exported once (shm: moved into shared memory in
place, rollout/transfer/direct_shm.py; cuda: its CUDA IPC handle, direct_cuda.py) and cached on both ends.
Every refit then sends only its layout (a DirectLayout: the segments and where each tensor lies); the
receiver maps what it has not mapped yet, drops what is no longer named, hands out views of the trainer's
memory in ONE consume call, fences its device and answers Done, and only then does send() return.
A refit whose tensors are exactly where the last completed one's were (same storages, offsets, shapes, dtypes:
the common case, an optimizer steps in place) sends a DirectRepeat instead, and the receiver hands out the
views it built then: per refit the sender checks each tensor against its plan (a few attribute reads) and
nothing else is encoded, decoded or validated again. A receiver without that plan (restarted) asks for the
layout and gets it.
A storage is recognised by its Python storage object (weakly held, so a dead one is dropped) together with
its data pointer and size, never by a tensor's name: a parameter re-allocated between refits (`p.data = ...`,
`.to()`, a resized storage) is exported again. A replaced storage stays mapped by the receiver until the
next refit, which no longer names it.
What cannot be mapped (a DTensor/sharded parameter, a tensor on another device than the transport's, a
non-contiguous view) raises ValueError naming the tensor, or with `direct_fallback=bucketed` sends that
refit through buckets with a warning; never silently.
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from dataclasses import dataclass
from typing import Iterable

import torch

from rollout.transfer import wire
from rollout.transfer.config import DirectFallback, TransferConfig, TransferMode, Transport
from rollout.transfer.errors import PeerError, TransferError
from rollout.transfer.stats import TransferStats
from rollout.transfer.sync import Consume, SyncPolicy

logger = logging.getLogger(__name__)

Tensors = list[tuple[str, torch.Tensor]]


def check_mode(cfg: TransferConfig, hello: wire.Hello) -> None:
    """The receiver's side of the mode handshake: a direct refit needs mode=direct here (it maps the
    trainer's memory); a bucketed one needs mode=bucketed or direct_fallback=bucketed."""
    direct = cfg.mode is TransferMode.direct
    if hello.mode == TransferMode.direct.value and not direct:
        raise TransferError(
            "mode mismatch: the sender sends mode=direct, this receiver is configured mode=bucketed"
        )
    if (
        hello.mode != TransferMode.direct.value
        and direct
        and cfg.direct_fallback is not DirectFallback.bucketed
    ):
        raise TransferError(
            f"mode mismatch: the sender sends mode={hello.mode}, this receiver is configured mode=direct "
            "(accept bucketed refits with direct_fallback=bucketed)"
        )


def _device(device: torch.device) -> torch.device:
    """`cuda` -> `cuda:<current>`: CUDA IPC needs the index (a receiver built on plain `cuda` passed None to it)."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


@dataclass
class _Export:
    storage: weakref.ref
    data_ptr: int
    nbytes: int
    segment: wire.ShmSegment | wire.CudaSegment


@dataclass(frozen=True)
class DirectRefit:
    """What one direct refit sends, planned (and its new storages exported) before anything goes out."""

    plan_id: int
    shm_segments: list[wire.ShmSegment]
    cuda_segments: list[wire.CudaSegment]
    entries: list[wire.DirectEntry]

    def layout(self, refit_id: int) -> wire.DirectLayout:
        return wire.DirectLayout(
            refit_id, self.plan_id, self.shm_segments, self.cuda_segments, self.entries
        )


def _where(name: str, t: torch.Tensor) -> tuple:
    """What must be unchanged for a tensor to lie where a plan said (its storage is compared by identity)."""
    return name, t.data_ptr(), t.shape, t.stride(), t.dtype


@dataclass
class _Plan:
    refit: DirectRefit
    storages: list[weakref.ref]  # one per tensor, weakly held: a dead storage never matches
    where: list[tuple]

    def matches(self, tensors: Tensors) -> bool:
        if len(tensors) != len(self.where):
            return False
        for (name, t), ref, where in zip(tensors, self.storages, self.where):
            if _where(name, t) != where or ref() is not t.untyped_storage():
                return False
        return True


class DirectSender:
    """The trainer's half of mode=direct; WeightSender drives it.

    Example:
        direct = DirectSender(cfg, Transport.shm, torch.device("cpu"))
        tensors, refit = direct.prepare(model.named_parameters())   # refit None: send `tensors` bucketed
        stats = direct.send(channel, session, refit_id, version, refit, wait, time.perf_counter())
    """

    def __init__(self, cfg: TransferConfig, kind: Transport, device: torch.device) -> None:
        if kind not in (Transport.shm, Transport.cuda_ipc):
            raise ValueError(
                f"rollout.transfer.mode=direct needs transport shm or cuda_ipc, got {kind.value}"
            )
        self.cfg, self.kind, self.device = cfg, kind, _device(device)
        self._exports: dict[
            int, _Export
        ] = {}  # by id() of the storage object, checked against the weakref
        self._next_segment_id = 1
        self._warned: set[str] = set()
        self._plan: _Plan | None = None  # the last refit's layout
        self._receiver_plan: int | None = (
            None  # the plan the receiver completed a refit with, if any
        )

    def prepare(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]]
    ) -> tuple[Tensors, DirectRefit | None]:
        """Check every tensor and export the storages not exported yet. Raises ValueError naming a tensor
        that cannot be mapped, or (direct_fallback=bucketed) returns no refit: send the tensors bucketed."""
        tensors = _pairs(named_tensors)
        if self._plan is not None and self._plan.matches(tensors):
            return (
                tensors,
                self._plan.refit,
            )  # every tensor where it was: nothing to check or export
        for name, t in tensors:
            reason = self._cannot_map(t)
            if reason is None:
                continue
            if self.cfg.direct_fallback is not DirectFallback.bucketed:
                raise ValueError(
                    f"{name!r} {reason}: mode=direct cannot map it (gather it first, or set "
                    "rollout.transfer.direct_fallback=bucketed to send such refits through buckets)"
                )
            if reason not in self._warned:
                self._warned.add(reason)
                logger.warning(
                    "mode=direct: %r %s; this refit goes through buckets (direct_fallback=bucketed)",
                    name,
                    reason,
                )
            return tensors, None
        if self.kind == Transport.cuda_ipc:
            torch.cuda.ipc_collect()  # free what the receiver released of storages the trainer dropped
        live: dict[int, _Export] = {}
        entries = []
        for name, t in tensors:
            nbytes = t.numel() * t.element_size()
            segment_id = 0
            if nbytes:
                export = self._export(t.untyped_storage(), name)
                live[id(export.storage())] = export
                segment_id = export.segment.segment_id
            entries.append(
                wire.DirectEntry(
                    name,
                    wire.dtype_to_name(t.dtype),
                    list(t.shape),
                    segment_id,
                    t.storage_offset() * t.element_size(),
                    nbytes,
                )
            )
        self._exports = (
            live  # storages this refit does not send are forgotten; the receiver drops them too
        )
        segments = [e.segment for e in live.values()]
        shm = [s for s in segments if isinstance(s, wire.ShmSegment)]
        plan_id = 1 if self._plan is None else self._plan.refit.plan_id + 1
        refit = DirectRefit(
            plan_id, shm, [s for s in segments if isinstance(s, wire.CudaSegment)], entries
        )
        self._plan = _Plan(
            refit,
            [weakref.ref(t.untyped_storage()) for _, t in tensors],
            [_where(name, t) for name, t in tensors],
        )
        return tensors, refit

    def _cannot_map(self, t: torch.Tensor) -> str | None:
        if _is_dtensor(t):
            return "is a DTensor (a sharded parameter): its storage holds one shard"
        if t.layout != torch.strided or t.device.type == "meta":
            return f"has no dense storage (layout {t.layout}, device {t.device})"
        wire.dtype_to_name(
            t.dtype
        )  # a dtype outside the whitelist is a ValueError whatever the mode
        if t.device.type != self.device.type or (
            t.device.type == "cuda" and t.device.index != self.device.index
        ):
            return f"lives on {t.device}, the transport ({self.kind.value}) on {self.device}"
        if not t.is_contiguous():
            return f"is a non-contiguous view (shape {list(t.shape)}, stride {list(t.stride())})"
        return None

    def _export(self, storage: torch.UntypedStorage, name: str) -> _Export:
        known = self._exports.get(id(storage))
        if (
            known is not None
            and known.storage() is storage
            and known.data_ptr == storage.data_ptr()
            and known.nbytes == storage.nbytes()
        ):
            return known
        segment_id, self._next_segment_id = self._next_segment_id, self._next_segment_id + 1
        if self.kind == Transport.shm:
            from rollout.transfer import direct_shm

            segment = direct_shm.export(
                storage, segment_id, name
            )  # moves it into shared memory in place
        else:
            from rollout.transfer import direct_cuda

            segment = direct_cuda.export(storage, segment_id, self.device)
        export = _Export(weakref.ref(storage), storage.data_ptr(), storage.nbytes(), segment)
        self._exports[id(storage)] = export
        return export

    def send(
        self,
        channel,
        session: int,
        refit_id: int,
        version: int,
        refit: DirectRefit,
        wait,
        start: float,
    ) -> TransferStats:
        """One direct refit: BeginRefit, DirectLayout, then wait for the receiver's Done (`wait` is the
        sender's wait for a message of this refit, raising PeerError on the receiver's Error); `start`
        is when send() began (the first refit's exports count)."""
        self._fence_trainer_writes()
        hello = wire.Hello(
            wire.PROTOCOL_VERSION,
            self.kind.value,
            self.cfg.sync.value,
            0,
            0,
            [],
            [],
            mode=TransferMode.direct.value,
        )
        try:
            channel.send(wire.BeginRefit(session, refit_id, version, hello), "BeginRefit")
            if refit.plan_id == self._receiver_plan:
                channel.send(wire.DirectRepeat(refit_id, refit.plan_id), "DirectRepeat")
                answer = self._wait_done(wait, refit_id, layout_wanted=True)
                if isinstance(answer, wire.Ready):  # a restarted receiver, without our plan
                    logger.info(
                        "mode=direct: the receiver has no plan %d (%s): sending the layout",
                        refit.plan_id,
                        answer.detail,
                    )
                    channel.send(refit.layout(refit_id), "DirectLayout")
                    self._wait_done(wait, refit_id)
            else:
                channel.send(refit.layout(refit_id), "DirectLayout")
                self._wait_done(wait, refit_id)
            self._receiver_plan = refit.plan_id
        except BaseException as exc:
            self._receiver_plan = (
                None  # the receiver dropped its mappings: the next refit sends its layout
            )
            if not isinstance(exc, PeerError):
                channel.try_send(
                    wire.Error(refit_id, f"sender aborted: {type(exc).__name__}: {exc}")
                )
            raise
        num_bytes = sum(e.nbytes for e in refit.entries)
        return TransferStats(version, num_bytes, len(refit.entries), 0, time.perf_counter() - start)

    def _fence_trainer_writes(self) -> None:
        if self.kind == Transport.cuda_ipc:
            torch.cuda.synchronize(
                self.device
            )  # the trainer's last writes must land before the engine reads

    def _wait_done(self, wait, refit_id: int, layout_wanted: bool = False):
        """The receiver's Done: it consumed and fenced, the trainer may write again. `layout_wanted`: a Ready
        asking for the layout (after a DirectRepeat) is an answer too."""
        return wait(refit_id, (wire.Done, wire.Ready) if layout_wanted else wire.Done, "Done")


class DirectReceiver:
    """The engine's half of mode=direct: the segments it mapped, by the sender's session; WeightReceiver
    drives it. Views are valid until the final ack (the Done), as a bucket's are until its Ack.

    Example:
        direct = DirectReceiver(torch.device("cpu"))
        stats = direct.receive(begin, consume, next_msg, channel, policy)
        direct.close()
    """

    def __init__(self, device: torch.device) -> None:
        self.device = _device(device)
        self._session: int | None = None
        self._segments: dict[
            int, tuple[object, torch.Tensor]
        ] = {}  # id -> (descriptor, flat uint8 tensor)
        self._plan: tuple[int, Tensors, int] | None = (
            None  # (plan id, the views built for it, their bytes) of the last refit
        )

    def receive(
        self, begin: wire.BeginRefit, consume: Consume, next_msg, channel, policy: SyncPolicy
    ) -> TransferStats:
        """`next_msg(refit_id, type, what)` is the receiver's wait for a message of this refit. A failed
        refit drops every mapping: a dead trainer's memory must not stay pinned by us."""
        start = time.perf_counter()
        try:
            weights, num_bytes = self._weights(begin, next_msg, channel)
            fence = (
                (lambda: torch.cuda.synchronize(self.device))
                if self.device.type == "cuda"
                else (lambda: None)
            )

            def ack() -> None:
                channel.send(wire.Done(begin.refit_id), "Done")

            policy.deliver(weights, True, consume, fence, ack)
        except BaseException:
            self.close()
            raise
        return TransferStats(begin.version, num_bytes, len(weights), 0, time.perf_counter() - start)

    def _weights(self, begin: wire.BeginRefit, next_msg, channel) -> tuple[Tensors, int]:
        """The views of this refit and their bytes: the last plan's for a DirectRepeat of it, else built from
        the layout."""
        msg = next_msg(begin.refit_id, (wire.DirectLayout, wire.DirectRepeat), "DirectLayout")
        if isinstance(msg, wire.DirectRepeat):
            if (
                self._plan is not None
                and self._plan[0] == msg.plan_id
                and begin.session == self._session
            ):
                return self._plan[1], self._plan[2]
            have = (
                "none"
                if self._plan is None or begin.session != self._session
                else f"plan {self._plan[0]}"
            )
            channel.send(
                wire.Ready(
                    begin.refit_id, False, f"asked to repeat plan {msg.plan_id}, have {have}"
                ),
                "Ready",
            )
            msg = next_msg(begin.refit_id, wire.DirectLayout, "DirectLayout")
        self._plan = None
        self._map(begin, msg)
        weights = self._views(msg)
        self._plan = (msg.plan_id, weights, sum(e.nbytes for e in msg.entries))
        return weights, self._plan[2]

    def _map(self, begin: wire.BeginRefit, layout: wire.DirectLayout) -> None:
        if begin.session != self._session:
            self.close()  # another sender: its segments are not ours to reuse
            self._session = begin.session
        shm, cuda = (
            begin.hello.transport == Transport.shm.value,
            begin.hello.transport == Transport.cuda_ipc.value,
        )
        if (layout.shm_segments and not shm) or (layout.cuda_segments and not cuda):
            raise wire.ProtocolError(
                f"a {begin.hello.transport} refit named segments of the other transport"
            )
        if cuda and self.device.type != "cuda":
            raise TransferError(
                f"the sender's tensors live on a GPU (cuda_ipc), but this receiver's device is {self.device}"
            )
        wanted = {s.segment_id: s for s in [*layout.shm_segments, *layout.cuda_segments]}
        if len(wanted) != len(layout.shm_segments) + len(layout.cuda_segments) or 0 in wanted:
            raise wire.ProtocolError("DirectLayout: segment ids must be distinct and non-zero")
        for segment_id in [i for i, (desc, _) in self._segments.items() if wanted.get(i) != desc]:
            del self._segments[segment_id]  # replaced or no longer sent: our mapping goes
        for segment_id, desc in wanted.items():
            if segment_id not in self._segments:
                self._segments[segment_id] = (desc, self._open(desc))

    def _open(self, desc) -> torch.Tensor:
        if isinstance(desc, wire.ShmSegment):
            from rollout.transfer import direct_shm

            if desc.nbytes <= 0:
                raise wire.ProtocolError(f"segment {desc.segment_id} has {desc.nbytes} bytes")
            return direct_shm.open_segment(desc)
        from rollout.transfer import direct_cuda

        return direct_cuda.open_segment(desc, self.device)

    def _views(self, layout: wire.DirectLayout) -> Tensors:
        weights, names = [], set()
        for e in layout.entries:
            dtype = wire.dtype_from_name(e.dtype)
            if e.name in names or not isinstance(e.name, str):
                raise wire.ProtocolError(f"DirectLayout names {e.name!r} twice")
            names.add(e.name)
            if (
                any(not isinstance(d, int) or d < 0 for d in e.shape)
                or math.prod(e.shape) * dtype.itemsize != e.nbytes
            ):
                raise wire.ProtocolError(
                    f"entry {e.name!r}: shape {e.shape} x {e.dtype} is not {e.nbytes} bytes"
                )
            if e.segment_id == 0 and e.nbytes == 0:
                weights.append((e.name, torch.empty(e.shape, dtype=dtype, device=self.device)))
                continue
            segment = self._segments.get(e.segment_id)
            if (
                segment is None
                or e.offset < 0
                or e.offset % dtype.itemsize
                or e.offset + e.nbytes > segment[1].numel()
            ):
                raise wire.ProtocolError(f"entry {e.name!r} lies outside segment {e.segment_id}")
            region = segment[1][e.offset : e.offset + e.nbytes]
            weights.append((e.name, region.view(dtype).view(torch.Size(e.shape))))
        return weights

    def close(self) -> None:
        """Idempotent: drops every mapping (the memory goes once the consumer's views are gone too)."""
        self._segments = {}
        self._session = None
        self._plan = None
        if self.device.type == "cuda" and torch.cuda.is_initialized():
            torch.cuda.ipc_collect()


def _pairs(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> Tensors:
    tensors, seen = [], set()
    for item in named_tensors:
        try:
            name, t = item
        except (TypeError, ValueError):
            raise ValueError(f"expected (name, tensor) pairs, got {item!r:.100}") from None
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise ValueError(
                f"expected a (str, torch.Tensor) pair, got ({name!r:.100}, {type(t).__name__})"
            )
        if name in seen:
            raise ValueError(f"duplicate tensor name {name!r} in one refit")
        seen.add(name)
        tensors.append((name, t))
    return tensors


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without distributed has no DTensor
        return False
    return isinstance(t, DTensor)
