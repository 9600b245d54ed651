"""Bucket planning and packing, without processes: alignment, boundaries, chunking, bad inputs."""

from __future__ import annotations

import pytest
import torch

from rollout.transfer import layout

B = 4096  # a small bucket keeps these unit tests tiny


def _plan(tensors):
    return list(layout.plan_buckets(tensors, B))


def test_offsets_are_aligned_and_buckets_fill_in_order():
    tensors = [
        ("a", torch.zeros(3, dtype=torch.int8)),
        ("b", torch.zeros(5)),
        ("c", torch.zeros(2, dtype=torch.float64)),
    ]
    (bucket,) = _plan(tensors)
    assert [p.entry.offset for p in bucket.placements] == [0, 256, 512]
    assert bucket.is_last and bucket.nbytes == 512 + 16


def test_exact_bucket_fits_and_one_byte_more_is_chunked():
    exact = _plan([("x", torch.zeros(B, dtype=torch.uint8))])
    assert len(exact) == 1 and exact[0].placements[0].entry.num_chunks == 1
    over = _plan([("x", torch.zeros(B + 1, dtype=torch.uint8))])
    assert [b.nbytes for b in over] == [B, 1] and [
        b.placements[0].entry.chunk_index for b in over
    ] == [0, 1]


def test_tensor_three_and_a_half_buckets_is_four_chunks_starting_a_fresh_bucket():
    small, big, tail = (
        torch.ones(10),
        torch.arange(int(3.5 * B) // 4, dtype=torch.float32),
        torch.ones(4),
    )
    buckets = _plan([("s", small), ("big", big), ("t", tail)])
    assert [len(b.placements) for b in buckets] == [1, 1, 1, 1, 2]
    chunks = [p.entry for b in buckets for p in b.placements if p.entry.name == "big"]
    assert [c.chunk_index for c in chunks] == [0, 1, 2, 3] and all(c.offset == 0 for c in chunks)
    assert sum(c.nbytes for c in chunks) == big.numel() * 4
    assert [b.is_last for b in buckets] == [False, False, False, False, True]


def test_tensor_that_does_not_fit_the_rest_starts_the_next_bucket():
    buckets = _plan(
        [
            ("a", torch.zeros(B // 2, dtype=torch.uint8)),
            ("b", torch.zeros(B // 2 + 1, dtype=torch.uint8)),
        ]
    )
    assert [p.entry.name for b in buckets for p in b.placements] == ["a", "b"] and len(buckets) == 2


def test_zero_tensors_plan_no_bucket():
    assert _plan([]) == []


def test_pack_then_view_is_bitwise_for_strided_and_chunked_inputs():
    strided = torch.randn(20, 30)[::2, ::3]
    chunked = torch.randn(70, 30).t()  # 8400 bytes > B, non-contiguous
    tensors = [("s", strided), ("z", torch.tensor(True)), ("c", chunked)]
    assembled = torch.empty(chunked.numel() * 4, dtype=torch.uint8)
    got = {}
    for bucket in _plan(tensors):
        buffer = torch.zeros(B, dtype=torch.uint8)
        layout.pack(bucket, buffer, B)
        for p in bucket.placements:
            e, region = p.entry, buffer[p.entry.offset : p.entry.offset + p.entry.nbytes]
            if e.num_chunks == 1:
                got[e.name] = layout.typed_view(region, p.source.dtype, e.shape).clone()
            else:
                assembled[e.chunk_index * B : e.chunk_index * B + e.nbytes] = region
    got["c"] = layout.typed_view(assembled, torch.float32, list(chunked.shape))
    for name, t in tensors:
        assert torch.equal(got[name], t), name


def test_unpack_into_inverts_pack_for_strided_and_chunked_inputs():
    tensors = [
        ("s", torch.randn(20, 30)[::2, ::3]),
        ("z", torch.tensor(True)),
        ("c", torch.randn(70, 30).t()),
    ]
    dests = {name: torch.empty(t.shape, dtype=t.dtype) for name, t in tensors}
    buffer = torch.zeros(B, dtype=torch.uint8)
    for bucket in _plan(tensors):
        layout.pack(bucket, buffer, B)
        layout.unpack_into(bucket, buffer, dests, B)
    for name, t in tensors:
        assert torch.equal(dests[name], t), name


@pytest.mark.parametrize(
    "item, message",
    [
        (("m", torch.empty(2, device="meta")), "meta tensor"),
        (("sp", torch.eye(3).to_sparse()), "layout"),
        ((3, torch.ones(1)), "names must be str"),
        (("c", torch.ones(2, dtype=torch.complex128)), "not supported"),
        ("not-a-pair", "pairs"),
    ],
)
def test_bad_inputs_raise_value_error(item, message):
    with pytest.raises(ValueError, match=message):
        _plan([item])


def test_duplicate_name_raises_value_error_naming_it():
    with pytest.raises(ValueError, match="duplicate tensor name 'w'"):
        _plan([("w", torch.ones(1)), ("w", torch.ones(1))])
