"""The wire contract: typed messages round-trip through msgpack; anything else is a ProtocolError."""

from __future__ import annotations

import pickle

import msgpack
import pytest
import torch

from rollout.transfer import wire


def _samples() -> list:
    hello = wire.Hello(
        wire.PROTOCOL_VERSION,
        "shm",
        "fenced",
        1 << 20,
        1,
        [wire.ShmBuffer("refit-" + "0" * 32 + "-0", 1 << 20)],
        [],
    )
    cuda = wire.CudaIpcBuffer("GPU-1", 0, b"\x00\x01", 4096, 512, b"rc", 8, b"", False, 2048)
    entry = wire.TensorEntry("w", "bfloat16", [3, 4], 256, 24, 0, 1, 24)
    return [
        wire.BeginRefit(123, 4, 7, hello),
        wire.BeginRefit(
            123, 5, 8, wire.Hello(1, "cuda_ipc", "double_buffer", 4096, 2, [], [cuda, cuda])
        ),
        wire.BeginRefit(
            123,
            6,
            9,
            wire.Hello(
                2,
                "nccl",
                "double_buffer",
                4096,
                3,
                [],
                [],
                [wire.NcclBuffer("127.0.0.1", 29500, "nccl", 4096)] * 2,
            ),
        ),
        wire.Ready(4, False, "gone"),
        wire.BucketMeta(4, 0, 1, 280, True, [entry, entry]),
        wire.BucketMeta(4, 1, 0, 0, False, []),
        wire.Packed(4, 0, 2**64 - 1),
        wire.Packed(4, 1, -1),
        wire.Ack(4, 0, 1),
        wire.EndOfRefit(4, 2, 48, 1),
        wire.Done(4),
        wire.Error(4, "boom"),
        wire.BeginRefit(
            123,
            7,
            10,
            wire.Hello(wire.PROTOCOL_VERSION, "shm", "fenced", 0, 0, [], [], mode="direct"),
        ),
        wire.DirectLayout(
            7,
            3,
            [wire.ShmSegment(1, 4242, 17, 99, 4096)],
            [],
            [
                wire.DirectEntry("w", "bfloat16", [3, 4], 1, 256, 24),
                wire.DirectEntry("e", "float32", [0], 0, 0, 0),
            ],
        ),
        wire.DirectLayout(8, 4, [], [wire.CudaSegment(2, cuda)], []),
        wire.DirectRepeat(9, 4),
    ]


@pytest.mark.parametrize("msg", _samples(), ids=lambda m: type(m).__name__)
def test_messages_round_trip(msg):
    assert wire.decode(wire.encode(msg)) == msg


@pytest.mark.parametrize(
    "frame",
    [
        pickle.dumps(("os.system", "true")),
        msgpack.packb([99, 1]),
        msgpack.packb({"tag": 1}),
        msgpack.packb([4, 1, 2]),  # Ack with a field missing
        msgpack.packb([4, "1", 2, 3]),  # a str where an int belongs
        msgpack.packb([3, 1, 0, 0, 0, True, [["w", "float32", [1], 0, 4, 0, 1]]]),  # short entry
        msgpack.packb([8, 1, 0]),  # Packed without its checksum
        msgpack.packb(
            [
                1,
                1,
                2,
                3,
                [
                    2,
                    "nccl",
                    "fenced",
                    4096,
                    1,
                    [],
                    [],
                    [["127.0.0.1", "29500", "nccl", 4096]],
                    "bucketed",
                ],
            ]
        ),  # str port
        msgpack.packb([9, 1, [[1, 4242, "17", 99, 4096]], [], []]),  # DirectLayout: a str fd
        msgpack.packb([9, 1, [], [[2, "not a CudaIpcBuffer"]], []]),
        b"\xc1",
    ],
)
def test_malformed_frames_are_protocol_errors(frame):
    with pytest.raises(wire.ProtocolError):
        wire.decode(frame)


def test_dtypes_travel_through_a_whitelist():
    for name in ["float32", "bfloat16", "float16", "int64", "bool", "uint8"]:
        assert wire.dtype_to_name(wire.dtype_from_name(name)) == name
    if hasattr(torch, "float8_e4m3fn"):
        assert wire.dtype_from_name("float8_e4m3fn") is torch.float8_e4m3fn
    for bad in ["__class__", "load", "Tensor", "float", 3]:
        with pytest.raises(wire.ProtocolError):
            wire.dtype_from_name(bad)
    with pytest.raises(ValueError, match="not supported"):
        wire.dtype_to_name(torch.quint8)
