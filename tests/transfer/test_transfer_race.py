"""The race the sync policies exist for: a consumer that reads its zero-copy views late must never
see the next bucket's bytes. The same test, with the ordering deliberately broken (ack before
consume), must catch the corruption — that is what proves it can fail.

The nccl transport runs the late-reader test too. The broken ordering cannot corrupt it, by design:
its receiver reads its own buffer, which only its own next pull (after consume returned) overwrites.

Fan-out: with several receivers the sender may reuse a buffer only once EVERY receiver acked it. The
fan-out tests pair a fast receiver with a slow, checking one: the slow one sees its views overwritten
as soon as the sender moves on after the fast one's ack alone, or after its own early ack."""

from __future__ import annotations

import threading
import time

import pytest
from transfer_procs import race_value

from rollout.transfer import PeerError, TransferConfig, WeightReceiver, new_endpoint
from rollout.transfer.sync import Fenced

NUM_REFITS = 8


class AckBeforeConsume(Fenced):
    """The pre-fix bug without the clone that hid it: ack first, then hand out the views."""

    def deliver(self, weights, is_last, consume, fence, ack):
        fence()
        ack()
        consume(weights, is_last)


def _slow_checking_consume(version: int, delay_s: float = 0.02):
    def consume(weights, is_last):
        time.sleep(delay_s)  # the sender is free to pack the next bucket meanwhile, if it was acked
        for name, view in weights:
            expected = race_value(version, name)
            if not bool((view == expected).all()):
                raise AssertionError(
                    f"corrupt view {name}: expected {expected}, found {view.unique()[:4].tolist()}"
                )

    return consume


def _receive_all(
    cfg: dict, endpoint: str, versions: list[int], rank: int, policy, delay_s: float
) -> list:
    outcomes = []
    with WeightReceiver(TransferConfig(**cfg), endpoint, device="cpu", rank=rank) as receiver:
        if policy is not None:
            receiver._policy = (
                policy  # the test injects the broken ordering; no config value exposes it
            )
        for v in versions:
            try:
                stats = receiver.receive(_slow_checking_consume(v, delay_s))
                outcomes.append(("ok", stats.num_buckets))
            except AssertionError as exc:
                outcomes.append(("corrupt", str(exc)))
            except PeerError as exc:  # another receiver's refit failed, so the sender aborted ours
                outcomes.append(("aborted", str(exc)))
    return outcomes


def _run_race(sender_server, sync: str, policies=(None,), transport: str = "shm") -> list[list]:
    """One sender, len(policies) receivers; the last one is the slow, checking one (the others check
    too, without delay). Returns each receiver's outcomes."""
    cfg = {"transport": transport, "bucket_mb": 1, "sync": sync, "timeout_s": 20.0}
    endpoint = new_endpoint()
    versions = list(range(1, NUM_REFITS + 1))
    last = len(policies) - 1
    sender_server.run(
        cfg,
        endpoint,
        [{"kind": "race", "version": v} for v in versions],
        num_receivers=len(policies),
    )
    outcomes: list[list] = [[] for _ in policies]

    def run(rank: int) -> None:
        outcomes[rank] = _receive_all(
            cfg, endpoint, versions, rank, policies[rank], 0.02 if rank == last else 0.0
        )

    threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in range(last)]
    for t in threads:
        t.start()
    run(last)
    for t in threads:
        t.join(60)
    sender_server.result()  # a corrupt view fails the consume, so that refit fails on the sender too
    return outcomes


@pytest.mark.parametrize("sync", ["fenced", "double_buffer", "clone"])
@pytest.mark.parametrize("transport", ["shm", "nccl"])
def test_late_reader_never_sees_overwritten_views(sender_server, transport, sync):
    (outcomes,) = _run_race(sender_server, sync, transport=transport)
    assert all(status == "ok" for status, _ in outcomes), outcomes
    assert all(
        num_buckets >= 3 for _, num_buckets in outcomes
    )  # several buckets share the buffer(s)


def test_race_test_catches_ack_before_consume(sender_server):
    (outcomes,) = _run_race(sender_server, "fenced", policies=(AckBeforeConsume(),))
    assert any(status == "corrupt" for status, _ in outcomes), outcomes


@pytest.mark.parametrize(
    ("transport", "sync"), [("shm", "fenced"), ("shm", "double_buffer"), ("nccl", "fenced")]
)
def test_fanout_slow_receiver_never_sees_overwritten_views(sender_server, transport, sync):
    """Two receivers, the second slow: the sender waits for both Acks before it packs a buffer again."""
    outcomes = _run_race(sender_server, sync, policies=(None, None), transport=transport)
    assert all(status == "ok" for per_receiver in outcomes for status, _ in per_receiver), outcomes
    assert all(num_buckets >= 3 for per_receiver in outcomes for _, num_buckets in per_receiver)


def test_fanout_race_test_catches_one_receivers_ack_before_consume(sender_server):
    """The same test with the slow receiver acking before it consumes (the fast one is correct) fails."""
    fast, slow = _run_race(sender_server, "fenced", policies=(None, AckBeforeConsume()))
    assert any(status == "corrupt" for status, _ in slow), slow
    assert all(status in ("ok", "aborted") for status, _ in fast), fast
