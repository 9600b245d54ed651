"""Fan-out: one sender, N receivers (every worker of a tensor-parallel engine, or of several engines). Each
bucket is packed once and read by all; a missing, failing or killed receiver fails the refit within
timeout_s with an error naming its rank, and nothing of ours is left behind."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch
from transfer_procs import (
    CTX,
    as_bytes,
    mixed_tensors,
    our_segments,
    race_tensors,
    receiver_that_dies,
    recording_allocate,
)

from rollout.transfer import (
    PeerError,
    TransferConfig,
    TransferTimeout,
    WeightReceiver,
    WeightSender,
    new_endpoint,
)
from rollout.transfer.channel import receiver_endpoint

SHORT = {"transport": "shm", "bucket_mb": 1, "sync": "fenced", "timeout_s": 1.5}


def _socket_dir(endpoint: str) -> str:
    return os.path.dirname(endpoint[len("ipc://") :])


def _in_threads(num: int, target) -> tuple[list[threading.Thread], list]:
    """Run target(rank) for ranks 0..num-1 in threads; results[rank] is its return value or exception."""
    results: list = [None] * num

    def run(rank: int) -> None:
        try:
            results[rank] = target(rank)
        except Exception as exc:  # noqa: BLE001 - the test asserts on it
            results[rank] = exc

    threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in range(num)]
    for t in threads:
        t.start()
    return threads, results


def _receive_once(
    cfg_kwargs: dict, endpoint: str, rank: int, consume=lambda weights, is_last: None
):
    with WeightReceiver(TransferConfig(**cfg_kwargs), endpoint, rank=rank) as receiver:
        return receiver.receive(consume)


def _join(threads: list[threading.Thread], timeout_s: float = 60.0) -> None:
    for t in threads:
        t.join(timeout_s)
        assert not t.is_alive(), "a receiver thread is stuck"


@pytest.mark.parametrize(
    ("transport", "sync"), [("shm", "fenced"), ("shm", "double_buffer"), ("nccl", "fenced")]
)
def test_every_receiver_gets_every_byte_of_one_packing(sender_server, transport, sync):
    num_receivers, bucket_mb, seeds = 3, 1, [21, 22]
    cfg = {"transport": transport, "sync": sync, "bucket_mb": bucket_mb, "timeout_s": 20.0}
    endpoint = new_endpoint()
    plan = [
        {"kind": "mixed", "bucket_bytes": bucket_mb << 20, "seed": s, "version": s} for s in seeds
    ]
    sender_server.run(cfg, endpoint, plan, num_receivers=num_receivers)

    def receive(rank: int):
        stores = []
        with WeightReceiver(TransferConfig(**cfg), endpoint, device="cpu", rank=rank) as receiver:
            for _ in seeds:
                store: dict[str, torch.Tensor] = {}
                receiver.receive(
                    lambda weights, is_last: store.update((n, v.clone()) for n, v in weights)
                )
                stores.append(store)
            return stores, receiver._hello

    threads, results = _in_threads(num_receivers, receive)
    _join(threads)
    sent = sender_server.result()
    assert [r[0] for r in sent] == ["ok"] * len(seeds), sent
    hellos = [hello for _, hello in results]
    assert all(h.num_receivers == num_receivers for h in hellos)
    assert (
        len({(tuple(h.shm_buffers), tuple(h.nccl_buffers)) for h in hellos}) == 1
    )  # one set of buffers, read by all
    if transport == "shm":
        assert len(hellos[0].shm_buffers) == (2 if sync == "double_buffer" else 1)
        assert not our_segments(
            [b.name for b in hellos[0].shm_buffers]
        )  # unlinked once all had mapped them
    for i, seed in enumerate(seeds):
        expected = dict(mixed_tensors(bucket_mb << 20, seed))
        for rank, (stores, _) in enumerate(results):
            assert stores[i].keys() == expected.keys(), f"receiver {rank}"
            for name, tensor in expected.items():
                got = stores[i][name]
                assert got.dtype == tensor.dtype and got.shape == tensor.shape, (rank, name)
                assert torch.equal(as_bytes(got), as_bytes(tensor)), (
                    f"receiver {rank}: {name} differs"
                )
    assert not os.path.exists(_socket_dir(endpoint))


def test_missing_receiver_fails_the_refit_within_timeout_naming_it(monkeypatch):
    made = recording_allocate(
        monkeypatch
    )  # a failed refit closes its transport: record its names when made
    endpoint = new_endpoint()
    with WeightSender(TransferConfig(**SHORT), endpoint, num_receivers=2) as sender:
        # receiver 0 waits longer than the sender, so it hears why the refit ended instead of timing out
        threads, results = _in_threads(
            1, lambda rank: _receive_once({**SHORT, "timeout_s": 20.0}, endpoint, rank)
        )
        start = time.monotonic()
        with pytest.raises(TransferTimeout, match="receiver 1") as err:
            sender.send(race_tensors(1, num_tensors=4), version=1)
        assert time.monotonic() - start < 2 * SHORT["timeout_s"] + 1.0
        assert receiver_endpoint(endpoint, 1) in str(err.value)
        _join(threads)
        assert isinstance(results[0], PeerError) and "receiver 1" in str(
            results[0]
        )  # told why, not left waiting
        names = [b.name for b in made[0]["shm_buffers"]]
    assert names and not our_segments(names)
    assert not os.path.exists(_socket_dir(endpoint))


def test_failing_receiver_fails_the_refit_naming_it_and_the_others_hear_why():
    endpoint = new_endpoint()
    cfg = TransferConfig(**{**SHORT, "timeout_s": 20.0})

    def receive(rank: int):
        def consume(weights, is_last):
            if rank == 1:
                raise RuntimeError("receiver 1 cannot load this")

        return _receive_once({**SHORT, "timeout_s": 20.0}, endpoint, rank, consume)

    with WeightSender(cfg, endpoint, num_receivers=3) as sender:
        threads, results = _in_threads(3, receive)
        with pytest.raises(
            PeerError, match="receiver 1 failed refit 1: RuntimeError: receiver 1 cannot load this"
        ):
            sender.send(race_tensors(1), version=1)
        _join(threads)
    assert isinstance(results[1], RuntimeError)
    assert all(
        isinstance(results[r], PeerError) and "receiver 1 cannot load" in str(results[r])
        for r in (0, 2)
    ), results
    assert not os.path.exists(_socket_dir(endpoint))


def test_a_receiver_that_failed_and_closed_is_named_not_timed_out():
    """The ordering the test above hits only sometimes, made certain: receiver 1 fails bucket 0 and closes
    its socket before the sender sends the next BucketMeta, whose send then cannot go out. The sender must
    raise receiver 1's Error (the cause) at once, not after the send's timeout, and the others hear why before
    their own timeout runs out."""
    endpoint = new_endpoint()
    cfg = TransferConfig(
        **{**SHORT, "timeout_s": 20.0}
    )  # a blocking send to the closed receiver waits this long
    gone, gone_at = threading.Event(), []

    def receive(rank: int):
        def consume(weights, is_last):
            if rank == 1:
                raise RuntimeError("receiver 1 cannot load this")

        try:
            return _receive_once({**SHORT, "timeout_s": 20.0}, endpoint, rank, consume)
        finally:
            if rank == 1:
                gone_at.append(time.monotonic())
                gone.set()  # its receiver (and socket) closed

    def tensors():
        for i, (name, t) in enumerate(
            race_tensors(1, num_tensors=40, numel=200_000)
        ):  # 0.8 MB each: a bucket each
            if (
                i == 2
            ):  # planning bucket 1 (bucket 0 is out): wait until receiver 1 failed bucket 0 and closed
                assert gone.wait(20), "receiver 1 did not fail"
            yield name, t

    with WeightSender(cfg, endpoint, num_receivers=3) as sender:
        threads, results = _in_threads(3, receive)
        with pytest.raises(
            PeerError, match="receiver 1 failed refit 1: RuntimeError: receiver 1 cannot load this"
        ):
            sender.send(tensors(), version=1)
        raised = time.monotonic()
        _join(threads)
    assert isinstance(results[1], RuntimeError)
    assert all(
        isinstance(results[r], PeerError) and "receiver 1 cannot load" in str(results[r])
        for r in (0, 2)
    ), results
    assert raised - gone_at[0] < 10.0  # not the 20 s of a blocking send to the gone receiver


def test_sigkilled_receiver_fails_the_refit_within_timeout_naming_it(monkeypatch):
    made = recording_allocate(monkeypatch)
    endpoint = new_endpoint()
    with WeightSender(
        TransferConfig(**{**SHORT, "timeout_s": 20.0}), endpoint, num_receivers=2
    ) as sender:
        # receiver 0 waits for the sender as long as the sender waits for the child to start
        threads, results = _in_threads(
            1, lambda rank: _receive_once({**SHORT, "timeout_s": 20.0}, endpoint, rank)
        )
        dying = CTX.Process(target=receiver_that_dies, args=(SHORT, endpoint, "cpu", 1))
        dying.start()
        for channel in sender._channels:
            channel.timeout_s = SHORT[
                "timeout_s"
            ]  # the send waits (its own 20 s) for the child to connect
        with pytest.raises(
            TransferTimeout, match="Ack of bucket 0 of refit 1 from receiver 1"
        ) as err:
            sender.send(race_tensors(1), version=1)
        dying.join(20)
        assert dying.exitcode == -signal.SIGKILL and receiver_endpoint(endpoint, 1) in str(
            err.value
        )
        _join(threads)
        assert isinstance(results[0], PeerError)
        names = [b.name for b in made[0]["shm_buffers"]]
    assert names and not our_segments(names)
    assert not os.path.exists(_socket_dir(endpoint))


def test_receiver_endpoints_and_bad_counts():
    endpoint = new_endpoint()
    try:
        assert (
            receiver_endpoint(endpoint, 0) == endpoint
            and receiver_endpoint(endpoint, 3) == endpoint + ".3"
        )
        with pytest.raises(ValueError, match="receiver rank must be an integer >= 0, got -1"):
            receiver_endpoint(endpoint, -1)
        with pytest.raises(ValueError, match="num_receivers must be an integer >= 1, got 0"):
            WeightSender(TransferConfig(**SHORT), endpoint, num_receivers=0)
    finally:
        os.rmdir(_socket_dir(endpoint))


def _gpu_fanout(sender_server, transport: str, devices: list[str]) -> None:
    """One sender on cuda:0, one receiver thread per entry of `devices`; every receiver gets every byte."""
    cfg = {"transport": transport, "sync": "fenced", "bucket_mb": 1, "timeout_s": 60.0}
    endpoint, seed = new_endpoint(), 31
    sender_server.run(
        cfg,
        endpoint,
        [{"kind": "mixed", "bucket_bytes": 1 << 20, "seed": seed, "version": 1}],
        device="cuda:0",
        num_receivers=len(devices),
    )

    def receive(rank: int):
        got: dict[str, torch.Tensor] = {}
        torch.cuda.set_device(devices[rank])
        with WeightReceiver(
            TransferConfig(**cfg), endpoint, device=devices[rank], rank=rank
        ) as receiver:
            receiver.receive(lambda weights, is_last: got.update((n, v.cpu()) for n, v in weights))
        return got

    threads, results = _in_threads(len(devices), receive)
    _join(threads, 120)
    assert all(r[0] == "ok" for r in sender_server.result())
    for rank, got in enumerate(results):
        assert not isinstance(got, Exception), got
        for name, t in mixed_tensors(1 << 20, seed):
            assert torch.equal(as_bytes(got[name]), as_bytes(t)), f"receiver {rank}: {name}"


@pytest.mark.gpu
def test_gpu_cuda_ipc_fanout_on_one_gpu(sender_server):
    _gpu_fanout(sender_server, "cuda_ipc", ["cuda:0", "cuda:0"])


@pytest.mark.gpu
def test_gpu_nccl_fanout_broadcasts_to_every_gpu(sender_server):
    """Standalone: one NCCL broadcast per bucket from cuda:0 to a receiver on each other GPU."""
    if torch.cuda.device_count() < 3:
        pytest.skip("needs 3 GPUs (a sender and two receivers)")
    _gpu_fanout(
        sender_server, "nccl", [f"cuda:{i}" for i in range(1, min(torch.cuda.device_count(), 4))]
    )
