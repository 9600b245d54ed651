"""A receiver fed bucket metadata that does not fit its buffers fails that refit with a ProtocolError that
names the entry, tells the sender, and reads no byte outside the buffer; a transport whose acquire delivers
the bytes elsewhere than in the buffer the views were built over fails it too. The sender here is driven by
hand over a real channel and real shared memory, since WeightSender never produces such metadata."""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch

from rollout.transfer import TransferConfig, TransferError, WeightReceiver, new_endpoint, wire
from rollout.transfer.channel import Channel
from rollout.transfer.config import Transport
from rollout.transfer.shm import ShmTransport

BUCKET = 4096


def _entry(
    name: str,
    offset: int,
    nbytes: int,
    chunk: int = 0,
    num_chunks: int = 1,
    total: int | None = None,
):
    return wire.TensorEntry(
        name,
        "float32",
        [nbytes // 4] if num_chunks == 1 else [(total or nbytes) // 4],
        offset,
        nbytes,
        chunk,
        num_chunks,
        total or nbytes,
    )


BAD = {
    "past the bucket's extent": (
        [_entry("w.past", 256, 4096)],
        4096,
        "'w.past' lies outside bucket 0",
    ),
    "negative offset": ([_entry("w.neg", -256, 64)], 64, "'w.neg' lies outside bucket 0"),
    "shape and bytes disagree": (
        [wire.TensorEntry("w.shape", "float32", [3, 3], 0, 64, 0, 1, 64)],
        64,
        "'w.shape': shape [3, 3]",
    ),
    "chunk 1 before chunk 0": (
        [_entry("w.big", 0, 4096, 1, 3, 3 * 4096)],
        4096,
        "chunk 1/3 of 'w.big' out of order",
    ),
    "two chunks in one bucket": (
        [_entry("w.a", 0, 1024, 0, 2, 4096 + 1024), _entry("w.b", 1024, 1024, 0, 2, 4096 + 1024)],
        2048,
        "second chunk ('w.b')",
    ),
    "bucket larger than the buffers": (
        [_entry("w.ok", 0, 64)],
        BUCKET + 1,
        "does not fit the handshake's buffers",
    ),
}


@contextlib.contextmanager
def _hand_driven_refit(consume):
    """A WeightReceiver in a thread, handshaken by hand: yields the sender's channel, its shm buffer and the
    list that collects what receive() raised; on exit the thread has ended and everything is closed."""
    cfg = TransferConfig(transport=Transport.shm, bucket_mb=1, timeout_s=10.0)
    endpoint = new_endpoint()
    transport = ShmTransport.allocate(1, BUCKET)
    channel = Channel(endpoint, bind=True, timeout_s=10.0)
    raised: list[BaseException] = []
    receiver = WeightReceiver(cfg, endpoint)

    def receive() -> None:
        try:
            receiver.receive(consume)
        except BaseException as exc:  # noqa: BLE001 - the tests assert what was expected
            raised.append(exc)

    worker = threading.Thread(target=receive)
    worker.start()
    try:
        hello = wire.Hello(
            wire.PROTOCOL_VERSION, "shm", "fenced", BUCKET, 1, **transport.describe()
        )
        channel.send(wire.BeginRefit(7, 1, 1, hello), "BeginRefit")
        assert isinstance(channel.recv("Ready", channel.deadline()), wire.Ready)
        yield channel, transport.buffer(0), raised
        worker.join(10)
    finally:
        receiver.close()
        channel.close()
        transport.close()
    assert not worker.is_alive()


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_bucket_meta_fails_the_refit_naming_the_entry(case):
    entries, extent, message = BAD[case]
    with _hand_driven_refit(lambda weights, is_last: None) as (channel, _, raised):
        channel.send(wire.BucketMeta(1, 0, 0, extent, True, entries), "BucketMeta")
        error = channel.recv("the receiver's Error", channel.deadline())
    assert len(raised) == 1 and isinstance(raised[0], wire.ProtocolError), raised
    assert message in str(raised[0])
    assert isinstance(error, wire.Error) and message in error.message


def test_well_formed_meta_from_the_same_hand_driven_sender_is_delivered():
    """The control for the cases above: the same hand-built refit, with entries that fit, arrives."""
    got: dict[str, torch.Tensor] = {}
    with _hand_driven_refit(
        lambda weights, is_last: got.update((n, t.clone()) for n, t in weights)
    ) as (channel, buffer, raised):
        buffer[:64].view(torch.float32).copy_(torch.arange(16, dtype=torch.float32))
        channel.send(wire.BucketMeta(1, 0, 0, 64, True, [_entry("w.ok", 0, 64)]), "BucketMeta")
        channel.send(wire.Packed(1, 0, -1), "Packed")
        assert isinstance(channel.recv("Ack", channel.deadline()), wire.Ack)
        channel.send(wire.EndOfRefit(1, 1, 64, 1), "EndOfRefit")
        assert isinstance(channel.recv("Done", channel.deadline()), wire.Done)
    assert not raised
    torch.testing.assert_close(got["w.ok"], torch.arange(16, dtype=torch.float32))


def test_bytes_acquired_elsewhere_than_the_views_read_fail_the_refit(monkeypatch):
    """The views are built over buffer(i) before the bytes come, so acquire must hand back that memory:
    a copy (right bytes, other memory) is refused rather than leaving the views on stale pages."""
    monkeypatch.setattr(
        ShmTransport,
        "acquire",
        lambda self, index, nbytes, deadline, what: self.buffer(index)[:nbytes].clone(),
    )
    with _hand_driven_refit(lambda weights, is_last: None) as (channel, _, raised):
        channel.send(wire.BucketMeta(1, 0, 0, 64, True, [_entry("w.ok", 0, 64)]), "BucketMeta")
        channel.send(wire.Packed(1, 0, -1), "Packed")
        error = channel.recv("the receiver's Error", channel.deadline())
    assert len(raised) == 1 and isinstance(raised[0], TransferError), raised
    assert "elsewhere than in buffer 0" in str(raised[0]) and isinstance(error, wire.Error)
