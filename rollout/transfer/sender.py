"""The trainer's end of the weight transfer: packs tensors into bucket buffers and streams their metadata."""

from __future__ import annotations

import secrets
import time
from typing import Iterable, Iterator

import torch

from rollout.transfer import layout, transports, wire
from rollout.transfer.channel import Channel, End
from rollout.transfer.config import TransferConfig, TransferMode
from rollout.transfer.direct import DirectSender
from rollout.transfer.errors import PeerError, TransferError
from rollout.transfer.stats import TransferStats
from rollout.transfer.sync import make_sync_policy



def _popped_then(box: list, rest: Iterator) -> Iterator:
    """box's items (popped: no reference stays behind, unlike itertools.chain's), then rest's."""
    while box:
        yield box.pop()
    yield from rest


class WeightSender(End):
    """Binds the endpoint; one instance serves many refits, reusing its buffers and socket.

    Buffers are allocated on the first send() (on `device`: the GPU for cuda_ipc, host shared memory
    for shm) and freed by close(). A tensor on another device than the buffers is moved by the
    packing copy itself (e.g. a CUDA tensor into shm); meta and sparse tensors raise ValueError.

    With `mode=direct` there are no buffers: the first send() moves the tensors' storages into shared
    memory in place (cuda: exports their IPC handles) and the receiver reads them where they live (see
    rollout/transfer/direct.py). Either way the trainer must not write the sent tensors (no optimizer
    step) until send() returns: the receiver reads them, or their packed copies, until its final ack.

    Example:
        with WeightSender(cfg, endpoint) as sender:
            stats = sender.send(model.named_parameters(), version=step)
    """

    def __init__(self, cfg: TransferConfig, endpoint: str, device: torch.device | str | None = None) -> None:
        self.cfg = cfg
        self.endpoint = endpoint
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.transport_kind = transports.resolve_transport(cfg, self.device)
        self._policy = make_sync_policy(cfg.sync)
        self._generation = 0
        self._session = secrets.randbits(62)  # distinguishes us from a previous sender on this endpoint
        self._next_refit_id = 1
        self._direct = DirectSender(cfg, self.transport_kind, self.device) if cfg.mode is TransferMode.direct else None
        self._own(Channel(endpoint, bind=True, timeout_s=cfg.timeout_s, spin_s=cfg.spin_s))

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> TransferStats:
        """One refit: returns once the receiver has consumed every bucket. Raises PeerError with the
        receiver's message if its consume failed, TransferTimeout if it did not answer in time."""
        if self._channel is None:
            raise TransferError(f"{self.endpoint}: send() on a closed WeightSender")
        refit_id = self._next_refit_id
        self._next_refit_id += 1
        start = time.perf_counter()
        if self._direct is not None:  # mode=direct (rollout/transfer/direct.py); None: this refit falls back
            named_tensors, direct = self._direct.prepare(named_tensors)
            if direct is not None:
                return self._direct.send(self._channel, self._session, refit_id, version, direct, self._wait, start)
        buckets = layout.plan_buckets(named_tensors, self.cfg.bucket_bytes)
        # Plan the first bucket before talking to the receiver: bad leading inputs (a meta tensor,
        # an unsupported dtype) fail here without starting a refit.
        first = next(buckets, None)
        box = [first] if first is not None else []
        del first  # a bucket's tensors must be dropped once packed (see _stream), the first one's too
        stream = _popped_then(box, buckets)
        try:
            self._begin(refit_id, version)
            return self._stream(refit_id, version, stream, start)
        except BaseException as exc:
            if not isinstance(exc, PeerError):
                # Tell the receiver now rather than let it wait out its timeout; then re-raise.
                self._channel.try_send(wire.Error(refit_id, f"sender aborted: {type(exc).__name__}: {exc}"))
            if self._transport is not None:
                self._transport.close()  # a transfer may be in flight: the next refit starts afresh
                self._transport = None
            raise

    def _begin(self, refit_id: int, version: int) -> None:
        detail = ""
        for _ in range(2):
            if self._transport is None:
                self._transport = transports.allocate(self.cfg, self.transport_kind, self._policy.num_buffers, self.device)
                self._generation += 1
            hello = wire.Hello(
                wire.PROTOCOL_VERSION, self.transport_kind.value, self.cfg.sync.value, self.cfg.bucket_bytes,
                self._generation, **self._transport.describe(),
            )
            self._channel.send(wire.BeginRefit(self._session, refit_id, version, hello), "BeginRefit")
            ready = self._wait(refit_id, wire.Ready, "Ready")
            if ready.attached:
                return
            # A receiver that came after the names were unlinked (a restarted worker): start afresh.
            detail = ready.detail
            self._transport.close()
            self._transport = None
        raise TransferError(f"{self.endpoint}: receiver could not attach fresh buffers: {detail}")

    def _stream(self, refit_id: int, version: int, buckets: Iterator[layout.PlannedBucket], start: float) -> TransferStats:
        transport, bucket_bytes = self._transport, self.cfg.bucket_bytes
        num_buffers = self._policy.num_buffers
        num_buckets = num_tensors = num_bytes = 0
        for bucket in buckets:
            k, index = num_buckets, num_buckets % num_buffers  # Acks come in order, so buffers go round
            entries = [p.entry for p in bucket.placements]
            # The layout goes out before buffer `index` is free: the receiver decodes it and builds its
            # views while we wait for the Ack and pack, and only the short Packed is left on the critical path.
            self._channel.send(wire.BucketMeta(refit_id, k, index, bucket.nbytes, bucket.is_last, entries), f"BucketMeta {k}")
            if k >= num_buffers:
                self._wait_ack(refit_id, k - num_buffers, index)
            what = f"{self.endpoint}: bucket {k} of refit {refit_id}"
            transport.reclaim(index, self._channel.deadline(), f"{what} (buffer {index} still in flight)")
            buffer = transport.buffer(index)
            layout.pack(bucket, buffer, bucket_bytes)
            digest = layout.checksum(buffer[: bucket.nbytes]) if self.cfg.verify else -1
            packed = wire.Packed(refit_id, k, digest)
            transport.publish(index, bucket.nbytes, lambda: self._channel.send(packed, f"Packed {k}"), what)
            num_buckets += 1
            num_tensors += sum(e.chunk_index == e.num_chunks - 1 for e in entries)
            num_bytes += sum(e.nbytes for e in entries)
            # Drop the packed tensors before the next bucket is planned: tensors made for this refit (a
            # sharded trainer's gathered parameters) then live for one bucket, never the whole model.
            del bucket
        for k in range(max(0, num_buckets - num_buffers), num_buckets):
            self._wait_ack(refit_id, k, k % num_buffers)
        self._channel.send(wire.EndOfRefit(refit_id, num_tensors, num_bytes, num_buckets), "EndOfRefit")
        self._wait(refit_id, wire.Done, "Done")
        return TransferStats(version, num_bytes, num_tensors, num_buckets, time.perf_counter() - start)

    def _wait_ack(self, refit_id: int, bucket_index: int, buffer_index: int) -> None:
        ack = self._wait(refit_id, wire.Ack, f"Ack of bucket {bucket_index}")
        if (ack.bucket_index, ack.buffer_index) != (bucket_index, buffer_index):
            raise wire.ProtocolError(
                f"{self.endpoint}: expected the Ack of bucket {bucket_index} (buffer {buffer_index}), "
                f"got one of bucket {ack.bucket_index} (buffer {ack.buffer_index})"
            )

    def _wait(self, refit_id: int, expected: type, what: str):
        deadline = self._channel.deadline()
        while True:
            msg = self._channel.recv(f"{what} of refit {refit_id}", deadline)
            if getattr(msg, "refit_id", None) != refit_id:
                continue  # a late answer from an aborted refit
            if isinstance(msg, wire.Error):
                raise PeerError(f"{self.endpoint}: the receiver failed refit {refit_id}: {msg.message}")
            if not isinstance(msg, expected):
                raise wire.ProtocolError(f"{self.endpoint}: got {type(msg).__name__} while waiting for {what}")
            return msg
