"""The wire contract of the weight transfer: typed messages shared by both ends, encoded as msgpack.

Every message is one ZMQ frame: a msgpack array `[tag, field, field, ...]`. Decoding only builds the
dataclasses below from plain msgpack values (ints, floats, str, bytes, lists), so a process that
reaches the socket can at worst send a malformed message (ProtocolError) — never make the peer run
code. No pickle anywhere. Tensor dtypes travel as names mapped through an explicit whitelist.

One refit, in order (S = sender, R = receiver). A sender with N receivers (every worker of one or
several engines) runs this exchange with each of them on its own socket, sending every message to all
and awaiting every answer before it goes on; each answer names its receiver's rank.
    S->R BeginRefit (carries the Hello: transport, sync, buffer descriptors)
    R->S Ready (attached=False asks the sender for fresh buffers)
    per bucket k, with buffer k % num_buffers:
      S->R BucketMeta k (the layout; sent as soon as it is planned, before buffer k is free, so the
           receiver decodes it and builds its views while the sender still waits or packs)
      S->R Packed k (the bytes are, or on a GPU will be once the sender's packed event fires, in the buffer)
      R->S Ack k (after consume and the device fence: the buffer may be overwritten)
    S->R EndOfRefit
    R->S Done
Either side may send Error instead; it aborts that refit on both ends.

A refit of mode=direct (rollout/transfer/direct.py) has no buckets:
    S->R BeginRefit (Hello.mode == "direct", no buffers)
    S->R DirectLayout (every segment the refit uses and where each tensor lies in one, numbered as plan p)
         or DirectRepeat p (every tensor lies where plan p, the last one the receiver completed, said)
    R->S Ready(attached=False) only if it has no plan p (a restarted receiver): S->R DirectLayout follows
    R->S Done (after consume and the device fence: the trainer may write its tensors again)
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import msgpack
import torch

# 2: Hello.nccl_buffers; 3: CudaIpcBuffer.packed_event; 4: Packed split from BucketMeta; 5: Hello.mode, DirectLayout;
# 6: N receivers (Hello.num_receivers, the receiver's rank in BeginRefit, Ready, Ack and Done);
# 7: DirectLayout.plan_id, DirectRepeat
PROTOCOL_VERSION = 7


class ProtocolError(ValueError):
    """A frame that is not a well-formed message of this protocol."""


# The whitelist: only these dtypes are accepted on the wire, in either direction.
_DTYPE_BY_NAME: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
    "complex64": torch.complex64,
}
# fp8 exists only in newer torch builds; the names are literals, never taken from the wire.
for _name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"):
    if hasattr(torch, _name):
        _DTYPE_BY_NAME[_name] = getattr(torch, _name)
_NAME_BY_DTYPE: dict[torch.dtype, str] = {d: n for n, d in _DTYPE_BY_NAME.items()}


def dtype_to_name(dtype: torch.dtype) -> str:
    try:
        return _NAME_BY_DTYPE[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} is not supported by the weight transfer") from None


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPE_BY_NAME[name]
    except (KeyError, TypeError):
        raise ProtocolError(f"dtype {name!r} is not in the transfer's whitelist") from None


@dataclass(frozen=True)
class ShmBuffer:
    """One POSIX shared-memory segment (a file under /dev/shm)."""

    name: str
    nbytes: int


@dataclass(frozen=True)
class CudaIpcBuffer:
    """The fields of `UntypedStorage._share_cuda_()` for one device buffer, plus the GPU's UUID."""

    device_uuid: str
    device_index: int
    handle: bytes
    storage_nbytes: int
    storage_offset_bytes: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool
    nbytes: int
    # IPC handle of an interprocess CUDA event the sender records after packing this buffer: the receiver
    # waits on it instead of the sender blocking its host on a device synchronize per bucket.
    packed_event: bytes = b""


