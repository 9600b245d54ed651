"""Bucket layout: which bytes of which tensor go where in a bucket, and the typed views over it.

A bucket is a flat uint8 buffer of `bucket_bytes`. Tensors are placed in iteration order at offsets
aligned to ALIGN_BYTES (enough for any dtype and for vectorised copies). A tensor that does not fit
in what is left of the bucket starts the next one. A tensor larger than a whole bucket starts at
offset 0 of a fresh bucket and is split into chunks: chunk k carries bytes
[k * bucket_bytes, (k + 1) * bucket_bytes) of the tensor, so every chunk but the last fills its
bucket, and the receiver reassembles them. Planning is lazy (a generator with one tensor of
look-ahead), so the sender packs bucket k while the caller's iterator still produces later tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from rollout.transfer import wire

ALIGN_BYTES = 256


def align_up(n: int) -> int:
    return (n + ALIGN_BYTES - 1) // ALIGN_BYTES * ALIGN_BYTES


@dataclass(frozen=True)
class Placement:
    entry: wire.TensorEntry
    source: torch.Tensor  # the caller's tensor, or its flat bytes when chunked


@dataclass(frozen=True)
class PlannedBucket:
    placements: list[Placement]
    nbytes: int  # extent used, padding between tensors included
    is_last: bool


def _checked(item: object, seen: set[str]) -> tuple[str, torch.Tensor]:
    try:
        name, tensor = item  # type: ignore[misc]
    except (TypeError, ValueError):
        raise ValueError(f"expected (name, tensor) pairs, got {item!r:.100}") from None
    if not isinstance(name, str):
        raise ValueError(f"tensor names must be str, got {name!r:.100}")
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name!r}: expected a torch.Tensor, got {type(tensor).__name__}")
    if name in seen:
        raise ValueError(f"duplicate tensor name {name!r} in one refit")
    if tensor.device.type == "meta":
        raise ValueError(f"{name!r} is a meta tensor: it has no data to send")
    if tensor.layout != torch.strided:
        raise ValueError(
            f"{name!r} has layout {tensor.layout}; only dense (strided) tensors can be sent"
        )
    wire.dtype_to_name(tensor.dtype)  # raises ValueError for a dtype outside the whitelist
    seen.add(name)
    return name, tensor


def _entry(
    name: str, t: torch.Tensor, offset: int, nbytes: int, k: int, n: int, total: int
) -> wire.TensorEntry:
    return wire.TensorEntry(
        name, wire.dtype_to_name(t.dtype), list(t.shape), offset, nbytes, k, n, total
    )


def plan_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
) -> Iterator[PlannedBucket]:
    """Lay out the tensors in buckets; raises ValueError on a bad input when it reaches it."""
    seen: set[str] = set()
    items = iter(named_tensors)
    placements: list[Placement] = []
    used = 0
    item = next(items, None)
    while item is not None:
        name, t = _checked(item, seen)
        nbytes = t.numel() * t.element_size()
        if nbytes <= bucket_bytes:
            offset = align_up(used)
            if offset + nbytes > bucket_bytes:
                yield PlannedBucket(placements, used, is_last=False)
                placements, offset = [], 0
            placements.append(Placement(_entry(name, t, offset, nbytes, 0, 1, nbytes), t))
            used = offset + nbytes
        else:
            if placements:
                yield PlannedBucket(placements, used, is_last=False)
            # One contiguous copy only for a strided tensor that must be split; the common
            # (contiguous) case is a free view.
            flat = (t if t.is_contiguous() else t.contiguous()).reshape(-1).view(torch.uint8)
            num_chunks = -(-nbytes // bucket_bytes)
            for k in range(num_chunks):
                size = min(bucket_bytes, nbytes - k * bucket_bytes)
                chunk = Placement(_entry(name, t, 0, size, k, num_chunks, nbytes), flat)
                if k < num_chunks - 1:
                    yield PlannedBucket([chunk], size, is_last=False)
            placements, used = [chunk], size
        item = next(items, None)
    if placements:
        yield PlannedBucket(placements, used, is_last=True)


def typed_view(region: torch.Tensor, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    """View a uint8 region (offset aligned) as a tensor of `dtype` and `shape`, without copying."""
    return region.view(dtype).view(torch.Size(shape))


@torch.no_grad()
def pack(bucket: PlannedBucket, buffer: torch.Tensor, bucket_bytes: int) -> None:
    """Copy the bucket's tensors into `buffer` (uint8). copy_ reads strided sources directly and moves
    a tensor from another device (e.g. a CUDA tensor into shared memory) as part of the same copy."""
    for p in bucket.placements:
        e = p.entry
        region = buffer[e.offset : e.offset + e.nbytes]
        if e.num_chunks == 1:
            typed_view(region, p.source.dtype, e.shape).copy_(p.source)
        else:
            start = e.chunk_index * bucket_bytes
            region.copy_(p.source[start : start + e.nbytes])


@torch.no_grad()
def unpack_into(
    bucket: PlannedBucket, buffer: torch.Tensor, dests: dict[str, torch.Tensor], bucket_bytes: int
) -> None:
    """The inverse of `pack` into preallocated `dests` by name (the benchmarks' floor): a chunk of a
    tensor larger than the bucket goes straight to its slice of the destination."""
    for p in bucket.placements:
        e = p.entry
        region = buffer[e.offset : e.offset + e.nbytes]
        if e.num_chunks == 1:
            dests[e.name].copy_(typed_view(region, dests[e.name].dtype, e.shape))
        else:
            start = e.chunk_index * bucket_bytes
            dests[e.name].view(-1).view(torch.uint8)[start : start + e.nbytes].copy_(region)


def checksum(region: torch.Tensor) -> int:
    """xxh3_64 of a uint8 region (copied to the host first when it lives on a device)."""
    import xxhash

    return xxhash.xxh3_64_intdigest(region.cpu().numpy())
