"""Bitwise round trips between a sender process and a receiver (this process), over real shm and ZMQ,
and over a real torch.distributed group for the nccl transport (gloo on CPU)."""

from __future__ import annotations

import os

import pytest
import torch
from transfer_procs import (
    as_bytes,
    listening,
    mixed_tensors,
    our_segments,
    send_in_thread,
    store_ports,
)

from rollout.transfer import PeerError, TransferConfig, WeightReceiver, WeightSender, new_endpoint

TIMEOUT_S = 20.0


TRANSPORTS = ["shm", "nccl"]


def _cfg(**kw) -> dict:
    return {"transport": "shm", "timeout_s": TIMEOUT_S, **kw}


def _receive_all(cfg_kwargs: dict, endpoint: str, num_refits: int, consume_factory):
    outcomes = []
    with WeightReceiver(TransferConfig(**cfg_kwargs), endpoint, device="cpu") as receiver:
        for i in range(num_refits):
            try:
                outcomes.append(("ok", receiver.receive(consume_factory(i))))
            except Exception as exc:
                outcomes.append(("error", exc))
        hello = receiver._hello
    return outcomes, hello


def _collector(store: dict, calls: list):
    def consume(weights, is_last):
        calls.append(is_last)
        for name, view in weights:
            assert name not in store, f"{name} delivered twice"
            store[name] = view.clone()

    return consume


@pytest.mark.parametrize("bucket_mb, spin_us", [(1, 2000), (2, 0)], ids=["1MB", "2MB-nospin"])
@pytest.mark.parametrize("sync", ["fenced", "double_buffer", "clone"])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_bitwise_round_trip_over_many_refits(sender_server, transport, sync, bucket_mb, spin_us):
    cfg = _cfg(transport=transport, sync=sync, bucket_mb=bucket_mb, spin_us=spin_us)
    endpoint = new_endpoint()
    seeds = [11, 12, 13]
    sender_server.run(
        cfg,
        endpoint,
        [
            {"kind": "mixed", "bucket_bytes": bucket_mb << 20, "seed": s, "version": s}
            for s in seeds
        ],
    )
    stores = [{} for _ in seeds]
    calls = [[] for _ in seeds]
    outcomes, hello = _receive_all(
        cfg, endpoint, len(seeds), lambda i: _collector(stores[i], calls[i])
    )
    sent = sender_server.result()

    for seed, store, is_last_flags, (status, stats), result in zip(
        seeds, stores, calls, outcomes, sent
    ):
        assert status == "ok", stats
        assert result[0] == "ok", result
        expected = mixed_tensors(bucket_mb << 20, seed)
        assert list(store) == [n for n, _ in expected]  # order kept
        for name, tensor in expected:
            got = store[name]
            assert got.dtype == tensor.dtype and got.shape == tensor.shape, name
            assert torch.equal(as_bytes(got), as_bytes(tensor)), f"{name} differs"
        assert is_last_flags[-1] is True and not any(is_last_flags[:-1])
        assert stats.version == seed and stats.num_tensors == len(expected)
        assert stats.num_bytes == sum(t.numel() * t.element_size() for _, t in expected)
        assert result[1:] == (stats.version, stats.num_tensors, stats.num_buckets, stats.num_bytes)
        assert stats.num_buckets >= 4  # the 3.5x tensor alone spans 4 buckets
    if transport == "shm":
        names = [b.name for b in hello.shm_buffers]
        assert names and not our_segments(names)
    else:  # one group (one store) served every refit, and it is gone with the sender
        assert hello.num_buffers == len(hello.nccl_buffers) and len(store_ports(hello)) == 1
        assert not listening(store_ports(hello)[0])
    assert not os.path.exists(endpoint[len("ipc://") :])


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_zero_tensor_refit_completes_without_consume(sender_server, transport):
    cfg = _cfg(transport=transport, sync="fenced", bucket_mb=1)
    endpoint = new_endpoint()
    sender_server.run(
        cfg, endpoint, [{"kind": "zero", "version": 3}, {"kind": "race", "version": 4}]
    )
    calls = []
    outcomes, _ = _receive_all(
        cfg, endpoint, 2, lambda i: lambda w, last: calls.append((i, len(w)))
    )
    sent = sender_server.result()
    assert [o[0] for o in outcomes] == ["ok", "ok"] and [r[0] for r in sent] == ["ok", "ok"]
    assert (
        outcomes[0][1].num_tensors == 0
        and outcomes[0][1].num_buckets == 0
        and outcomes[0][1].version == 3
    )
    assert calls and all(i == 1 for i, _ in calls)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_consume_error_reaches_sender_and_next_refit_works(sender_server, transport):
    cfg = _cfg(transport=transport, sync="fenced", bucket_mb=1)
    endpoint = new_endpoint()
    sender_server.run(cfg, endpoint, [{"kind": "race", "version": v} for v in (1, 2)])

    def consume_factory(i):
        def consume(weights, is_last):
            if i == 0:
                raise RuntimeError("load_weights exploded on purpose")

        return consume

    outcomes, hello = _receive_all(cfg, endpoint, 2, consume_factory)
    sent = sender_server.result()
    assert outcomes[0][0] == "error" and "exploded on purpose" in str(outcomes[0][1])
    assert (
        sent[0][0] == "error" and sent[0][1] == "PeerError" and "exploded on purpose" in sent[0][2]
    )
    assert outcomes[1][0] == "ok" and outcomes[1][1].version == 2 and sent[1][0] == "ok"
    assert (
        hello.generation == 2
    )  # a failed refit closes the transport on both ends: fresh buffers or group


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_duplicate_name_is_a_value_error_and_next_refit_works(sender_server, transport):
    cfg = _cfg(transport=transport, sync="double_buffer", bucket_mb=1)
    endpoint = new_endpoint()
    sender_server.run(
        cfg, endpoint, [{"kind": "duplicate", "version": 1}, {"kind": "race", "version": 2}]
    )
    outcomes, hello = _receive_all(cfg, endpoint, 2, lambda i: lambda w, last: None)
    sent = sender_server.result()
    assert sent[0][:2] == ("error", "ValueError") and "'layer.3'" in sent[0][2]
    assert (
        outcomes[0][0] == "error"
        and isinstance(outcomes[0][1], PeerError)
        and "duplicate" in str(outcomes[0][1])
    )
    assert outcomes[1][0] == "ok" and sent[1][0] == "ok"
    assert hello.generation == 2


