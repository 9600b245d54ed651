"""Sync policies: when the sender may overwrite a bucket buffer. They decide the ack protocol and
know nothing about bytes.

The sender side of a policy is just `num_buffers`: it packs into a free buffer and, when none is
free, waits for an Ack naming one. The receiver side is `deliver`, which orders the consumer call,
the device fence and the ack — the ordering that decides whether the zero-copy views can be
overwritten while the consumer still reads them.
"""

from __future__ import annotations

from typing import Callable

import torch

from rollout.transfer.config import Sync

Weights = list[tuple[str, torch.Tensor]]
Consume = Callable[[Weights, bool], None]


class Fenced:
    """One buffer: consume the views, synchronize the device, then ack. Zero-copy and safe, serial."""

    name = Sync.fenced
    num_buffers = 1

    def deliver(
        self,
        weights: Weights,
        is_last: bool,
        consume: Consume,
        fence: Callable[[], None],
        ack: Callable[[], None],
    ) -> None:
        if weights:
            consume(weights, is_last)
        fence()  # the consumer's kernels may still be reading the buffer
        ack()


class DoubleBuffer(Fenced):
    """Two buffers in turn: same receiver ordering as Fenced, but the sender packs bucket k+1 into
    the other buffer while bucket k is consumed, so the two copies overlap."""

    name = Sync.double_buffer
    num_buffers = 2


class Clone:
    """The pre-fix baseline, kept for measurement: copy the views out, ack, then consume the copies."""

    name = Sync.clone
    num_buffers = 1

    def deliver(
        self,
        weights: Weights,
        is_last: bool,
        consume: Consume,
        fence: Callable[[], None],
        ack: Callable[[], None],
    ) -> None:
        copies = [(name, view.clone()) for name, view in weights]
        fence()
        ack()
        if copies:
            consume(copies, is_last)


SyncPolicy = Fenced | Clone


def make_sync_policy(sync: Sync) -> SyncPolicy:
    return {Sync.fenced: Fenced, Sync.double_buffer: DoubleBuffer, Sync.clone: Clone}[Sync(sync)]()
