"""What a captured CUDA graph must find where it left it: every parameter, buffer and tensor
attribute of the engine's model, by name, with its data pointer and a digest of its bytes.

A graph replays kernels on the addresses it captured; a refit that re-allocates any tensor the model
reads leaves the graph reading freed or stale memory, silently. `snapshot` records the model once
the graphs are captured (the engine's start) and again after each refit; `compare` names what moved
(pointer, size, dtype or shape differ from the start), what appeared or vanished, and what changed
value. `rollout.graph_audit=true` puts the comparison into `RefitStats.graph_audit` (GraphAudit
below).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

_CHUNK = 1 << 22  # words per reduction: 32 MB of int64 temporaries at a time


@dataclass(frozen=True)
class TensorRecord:
    kind: str  # "parameter", "buffer" or "attribute" (a plain tensor in a module's __dict__)
    ptr: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]
    digest: int

    def same_place(self, other: TensorRecord) -> bool:
        return (self.ptr, self.nbytes, self.dtype, self.shape) == (
            other.ptr,
            other.nbytes,
            other.dtype,
            other.shape,
        )


def model_tensors(model: torch.nn.Module) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(kind, name, tensor) of every parameter, buffer and plain tensor attribute, aliases included
    (a tied head appears under both names), meta tensors left out."""
    for name, p in model.named_parameters(remove_duplicate=False):
        yield "parameter", name, p
    for name, b in model.named_buffers(remove_duplicate=False):
        yield "buffer", name, b
    for prefix, module in model.named_modules(remove_duplicate=False):
        for attr, value in vars(module).items():
            if isinstance(value, torch.Tensor) and not attr.startswith("__"):
                yield "attribute", f"{prefix}.{attr}" if prefix else attr, value


def digests(tensors: Sequence[torch.Tensor]) -> list[int]:
    """A position-sensitive integer digest of each tensor's bytes, computed where it lives (one
    sync)."""
    out, cache = [], {}
    for t in tensors:
        key = (t.data_ptr(), t.nbytes, t.dtype, tuple(t.shape), tuple(t.stride()))
        if key not in cache:
            cache[key] = _digest(t)
        out.append(cache[key])
    return [int(d) for d in torch.stack(out).cpu().tolist()] if out else []


def _digest(t: torch.Tensor) -> torch.Tensor:
    flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
    try:
        words = flat.view(torch.int32)
    except RuntimeError:  # a size or offset not a multiple of 4 bytes
        words = flat
    weights = (
        torch.arange(min(_CHUNK, max(words.numel(), 1)), device=t.device, dtype=torch.int64) % 65521
    ) * 2 + 1
    total = torch.tensor(words.numel(), dtype=torch.int64, device=t.device)
    for lo in range(0, words.numel(), _CHUNK):
        w = words[lo : lo + _CHUNK].to(torch.int64)
        total = (
            total * 1_000_003 + (w * weights[: w.numel()]).sum()
        )  # int64 arithmetic wraps: a digest
    return total


@torch.no_grad()
def snapshot(model: torch.nn.Module, device_type: str | None = None) -> dict[str, TensorRecord]:
    """Every tensor of `model` (only those on `device_type`, if given: a CUDA graph reads device
    memory; a host-side copy such as vLLM's `_k_scale_cpu` is re-made by the layerwise reload and
    never captured)."""
    found = [
        (kind, name, t)
        for kind, name, t in model_tensors(model)
        if t.device.type != "meta" and device_type in (None, t.device.type)
    ]
    values = digests([t for _, _, t in found])
    return {
        name: TensorRecord(
            kind, t.data_ptr(), t.nbytes, str(t.dtype).removeprefix("torch."), tuple(t.shape), d
        )
        for (kind, name, t), d in zip(found, values)
    }


def compare(
    start: dict[str, TensorRecord], before: dict[str, TensorRecord], after: dict[str, TensorRecord]
) -> dict[str, Any]:
    """Plain data (it crosses vLLM's RPC): `moved` (in place at `start`, elsewhere or reshaped
    `after`), `missing` and `added` (against `start`), `changed` (how many digests differ from
    `before`) and the parameters whose value did not change."""
    moved = sorted(n for n, r in start.items() if n in after and not r.same_place(after[n]))
    unchanged = sorted(
        n
        for n, r in after.items()
        if r.kind == "parameter" and n in before and before[n].digest == r.digest
    )
    return {
        "tensors": len(after),
        "moved": moved,
        "missing": sorted(set(start) - set(after)),
        "added": sorted(set(after) - set(start)),
        "changed": sum(1 for n, r in after.items() if n in before and before[n].digest != r.digest),
        "unchanged_parameters": unchanged,
    }


@dataclass(frozen=True)
class GraphAudit:
    """One refit's audit over every worker (names prefixed `w<rank>:` where there are several).

    Example:
        stats = ro.update_weights(params, version=3)    # rollout.graph_audit=true
        assert stats.graph_audit.keeps_pointers, stats.graph_audit
    """

    tensors: int
    moved: tuple[str, ...]
    missing: tuple[str, ...]
    added: tuple[str, ...]
    changed: int
    unchanged_parameters: tuple[str, ...]

    @property
    def keeps_pointers(self) -> bool:
        """Every tensor the engine started with is where it was, with its size, dtype and shape."""
        return not (self.moved or self.missing or self.added)

    @classmethod
    def of(cls, replies: Sequence[dict[str, Any]]) -> GraphAudit:
        def names(key: str) -> tuple[str, ...]:
            if len(replies) == 1:
                return tuple(replies[0][key])
            return tuple(f"w{k}:{n}" for k, r in enumerate(replies) for n in r[key])

        return cls(
            sum(r["tensors"] for r in replies),
            names("moved"),
            names("missing"),
            names("added"),
            sum(r["changed"] for r in replies),
            names("unchanged_parameters"),
        )
