"""The race the sync policies exist for: a consumer that reads its zero-copy views late must never
see the next bucket's bytes. The same test, with the ordering deliberately broken (ack before
consume), must catch the corruption — that is what proves it can fail.

The nccl transport runs the late-reader test too. The broken ordering cannot corrupt it, by design:
its receiver reads its own buffer, which only its own next pull (after consume returned) overwrites."""

from __future__ import annotations

import time

import pytest

from rollout.transfer import TransferConfig, WeightReceiver, new_endpoint
from rollout.transfer.sync import Fenced
from transfer_procs import race_value

NUM_REFITS = 8


class AckBeforeConsume(Fenced):
    """The pre-fix bug without the clone that hid it: ack first, then hand out the views."""

    def deliver(self, weights, is_last, consume, fence, ack):
        fence()
        ack()
        consume(weights, is_last)


def _slow_checking_consume(version: int):
    def consume(weights, is_last):
        time.sleep(0.02)  # the sender is free to pack the next bucket meanwhile, if it was acked
        for name, view in weights:
            expected = race_value(version, name)
            if not bool((view == expected).all()):
                raise AssertionError(f"corrupt view {name}: expected {expected}, found {view.unique()[:4].tolist()}")

    return consume


def _run_race(sender_server, sync: str, policy=None, transport: str = "shm") -> list:
    cfg = {"transport": transport, "bucket_mb": 1, "sync": sync, "timeout_s": 20.0}
    endpoint = new_endpoint()
    versions = list(range(1, NUM_REFITS + 1))
    sender_server.run(cfg, endpoint, [{"kind": "race", "version": v} for v in versions])
    outcomes = []
    with WeightReceiver(TransferConfig(**cfg), endpoint, device="cpu") as receiver:
        if policy is not None:
            receiver._policy = policy  # the test injects the broken ordering; no config value exposes it
        for v in versions:
            try:
                stats = receiver.receive(_slow_checking_consume(v))
                outcomes.append(("ok", stats.num_buckets))
            except AssertionError as exc:
                outcomes.append(("corrupt", str(exc)))
    sender_server.result()
    return outcomes


@pytest.mark.parametrize("sync", ["fenced", "double_buffer", "clone"])
@pytest.mark.parametrize("transport", ["shm", "nccl"])
def test_late_reader_never_sees_overwritten_views(sender_server, transport, sync):
    outcomes = _run_race(sender_server, sync, transport=transport)
    assert all(status == "ok" for status, _ in outcomes), outcomes
    assert all(num_buckets >= 3 for _, num_buckets in outcomes)  # several buckets share the buffer(s)


def test_race_test_catches_ack_before_consume(sender_server):
    outcomes = _run_race(sender_server, "fenced", policy=AckBeforeConsume())
    assert any(status == "corrupt" for status, _ in outcomes), outcomes
