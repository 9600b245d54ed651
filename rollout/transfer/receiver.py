"""The rollout worker's end of the weight transfer: maps the sender's buffers and hands out views.

Kept light on purpose (torch, zmq, msgpack): it runs inside vLLM's worker process.
"""

from __future__ import annotations

import math
import time
import traceback

import torch

from rollout.transfer import layout, transports, wire
from rollout.transfer.channel import Channel, End, receiver_endpoint
from rollout.transfer.config import TransferConfig, TransferMode, Transport
from rollout.transfer.direct import DirectReceiver, check_mode
from rollout.transfer.errors import IntegrityError, PeerError, TransferError
from rollout.transfer.stats import OnStep, TransferStats, no_observer
from rollout.transfer.sync import Consume, make_sync_policy


def _starts_at(data: torch.Tensor, buffer: torch.Tensor) -> bool:
    """Whether `data` begins where `buffer` does (its data_ptr says 0 when it is empty, its storage's does not)."""
    same_storage = data.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
    return same_storage and data.storage_offset() == buffer.storage_offset()


class WeightReceiver(End):
    """Connects to the endpoint; one instance serves many refits, mapping the buffers once.

    `consume(weights, is_last)` is called once per bucket that completes at least one tensor, in
    order; `is_last` is True on the final call of a refit. The views are valid only during the call
    (with shm they are CPU tensors; with cuda_ipc they live on the receiver's GPU). A tensor larger
    than a bucket arrives whole, reassembled in a receiver-owned buffer that is reused across refits.
    A refit of zero tensors completes without calling consume. `rank` is this receiver's place among
    the sender's `num_receivers` (every worker of every engine has its own). `on_step(step, k)` (see
    stats.OnStep) hears, for each bucket k: "got BucketMeta", "got Packed", "send Ack".

    Example:
        with WeightReceiver(cfg, endpoint, device="cuda:0", rank=1) as receiver:
            stats = receiver.receive(lambda weights, is_last: model.load_weights(weights))
    """

    def __init__(
        self,
        cfg: TransferConfig,
        endpoint: str,
        device: torch.device | str = "cpu",
        rank: int = 0,
        on_step: OnStep | None = None,
    ) -> None:
        self.cfg = cfg
        self._on_step = on_step or no_observer
        self.endpoint = receiver_endpoint(endpoint, rank)
        self.rank = rank
        self.device = torch.device(device)
        self._policy = make_sync_policy(cfg.sync)
        self._attached: tuple[int, int] | None = None  # (session, generation) of the mapped buffers
        self._hello: wire.Hello | None = None
        self._session: int | None = None
        self._last_refit_id = 0
        self._begin_generation = -1  # the Hello generation of the refit in progress
        self._pending: wire.BeginRefit | None = (
            None  # a BeginRefit that cut the previous refit short
        )
        self._assembly: torch.Tensor | None = None
        self._chunked: tuple[str, int] | None = (
            None  # (name, next chunk) of the tensor being reassembled
        )
        self._direct = DirectReceiver(self.device) if cfg.mode is TransferMode.direct else None
        self._own([Channel(self.endpoint, bind=False, timeout_s=cfg.timeout_s, spin_s=cfg.spin_s)])

    def receive(self, consume: Consume) -> TransferStats:
        """One refit. Raises whatever consume raised (after telling the sender), PeerError if the
        sender aborted, TransferTimeout if the sender went silent for `timeout_s`."""
        if self._channel is None:
            raise TransferError(f"{self.endpoint}: receive() on a closed WeightReceiver")
        try:
            begin, self._pending = self._pending or self._wait_begin(), None
        except TransferError:
            if self._direct is not None:
                self._direct.close()  # no refit came: the trainer may be dead, do not keep its memory mapped
            raise
        start = time.perf_counter()
        self._begin_generation = begin.hello.generation
        try:
            if begin.hello.mode == TransferMode.direct.value:  # rollout/transfer/direct.py
                self._check_compatible(begin)
                return self._direct.receive(begin, consume, self._next, self._channel, self._policy)
            self._handshake(begin)
            return self._stream(begin, consume, start)
        except BaseException as exc:
            if not isinstance(exc, PeerError):
                self._channel.try_send(wire.Error(begin.refit_id, f"{type(exc).__name__}: {exc}"))
            self._detach()  # a transfer may be in flight: the sender starts afresh next time
            # The finished frames' locals (views over the buffers) would keep the closed segments mapped for as
            # long as the caller keeps the exception: drop them, the traceback's lines stay.
            traceback.clear_frames(exc.__traceback__)
            raise

    def _wait_begin(self) -> wire.BeginRefit:
        deadline = self._channel.deadline()
        while True:
            msg = self._channel.recv("BeginRefit", deadline)
            if isinstance(msg, wire.BeginRefit) and self._is_new(msg):
                return msg
            # anything else belongs to a refit that was aborted: drop it

    def _is_new(self, begin: wire.BeginRefit) -> bool:
        if begin.session == self._session and begin.refit_id <= self._last_refit_id:
            return False
        self._session, self._last_refit_id = begin.session, begin.refit_id
        return True

    def _handshake(self, begin: wire.BeginRefit) -> None:
        for attempt in range(2):
            hello = begin.hello
            self._check_compatible(begin)
            key = (begin.session, hello.generation)
            if self._attached != key:
                self._detach()
                try:
                    self._transport = transports.attach(self.cfg, hello, self.device, self.rank)
                except FileNotFoundError as exc:
                    if attempt:
                        raise
                    self._channel.send(
                        wire.Ready(begin.refit_id, False, str(exc), self.rank), "Ready"
                    )
                    begin = self._next(
                        begin.refit_id, wire.BeginRefit, "BeginRefit with fresh buffers"
                    )
                    self._begin_generation = begin.hello.generation
                    continue
                self._attached, self._hello = key, hello
            self._channel.send(wire.Ready(begin.refit_id, True, "", self.rank), "Ready")
            return

    def _check_compatible(self, begin: wire.BeginRefit) -> None:
        hello = begin.hello
        if hello.protocol != wire.PROTOCOL_VERSION:
            raise TransferError(
                f"sender speaks protocol {hello.protocol}, this receiver {wire.PROTOCOL_VERSION}"
            )
        check_mode(self.cfg, hello)
        if begin.receiver != self.rank or not 0 <= self.rank < hello.num_receivers:
            raise wire.ProtocolError(
                f"{self.endpoint}: receiver {self.rank} got the BeginRefit of receiver {begin.receiver} "
                f"of {hello.num_receivers}"
            )
        if hello.sync != self.cfg.sync.value:
            raise TransferError(
                f"sync mismatch: sender uses {hello.sync!r}, receiver is configured {self.cfg.sync.value!r}"
            )
        wanted = self.cfg.transport
        if wanted != Transport.auto and hello.transport != wanted.value:
            raise TransferError(
                f"transport mismatch: sender offers {hello.transport!r}, receiver wants {wanted.value!r}"
            )

    def _stream(self, begin: wire.BeginRefit, consume: Consume, start: float) -> TransferStats:
        refit_id = begin.refit_id
        num_buckets = num_tensors = num_bytes = 0
        while True:
            msg = self._next(
                refit_id,
                (wire.BucketMeta, wire.EndOfRefit, wire.BeginRefit),
                f"bucket {num_buckets} or EndOfRefit",
            )
            if isinstance(msg, wire.BeginRefit) and not num_buckets:
                self._handshake(
                    msg
                )  # another receiver could not attach: the sender offers all of us fresh buffers
                continue
            if isinstance(msg, wire.BeginRefit):
                raise wire.ProtocolError(
                    f"{self.endpoint}: a second BeginRefit of refit {refit_id} after bucket {num_buckets - 1}"
                )
            if isinstance(msg, wire.EndOfRefit):
                break
            if msg.bucket_index != num_buckets:
                raise wire.ProtocolError(f"expected bucket {num_buckets}, got {msg.bucket_index}")
            self._on_step("got BucketMeta", num_buckets)
            weights = self._unpack(msg)

            def ack(meta: wire.BucketMeta = msg) -> None:
                self._on_step("send Ack", meta.bucket_index)
                self._channel.send(
                    wire.Ack(refit_id, meta.bucket_index, meta.buffer_index, self.rank), "Ack"
                )

            self._policy.deliver(weights, msg.is_last, consume, self._fence, ack)
            num_buckets += 1
            num_tensors += len(weights)
            num_bytes += sum(e.nbytes for e in msg.entries)
        if (msg.num_buckets, msg.num_tensors, msg.num_bytes) != (
            num_buckets,
            num_tensors,
            num_bytes,
        ):
            raise wire.ProtocolError(
                f"EndOfRefit counts {msg.num_buckets} buckets/{msg.num_tensors} tensors/{msg.num_bytes} bytes, "
                f"received {num_buckets}/{num_tensors}/{num_bytes}"
            )
        self._channel.send(wire.Done(refit_id, self.rank), "Done")
        return TransferStats(
            begin.version, num_bytes, num_tensors, num_buckets, time.perf_counter() - start
        )

    def _next(self, refit_id: int, expected: type | tuple[type, ...], what: str):
        deadline = self._channel.deadline()
        while True:
            msg = self._channel.recv(f"{what} of refit {refit_id}", deadline)
            if isinstance(msg, wire.BeginRefit) and msg.refit_id != refit_id and self._is_new(msg):
                self._pending = msg  # the sender gave up on this refit and started the next one
                raise TransferError(
                    f"{self.endpoint}: sender abandoned refit {refit_id} for refit {msg.refit_id}"
                )
            if getattr(msg, "refit_id", None) != refit_id:
                continue  # left over from an aborted refit
            if isinstance(msg, wire.BeginRefit) and not self._fresh_begin(msg, expected):
                continue  # a repeat of this refit's BeginRefit (WeightSender._wait)
            if isinstance(msg, wire.Error):
                raise PeerError(
                    f"{self.endpoint}: the sender aborted refit {refit_id}: {msg.message}"
                )
            if not isinstance(msg, expected):
                raise wire.ProtocolError(
                    f"{self.endpoint}: got {type(msg).__name__} while waiting for {what}"
                )
            return msg

    def _fresh_begin(self, msg: wire.BeginRefit, expected) -> bool:
        """Whether a BeginRefit of the current refit is news: only the second handshake (fresh buffers,
        a new generation) is; the same generation again is a repeat the sender sent while we were quiet."""
        wanted = expected if isinstance(expected, tuple) else (expected,)
        return wire.BeginRefit in wanted and msg.hello.generation != self._begin_generation

    def _unpack(self, meta: wire.BucketMeta) -> list[tuple[str, torch.Tensor]]:
        hello = self._hello
        if (
            not 0 <= meta.buffer_index < hello.num_buffers
            or not 0 <= meta.nbytes <= hello.bucket_bytes
        ):
            raise wire.ProtocolError(
                f"bucket {meta.bucket_index} does not fit the handshake's buffers"
            )
        # The BucketMeta comes ahead of the bytes: validate it and build the views over the buffer that
        # acquire fills (they read nothing) while the sender still waits for the buffer or packs it.
        buffer = self._transport.buffer(meta.buffer_index)
        weights, chunk_copy = self._views(meta, buffer)
        packed = self._next(meta.refit_id, wire.Packed, f"Packed {meta.bucket_index}")
        if packed.bucket_index != meta.bucket_index:
            raise wire.ProtocolError(
                f"expected Packed {meta.bucket_index}, got Packed {packed.bucket_index}"
            )
        self._on_step("got Packed", meta.bucket_index)
        what = f"{self.endpoint}: the bytes of bucket {meta.bucket_index} of refit {meta.refit_id}"
        data = self._transport.acquire(
            meta.buffer_index, meta.nbytes, self._channel.deadline(), what
        )
        if not _starts_at(data, buffer) or data.numel() != meta.nbytes:
            raise TransferError(
                f"{what}: the transport delivered them elsewhere than in buffer {meta.buffer_index}, "
                "which the views read"
            )
        if packed.checksum != -1:
            if layout.checksum(data) != packed.checksum:
                names = sorted({e.name for e in meta.entries})
                raise IntegrityError(
                    f"checksum mismatch in bucket {meta.bucket_index}, tensors: {', '.join(names)}"
                )
        elif self.cfg.verify:
            raise TransferError(
                "verify=True on the receiver, but the sender sends no checksums (set it on both ends)"
            )
        if chunk_copy is not None:
            destination, offset = chunk_copy
            destination.copy_(data[offset : offset + destination.numel()])
            # The consumer may read on a stream of its own (vLLM's worker loads on a dedicated non-blocking
            # one), which does not wait for this thread's: the copy must be complete before it sees the tensor.
            if destination.device.type != "cpu":
                getattr(torch, destination.device.type).current_stream(
                    destination.device
                ).synchronize()
        return weights

    def _views(
        self, meta: wire.BucketMeta, buffer: torch.Tensor
    ) -> tuple[list[tuple[str, torch.Tensor]], tuple[torch.Tensor, int] | None]:
        """Validate the entries and build their views over `buffer`, reading no bytes. A chunk of a tensor
        larger than a bucket (at most one per bucket) is returned as a (destination, offset) copy to make
        once the bytes are there; its tensor's view, over the assembly buffer, is listed with its last chunk."""
        hello = self._hello
        weights, chunk_copy = [], None
        for e in meta.entries:
            dtype = wire.dtype_from_name(e.dtype)
            if (
                e.offset < 0
                or e.nbytes < 0
                or e.offset + e.nbytes > meta.nbytes
                or any(d < 0 for d in e.shape)
            ):
                raise wire.ProtocolError(
                    f"entry {e.name!r} lies outside bucket {meta.bucket_index}"
                )
            if math.prod(e.shape) * dtype.itemsize != e.tensor_nbytes:
                raise wire.ProtocolError(
                    f"entry {e.name!r}: shape {e.shape} x {e.dtype} is not {e.tensor_nbytes} bytes"
                )
            if e.num_chunks == 1:
                weights.append(
                    (
                        e.name,
                        layout.typed_view(buffer[e.offset : e.offset + e.nbytes], dtype, e.shape),
                    )
                )
                continue
            start = e.chunk_index * hello.bucket_bytes
            if chunk_copy is not None:
                raise wire.ProtocolError(
                    f"bucket {meta.bucket_index} holds a second chunk ({e.name!r}); the layout allows one"
                )
            if (
                e.chunk_index and self._chunked != (e.name, e.chunk_index)
            ) or start + e.nbytes > e.tensor_nbytes:
                raise wire.ProtocolError(
                    f"chunk {e.chunk_index}/{e.num_chunks} of {e.name!r} out of order"
                )
            self._chunked = (e.name, e.chunk_index + 1)
            assembly = self._assembly_buffer(e.tensor_nbytes)
            chunk_copy = (assembly[start : start + e.nbytes], e.offset)
            if e.chunk_index == e.num_chunks - 1:
                weights.append(
                    (e.name, layout.typed_view(assembly[: e.tensor_nbytes], dtype, e.shape))
                )
        return weights, chunk_copy

    def _assembly_buffer(self, nbytes: int) -> torch.Tensor:
        if self._assembly is None or self._assembly.numel() < nbytes:
            self._assembly = None  # free the old one before allocating the larger
            self._assembly = torch.empty(nbytes, dtype=torch.uint8, device=self._transport.device)
        return self._assembly

    def _fence(self) -> None:
        """Wait until the consumer's work on the buffers' device is done: its kernels may still be reading."""
        device = self._transport.device
        if device.type != "cpu":
            getattr(torch, device.type).synchronize(device)

    def _detach(self) -> None:
        if self._transport is not None:
            self._transport.close()
        self._transport, self._attached, self._hello = None, None, None

    def close(self) -> None:
        """Idempotent: unmaps the buffers, closes the socket; removes the socket file and the endpoint
        directory if the sender died without doing so."""
        self._detach()
        if self._direct is not None:
            self._direct.close()
        self._assembly = None
        self._finalizer()
