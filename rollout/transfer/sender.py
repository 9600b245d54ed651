"""The trainer's end of the weight transfer: packs tensors into bucket buffers and streams their metadata."""

from __future__ import annotations

import secrets
import time
import traceback
from typing import Iterable, Iterator

import torch

from rollout.transfer import layout, transports, wire
from rollout.transfer.channel import Channel, End, receiver_endpoint
from rollout.transfer.config import TransferConfig, TransferMode
from rollout.transfer.direct import DirectSender
from rollout.transfer.errors import PeerError, TransferError, TransferTimeout
from rollout.transfer.stats import OnStep, TransferStats, no_observer
from rollout.transfer.sync import make_sync_policy

RESEND_S = 1.0  # a silent receiver gets its BeginRefit again this often (see WeightSender._wait)


def _popped_then(box: list, rest: Iterator) -> Iterator:
    """box's items (popped: no reference stays behind, unlike itertools.chain's), then rest's."""
    while box:
        yield box.pop()
    yield from rest


class WeightSender(End):
    """Binds the endpoint; one instance serves many refits, reusing its buffers and socket.

    Fan-out: with `num_receivers=N` it serves receivers of rank 0..N-1 (one socket each, see
    `receiver_endpoint`). Every bucket is packed ONCE into buffers all of them read (shm: one segment
    mapped by each; cuda_ipc: each opens the same device buffer; nccl: one broadcast to a group of 1 + N),
    and a buffer is packed again only after EVERY receiver acked it. A receiver that fails, dies or never
    comes fails the refit within `timeout_s` with an error naming its rank.

    Buffers are allocated on the first send() (on `device`: the GPU for cuda_ipc, host shared memory
    for shm) and freed by close(). A tensor on another device than the buffers is moved by the
    packing copy itself (e.g. a CUDA tensor into shm); meta and sparse tensors raise ValueError.

    With `mode=direct` there are no buffers: the first send() moves the tensors' storages into shared
    memory in place (cuda: exports their IPC handles) and the receiver reads them where they live (see
    rollout/transfer/direct.py). Either way the trainer must not write the sent tensors (no optimizer
    step) until send() returns: the receiver reads them, or their packed copies, until its final ack.

    `on_step(step, k)` (see stats.OnStep) hears, for each bucket k: "send BucketMeta", "got Ack" (every
    receiver's), "pack start" (its buffer reclaimed), "pack end" (the packing copies issued: on a GPU they
    may still run, so a CUDA event recorded at each of the two times them), "send Packed".

    Example:
        with WeightSender(cfg, endpoint, num_receivers=2) as sender:   # WeightReceiver(..., rank=0) and rank=1
            stats = sender.send(model.named_parameters(), version=step)
    """

    def __init__(
        self,
        cfg: TransferConfig,
        endpoint: str,
        device: torch.device | str | None = None,
        num_receivers: int = 1,
        on_step: OnStep | None = None,
    ) -> None:
        if (
            isinstance(num_receivers, bool)
            or not isinstance(num_receivers, int)
            or num_receivers < 1
        ):
            raise ValueError(f"num_receivers must be an integer >= 1, got {num_receivers!r}")
        self.cfg = cfg
        self.endpoint = endpoint
        self.num_receivers = num_receivers
        self._on_step = on_step or no_observer
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.transport_kind = transports.resolve_transport(cfg, self.device)
        self._policy = make_sync_policy(cfg.sync)
        self._generation = 0
        self._session = secrets.randbits(
            62
        )  # distinguishes us from a previous sender on this endpoint
        self._next_refit_id = 1
        if cfg.mode is TransferMode.direct and num_receivers != 1:
            raise ValueError(
                f"rollout.transfer.mode=direct serves one receiver, got num_receivers={num_receivers} "
                "(fan-out reads packed buckets: use mode=bucketed)"
            )
        self._direct = (
            DirectSender(cfg, self.transport_kind, self.device)
            if cfg.mode is TransferMode.direct
            else None
        )
        channels: list[Channel] = []
        try:
            for rank in range(num_receivers):
                channels.append(
                    Channel(
                        receiver_endpoint(endpoint, rank),
                        bind=True,
                        timeout_s=cfg.timeout_s,
                        spin_s=cfg.spin_s,
                    )
                )
        except BaseException:
            for channel in channels:
                channel.close()
            raise
        self._own(channels)

    def send(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int
    ) -> TransferStats:
        """One refit: returns once every receiver has consumed every bucket. Raises PeerError with a
        receiver's message if its consume failed, TransferTimeout if one did not answer in time."""
        if self._channel is None:
            raise TransferError(f"{self.endpoint}: send() on a closed WeightSender")
        refit_id = self._next_refit_id
        self._next_refit_id += 1
        start = time.perf_counter()
        if (
            self._direct is not None
        ):  # mode=direct (rollout/transfer/direct.py); None: this refit falls back
            named_tensors, direct = self._direct.prepare(named_tensors)
            if direct is not None:
                return self._direct.send(
                    self._channel, self._session, refit_id, version, direct, self._wait_one, start
                )
        buckets = layout.plan_buckets(named_tensors, self.cfg.bucket_bytes)
        # Plan the first bucket before talking to the receiver: bad leading inputs (a meta tensor,
        # an unsupported dtype) fail here without starting a refit.
        first = next(buckets, None)
        box = [first] if first is not None else []
        del (
            first
        )  # a bucket's tensors must be dropped once packed (see _stream), the first one's too
        stream = _popped_then(box, buckets)
        try:
            self._begin(refit_id, version)
            return self._stream(refit_id, version, stream, start)
        except BaseException as exc:
            # Tell the receivers now rather than let them wait out their timeout; then re-raise. After a
            # receiver's Error (PeerError) the others still wait: they hear why; that one ignores it.
            self._broadcast_try(
                wire.Error(refit_id, f"sender aborted: {type(exc).__name__}: {exc}")
            )
            if self._transport is not None:
                self._transport.close()  # a transfer may be in flight: the next refit starts afresh
                self._transport = None
            traceback.clear_frames(
                exc.__traceback__
            )  # no view over a closed buffer outlives it in a frame
            raise

    def _begin(self, refit_id: int, version: int) -> None:
        detail = ""
        for _ in range(2):
            if self._transport is None:
                self._transport = transports.allocate(
                    self.cfg,
                    self.transport_kind,
                    self._policy.num_buffers,
                    self.device,
                    self.num_receivers,
                )
                self._generation += 1
            hello = wire.Hello(
                wire.PROTOCOL_VERSION,
                self.transport_kind.value,
                self.cfg.sync.value,
                self.cfg.bucket_bytes,
                self._generation,
                **self._transport.describe(),
                num_receivers=self.num_receivers,
            )
            begins = [
                wire.BeginRefit(self._session, refit_id, version, hello, rank)
                for rank in range(self.num_receivers)
            ]
            for rank, channel in enumerate(self._channels):
                channel.send(begins[rank], f"BeginRefit to receiver {rank}")
            readies = self._wait_all(refit_id, wire.Ready, "Ready", resend=begins)
            if all(r.attached for r in readies):
                return
            # A receiver that came after the names were unlinked (a restarted worker): start afresh, all
            # receivers together (those that attached take the new BeginRefit as a second handshake).
            detail = "; ".join(
                f"receiver {r.receiver}: {r.detail}" for r in readies if not r.attached
            )
            self._transport.close()
            self._transport = None
        raise TransferError(f"{self.endpoint}: a receiver could not attach fresh buffers: {detail}")

    def _stream(
        self, refit_id: int, version: int, buckets: Iterator[layout.PlannedBucket], start: float
    ) -> TransferStats:
        transport, bucket_bytes = self._transport, self.cfg.bucket_bytes
        num_buffers = self._policy.num_buffers
        num_buckets = num_tensors = num_bytes = 0
        for bucket in buckets:
            k, index = (
                num_buckets,
                num_buckets % num_buffers,
            )  # Acks come in order, so buffers go round
            entries = [p.entry for p in bucket.placements]
            # The layout goes out before buffer `index` is free: the receiver decodes it and builds its
            # views while we wait for the Ack and pack, and only the short Packed is left on the critical path.
            self._on_step("send BucketMeta", k)
            self._broadcast(
                wire.BucketMeta(refit_id, k, index, bucket.nbytes, bucket.is_last, entries),
                f"BucketMeta {k}",
            )
            if k >= num_buffers:
                self._wait_acks(refit_id, k - num_buffers, index)
            what = f"{self.endpoint}: bucket {k} of refit {refit_id}"
            buffer = transport.reclaim(
                index, self._channel.deadline(), f"{what} (buffer {index} still in flight)"
            )
            self._on_step("pack start", k)
            layout.pack(bucket, buffer, bucket_bytes)
            self._on_step("pack end", k)
            digest = layout.checksum(buffer[: bucket.nbytes]) if self.cfg.verify else -1
            packed = wire.Packed(refit_id, k, digest)
            transport.publish(index, bucket.nbytes, lambda: self._announce(packed), what)
            num_buckets += 1
            num_tensors += sum(e.chunk_index == e.num_chunks - 1 for e in entries)
            num_bytes += sum(e.nbytes for e in entries)
            # Drop the packed tensors before the next bucket is planned: tensors made for this refit (a
            # sharded trainer's gathered parameters) then live for one bucket, never the whole model.
            del bucket
        for k in range(max(0, num_buckets - num_buffers), num_buckets):
            self._wait_acks(refit_id, k, k % num_buffers)
        self._broadcast(
            wire.EndOfRefit(refit_id, num_tensors, num_bytes, num_buckets), "EndOfRefit"
        )
        self._wait_all(refit_id, wire.Done, "Done")
        return TransferStats(
            version, num_bytes, num_tensors, num_buckets, time.perf_counter() - start
        )

    def _broadcast(self, msg: wire.Message, what: str) -> None:
        refit_id = getattr(msg, "refit_id", None)
        for rank, channel in enumerate(self._channels):
            gone = lambda: self._raise_if_failed(rank, refit_id)  # noqa: E731 - a receiver that failed and closed
            try:
                channel.send(msg, f"{what} to receiver {rank}", if_blocked=gone)
            except TransferTimeout:
                gone()
                raise

    def _raise_if_failed(self, rank: int, refit_id: int | None) -> None:
        """A send to receiver `rank` could not go out at once, or timed out: if it had failed the refit and gone
        (its socket closed after its Error), raise its Error, the cause, rather than wait or time out."""
        channel = self._channels[rank]
        while True:
            try:
                msg = channel.recv("an Error already sent", time.monotonic())
            except TransferTimeout:
                return
            if isinstance(msg, wire.Error) and msg.refit_id == refit_id:
                raise PeerError(
                    f"{self.endpoint}: receiver {rank} failed refit {refit_id}: {msg.message}"
                )

    def _announce(self, packed: wire.Packed) -> None:
        self._on_step("send Packed", packed.bucket_index)
        self._broadcast(packed, f"Packed {packed.bucket_index}")

    def _broadcast_try(self, msg: wire.Message) -> None:
        for channel in self._channels:
            channel.try_send(msg)

    def _wait_acks(self, refit_id: int, bucket_index: int, buffer_index: int) -> None:
        """Every receiver's Ack of the bucket: only then may its buffer be packed again."""
        for ack in self._wait_all(refit_id, wire.Ack, f"Ack of bucket {bucket_index}"):
            if (ack.bucket_index, ack.buffer_index) != (bucket_index, buffer_index):
                raise wire.ProtocolError(
                    f"{self.endpoint}: expected the Ack of bucket {bucket_index} (buffer {buffer_index}) from receiver "
                    f"{ack.receiver}, got one of bucket {ack.bucket_index} (buffer {ack.buffer_index})"
                )
        self._on_step("got Ack", bucket_index)

    def _wait_all(self, refit_id: int, expected: type, what: str, resend=None) -> list:
        """`expected` from each receiver in rank order, all within one timeout_s: the answers that came
        early wait in their sockets while we read the others. `resend[rank]` goes out again every
        RESEND_S while that receiver is silent (see _wait)."""
        deadline = self._channels[0].deadline()
        return [
            self._wait(rank, refit_id, expected, what, deadline, resend and resend[rank])
            for rank in range(self.num_receivers)
        ]

    def _wait_one(self, refit_id: int, expected: type, what: str):
        """The one receiver's answer (mode=direct)."""
        return self._wait(0, refit_id, expected, what, self._channel.deadline())

    def _wait(
        self, rank: int, refit_id: int, expected: type, what: str, deadline: float, resend=None
    ):
        """The receiver's `expected` answer to refit `refit_id`. With `resend` (a BeginRefit), a silent
        receiver gets it again every RESEND_S until the deadline: ZMQ hands a message to any pipe it
        still believes open, and a receiver that closed a moment ago (a worker restarted at once) may
        still own one, so the first BeginRefit can vanish with it. The receiver drops repeats."""
        channel = self._channels[rank]
        waiting_for = f"{what} of refit {refit_id} from receiver {rank}"
        while True:
            until = deadline if resend is None else min(deadline, time.monotonic() + RESEND_S)
            try:
                msg = channel.recv(waiting_for, until)
            except TransferTimeout:
                if resend is None or time.monotonic() >= deadline:
                    raise
                channel.try_send(resend)
                continue
            if getattr(msg, "refit_id", None) != refit_id:
                continue  # a late answer from an aborted refit
            if isinstance(msg, wire.Error):
                raise PeerError(
                    f"{self.endpoint}: receiver {rank} failed refit {refit_id}: {msg.message}"
                )
            if not isinstance(msg, expected):
                raise wire.ProtocolError(
                    f"{self.endpoint}: got {type(msg).__name__} from receiver {rank} while waiting for {what}"
                )
            if msg.receiver != rank:
                raise wire.ProtocolError(
                    f"{self.endpoint}: receiver {rank}'s socket carried a {what} from receiver {msg.receiver}"
                )
            return msg