@dataclass(frozen=True)
class NcclBuffer:
    """One sender buffer of the `nccl` transport; its bytes move by broadcast in a private 2-rank group
    whose rendezvous store (a torch TCPStore run by the sender) listens at store_host:store_port."""

    store_host: str
    store_port: int
    backend: str  # "nccl" (cuda) or "gloo" (cpu)
    nbytes: int


@dataclass(frozen=True)
class Hello:
    """The handshake: what the sender's buffers are and how they are synchronised."""

    protocol: int
    transport: str
    sync: str
    bucket_bytes: int
    generation: int  # bumps whenever the sender allocates fresh buffers
    shm_buffers: list[ShmBuffer]
    cuda_buffers: list[CudaIpcBuffer]
    nccl_buffers: list[NcclBuffer] = field(default_factory=list)
    mode: str = "bucketed"  # or "direct": a DirectLayout follows instead of buckets
    num_receivers: int = (
        1  # every receiver maps the same buffers (shm, cuda_ipc) or joins one group (nccl)
    )
    _lists: ClassVar[dict[str, type]] = {
        "shm_buffers": ShmBuffer,
        "cuda_buffers": CudaIpcBuffer,
        "nccl_buffers": NcclBuffer,
    }

    @property
    def num_buffers(self) -> int:
        return len(self.shm_buffers) + len(self.cuda_buffers) + len(self.nccl_buffers)


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor (or one chunk of a tensor larger than a bucket) lies in a bucket."""

    name: str
    dtype: str
    shape: list[int]
    offset: int  # in the bucket, aligned
    nbytes: int  # of this chunk
    chunk_index: int  # chunk k of num_chunks covers bytes [k * bucket_bytes, ...) of the tensor
    num_chunks: int
    tensor_nbytes: int


@dataclass(frozen=True)
class BeginRefit:
    session: int  # random per sender: a restarted sender is a new session
    refit_id: int
    version: int
    hello: Hello
    receiver: int = 0  # the rank this BeginRefit is addressed to
    _nested: ClassVar[dict[str, type]] = {"hello": Hello}


@dataclass(frozen=True)
class Ready:
    refit_id: int
    attached: bool  # False: the buffers named in the Hello could not be attached
    detail: str
    receiver: int = 0


@dataclass(frozen=True)
class BucketMeta:
    """Where each tensor of bucket k lies; its bytes may not be there yet (see Packed)."""

    refit_id: int
    bucket_index: int
    buffer_index: int
    nbytes: int  # extent used in the buffer, padding included
    is_last: bool
    entries: list[TensorEntry]
    _lists: ClassVar[dict[str, type]] = {"entries": TensorEntry}


@dataclass(frozen=True)
class Packed:
    """Bucket k's bytes are in its buffer (cuda_ipc: once the buffer's packed event fires)."""

    refit_id: int
    bucket_index: int
    checksum: int  # xxh3_64 of the extent, or -1 when verification is off


@dataclass(frozen=True)
class Ack:
    refit_id: int
    bucket_index: int
    buffer_index: int  # the buffer the sender may overwrite now (once every receiver acked it)
    receiver: int = 0


@dataclass(frozen=True)
class EndOfRefit:
    refit_id: int
    num_tensors: int
    num_bytes: int
    num_buckets: int


@dataclass(frozen=True)
class Done:
    refit_id: int
    receiver: int = 0


@dataclass(frozen=True)
class Error:
    refit_id: int
    message: str


@dataclass(frozen=True)
class ShmSegment:
    """One storage of the trainer in (unlinked) shared memory, opened as /proc/<pid>/fd/<fd>; the inode
    tells the receiver that the descriptor still names that file (a closed descriptor's number is reused)."""

    segment_id: int
    pid: int
    fd: int
    inode: int
    nbytes: int


@dataclass(frozen=True)
class CudaSegment:
    """One storage of the trainer on its GPU, exported through CUDA IPC (packed_event unused)."""

    segment_id: int
    ipc: CudaIpcBuffer
    _nested: ClassVar[dict[str, type]] = {"ipc": CudaIpcBuffer}


@dataclass(frozen=True)
class DirectEntry:
    """Where one tensor lies in a segment; segment_id 0 is an empty tensor, which has no storage."""

    name: str
    dtype: str
    shape: list[int]
    segment_id: int
    offset: int  # bytes from the segment's start
    nbytes: int


@dataclass(frozen=True)
class DirectLayout:
    """A direct refit: every segment it uses (the receiver maps those it has not mapped yet and drops the
    rest) and where each tensor lies."""

    refit_id: int
    plan_id: int  # the sender's number for this layout; a later DirectRepeat names it
    shm_segments: list[ShmSegment]
    cuda_segments: list[CudaSegment]
    entries: list[DirectEntry]
    _lists: ClassVar[dict[str, type]] = {
        "shm_segments": ShmSegment,
        "cuda_segments": CudaSegment,
        "entries": DirectEntry,
    }


@dataclass(frozen=True)
class DirectRepeat:
    """A direct refit whose tensors lie exactly where the DirectLayout of plan `plan_id` said (the same
    storages, offsets, shapes and dtypes): the receiver reuses what it built for that plan, nothing is decoded
    or checked again."""

    refit_id: int
    plan_id: int


_TAGS: dict[int, type] = {
    1: BeginRefit,
    2: Ready,
    3: BucketMeta,
    4: Ack,
    5: EndOfRefit,
    6: Done,
    7: Error,
    8: Packed,
    9: DirectLayout,
    10: DirectRepeat,
}
_TAG_OF: dict[type, int] = {cls: tag for tag, cls in _TAGS.items()}
Message = (
    BeginRefit
    | Ready
    | BucketMeta
    | Packed
    | Ack
    | EndOfRefit
    | Done
    | Error
    | DirectLayout
    | DirectRepeat
)


# Plain-value checks per annotation, so a malformed peer fails here and not deep inside a refit.
_PLAIN: dict[str, type | tuple[type, ...]] = {
    "int": int,
    "str": str,
    "bytes": bytes,
    "bool": bool,
    "list[int]": list,
}


def _to_wire(obj: Any) -> list:
    nested, lists = getattr(obj, "_nested", {}), getattr(obj, "_lists", {})
    out = []
    for f in fields(obj):
        value = getattr(obj, f.name)
        if f.name in nested:
            value = _to_wire(value)
        elif f.name in lists:
            value = [_to_wire(v) for v in value]
        out.append(value)
    return out


def _from_wire(cls: type, values: Any) -> Any:
    flds = fields(cls)
    if not isinstance(values, list) or len(values) != len(flds):
        raise ProtocolError(f"{cls.__name__} expects {len(flds)} fields, got {values!r:.200}")
    nested, lists = getattr(cls, "_nested", {}), getattr(cls, "_lists", {})
    kwargs = {}
    for f, value in zip(flds, values):
        if f.name in nested:
            value = _from_wire(nested[f.name], value)
        elif f.name in lists:
            if not isinstance(value, list):
                raise ProtocolError(f"{cls.__name__}.{f.name} must be a list, got {value!r:.100}")
            value = [_from_wire(lists[f.name], v) for v in value]
        elif not isinstance(value, _PLAIN[f.type]):
            raise ProtocolError(f"{cls.__name__}.{f.name} must be {f.type}, got {value!r:.100}")
        kwargs[f.name] = value
    return cls(**kwargs)


def encode(msg: Message) -> bytes:
    return msgpack.packb([_TAG_OF[type(msg)], *_to_wire(msg)], use_bin_type=True)


def decode(frame: bytes) -> Message:
    try:
        values = msgpack.unpackb(frame, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"undecodable frame ({len(frame)} bytes): {exc}") from None
    if not isinstance(values, list) or not values or values[0] not in _TAGS:
        raise ProtocolError(f"unknown message {values!r:.200}")
    return _from_wire(_TAGS[values[0]], values[1:])
