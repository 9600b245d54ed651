"""FSDP2 on one trainer rank: shard a Hugging Face model over the ranks' mesh, and gather it back tensor by
tensor for a refit without ever holding a full copy of the model.

Each transformer block is its own FSDP unit (its parameters are gathered for its forward and freed after),
the root holds the rest (embeddings, final norm, head). Gradients are summed over the ranks, not averaged:
every rank weights its loss by its share of the GLOBAL token count, so the sum is one rank's gradient.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn


def shard_model(model: nn.Module, mesh) -> nn.Module:
    """`fully_shard` every block of the model's first ModuleList, then the root; in place, returns the model."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    blocks = next((m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0), None)
    for block in blocks if blocks is not None else ():
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for unit in model.modules():
        if isinstance(unit, FSDPModule):  # each unit reduces its own gradients
            unit.set_gradient_divide_factor(
                1.0
            )  # sum: each rank's loss already carries its global token share
            unit.set_force_sum_reduction_for_comms(
                True
            )  # a plain SUM: gloo has no pre-multiplied sum
    return model


def full_grad_norm(norm: torch.Tensor) -> float:
    """`clip_grad_norm_`'s total norm as a float; over DTensor gradients it is a DTensor of the whole model's norm."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


@dataclass
class GatherMeter:
    """Bytes of gathered full tensors still alive while a refit runs, and their peak: the refit's extra
    memory on this rank beside the transfer buffers. Measured by the tensors' lifetimes (weak references),
    so it sees exactly what the bucket planner and the sender still hold."""

    live_bytes: int = 0
    peak_bytes: int = 0
    largest_tensor_bytes: int = 0

    def track(self, tensor: torch.Tensor) -> torch.Tensor:
        nbytes = tensor.numel() * tensor.element_size()
        self.live_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        self.largest_tensor_bytes = max(self.largest_tensor_bytes, nbytes)
        weakref.finalize(tensor, self._release, nbytes)
        return tensor

    def _release(self, nbytes: int) -> None:
        self.live_bytes -= nbytes


def gathered_parameters(
    model: nn.Module, meter: GatherMeter | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) for each parameter in order, each all-gathered from the shards only when asked for.

    Every rank must iterate to the end in the same order (each `full_tensor()` is a collective); ranks that
    do not send drop each tensor at once.
    """
    for name, param in model.named_parameters():
        data = param.detach()
        full = data.full_tensor() if hasattr(data, "full_tensor") else data
        yield name, meter.track(full) if meter is not None else full


def drain(named_tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Finish a gather another rank is still in (its collectives must all be matched), dropping each tensor."""
    for _ in named_tensors:
        pass
