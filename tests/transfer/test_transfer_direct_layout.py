"""mode=direct in one process: the sender's export cache (what is exported, when again) and the receiver's checks
of a DirectLayout, which comes off the wire: every malformed entry is a ProtocolError naming it."""

from __future__ import annotations

import os

import pytest
import torch

from rollout.transfer import TransferConfig, wire
from rollout.transfer.config import Transport
from rollout.transfer.direct import DirectReceiver, DirectSender
from rollout.transfer.errors import TransferError

CFG = TransferConfig(transport="shm", mode="direct")


def _segment_ids(refit) -> dict[str, int]:
    return {e.name: e.segment_id for e in refit.entries}


def test_storages_are_exported_once_and_again_only_when_they_change():
    sender = DirectSender(CFG, Transport.shm, torch.device("cpu"))
    w, b = torch.nn.Parameter(torch.randn(64, 32)), torch.zeros(7)
    fused = torch.randn(30, 8)
    named = [
        ("w", w),
        ("b", b),
        ("q", fused[:10]),
        ("k", fused[10:20]),
        ("empty", torch.empty(0, 3)),
    ]
    _, first = sender.prepare(named)
    ids = _segment_ids(first)
    assert w.untyped_storage().is_shared() and b.untyped_storage().is_shared()
    assert (
        ids["q"] == ids["k"] != ids["w"] and ids["empty"] == 0
    )  # views of one storage share its segment
    assert [e.offset for e in first.entries if e.name in ("q", "k")] == [0, 10 * 8 * 4]
    assert len(first.shm_segments) == 3 and all(s.pid == os.getpid() for s in first.shm_segments)

    with torch.no_grad():
        w.mul_(
            2
        )  # an in-place update changes nothing of the layout: the same plan, sent as a DirectRepeat
    _, second = sender.prepare(named)
    assert second is first
    assert (
        sender.prepare([(n, t.detach()) for n, t in named])[1] is first
    )  # other tensor objects, same places

    w.data = w.data.clone()  # re-allocated under the same name: a new storage, found by identity
    _, third = sender.prepare(named)
    assert third.plan_id == first.plan_id + 1
    assert _segment_ids(third)["w"] not in ids.values() and _segment_ids(third)["b"] == ids["b"]
    assert len(third.shm_segments) == 3  # the dropped storage is no longer named


@pytest.mark.parametrize("change", ["view", "dtype", "order", "name", "fewer"])
def test_any_change_of_where_a_tensor_lies_is_a_new_plan(change):
    sender = DirectSender(CFG, Transport.shm, torch.device("cpu"))
    flat = torch.randn(64)
    named = [("a", flat[:32].view(4, 8)), ("b", flat[32:])]
    _, first = sender.prepare(named)
    changed = {
        "view": [("a", flat[:32].view(8, 4)), ("b", flat[32:])],  # same bytes, another shape
        "dtype": [("a", flat[:32].view(torch.int32).view(4, 8)), ("b", flat[32:])],
        "order": [("b", flat[32:]), ("a", flat[:32].view(4, 8))],
        "name": [("a", flat[:32].view(4, 8)), ("c", flat[32:])],
        "fewer": [("a", flat[:32].view(4, 8))],
    }[change]
    _, second = sender.prepare(changed)
    assert second.plan_id == first.plan_id + 1 and [e.name for e in second.entries] == [
        n for n, _ in changed
    ]


def test_receiver_rejects_malformed_layouts_naming_the_entry():
    receiver = DirectReceiver(torch.device("cpu"))
    receiver._segments = {1: (None, torch.zeros(1024, dtype=torch.uint8))}
    good = wire.DirectEntry("w", "float32", [4, 4], 1, 256, 64)
    assert receiver._views(wire.DirectLayout(1, 1, [], [], [good]))[0][1].shape == (4, 4)
    bad = [
        (
            wire.DirectEntry("past.end", "float32", [4, 4], 1, 1000, 64),
            "'past.end' lies outside segment 1",
        ),
        (wire.DirectEntry("negative", "float32", [4], 1, -16, 16), "'negative' lies outside"),
        (wire.DirectEntry("unaligned", "float32", [4], 1, 2, 16), "'unaligned' lies outside"),
        (
            wire.DirectEntry("no.segment", "float32", [4], 7, 0, 16),
            "'no.segment' lies outside segment 7",
        ),
        (
            wire.DirectEntry("size", "float32", [4, 4], 1, 0, 60),
            "'size': shape [4, 4] x float32 is not 60 bytes",
        ),
        (wire.DirectEntry("neg.dim", "float32", [-4], 1, 0, 16), "'neg.dim': shape"),
        (
            wire.DirectEntry("dtype", "object", [4], 1, 0, 16),
            "'object' is not in the transfer's whitelist",
        ),
    ]
    for entry, words in bad:
        with pytest.raises(wire.ProtocolError, match=words.replace("[", r"\[").replace("]", r"\]")):
            receiver._views(wire.DirectLayout(1, 1, [], [], [entry]))
    with pytest.raises(wire.ProtocolError, match="names 'w' twice"):
        receiver._views(wire.DirectLayout(1, 1, [], [], [good, good]))


def test_receiver_refuses_a_segment_that_is_not_the_senders():
    hello = wire.Hello(wire.PROTOCOL_VERSION, "shm", "fenced", 0, 0, [], [], mode="direct")
    begin = wire.BeginRefit(1, 1, 1, hello)
    receiver = DirectReceiver(torch.device("cpu"))
    with open("/proc/self/fd/0" if os.path.exists("/proc/self/fd/0") else os.devnull) as f:
        fd = f.fileno()
        wrong_inode = wire.ShmSegment(1, os.getpid(), fd, os.fstat(fd).st_ino + 1, 16)
        with pytest.raises(TransferError, match="names another file"):
            receiver._map(begin, wire.DirectLayout(1, 1, [wrong_inode], [], []))
    gone = wire.ShmSegment(2, 2**22 + 12345, 3, 1, 16)  # no such process
    with pytest.raises(TransferError, match="cannot open the sender's storage"):
        receiver._map(begin, wire.DirectLayout(1, 1, [gone], [], []))
    with pytest.raises(wire.ProtocolError, match="distinct and non-zero"):
        receiver._map(begin, wire.DirectLayout(1, 1, [wire.ShmSegment(0, 1, 1, 1, 16)], [], []))