def test_receiver_may_start_before_sender(sender_server):
    cfg = _cfg(sync="fenced", bucket_mb=1)
    endpoint = new_endpoint()
    receiver = WeightReceiver(
        TransferConfig(**cfg), endpoint, device="cpu"
    )  # connects to nothing yet
    sender_server.run(cfg, endpoint, [{"kind": "race", "version": 5}])
    with receiver:
        stats = receiver.receive(lambda w, last: None)
    assert stats.version == 5 and sender_server.result()[0][0] == "ok"


def test_config_mismatch_is_reported_on_both_ends(sender_server):
    endpoint = new_endpoint()
    sender_server.run(
        _cfg(sync="double_buffer", bucket_mb=1), endpoint, [{"kind": "race", "version": 1}]
    )
    outcomes, _ = _receive_all(
        _cfg(sync="fenced", bucket_mb=1), endpoint, 1, lambda i: lambda w, last: None
    )
    sent = sender_server.result()
    assert outcomes[0][0] == "error" and "sync mismatch" in str(outcomes[0][1])
    assert sent[0][1] == "PeerError" and "sync mismatch" in sent[0][2]


@pytest.mark.parametrize(("sync", "num_buffers"), [("fenced", 1), ("double_buffer", 2)])
def test_both_ends_tell_their_observer_every_step_of_every_bucket_in_order(sync, num_buffers):
    """on_step, the public seam a timeline is built from: each bucket's steps, in order, on both ends."""
    cfg = TransferConfig(**_cfg(sync=sync, bucket_mb=1))
    endpoint = new_endpoint()
    sent, got = [], []
    with WeightSender(
        cfg, endpoint, device="cpu", on_step=lambda step, k: sent.append((step, k))
    ) as sender:
        with WeightReceiver(
            cfg, endpoint, on_step=lambda step, k: got.append((step, k))
        ) as receiver:
            thread, outcome = send_in_thread(sender, 1, num_tensors=20)
            num_buckets = receiver.receive(lambda w, last: None).num_buckets
            thread.join(20)
    assert outcome[0].num_buckets == num_buckets >= 3

    def by_bucket(steps):
        return {k: [step for step, i in steps if i == k] for k in range(num_buckets)}

    assert len(sent) == 5 * num_buckets and len(got) == 3 * num_buckets
    sender_steps = ["send BucketMeta", "pack start", "pack end", "send Packed", "got Ack"]
    assert by_bucket(sent) == dict.fromkeys(range(num_buckets), sender_steps)
    assert by_bucket(got) == dict.fromkeys(
        range(num_buckets), ["got BucketMeta", "got Packed", "send Ack"]
    )
    # a buffer is packed again only after its previous bucket's Ack
    assert all(
        sent.index(("got Ack", k - num_buffers)) < sent.index(("pack start", k))
        for k in range(num_buffers, num_buckets)
    )
