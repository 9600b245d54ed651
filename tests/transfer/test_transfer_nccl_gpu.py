"""nccl across GPUs, the standalone case: a sender on cuda:0 broadcasts its buckets over NCCL into a
receiver on cuda:1. Needs two GPUs; the same code is tested over gloo on CPU in test_transfer_nccl."""

from __future__ import annotations

import gc
import os
import signal

import pytest
import torch
from transfer_procs import (
    CTX,
    AckWithoutFence,
    as_bytes,
    late_gpu_reads,
    mixed_tensors,
    race_tensors,
    receiver_process,
    receiver_that_dies,
    sender_silent_after_first_bucket,
)

from benchmarks import transfer as bench
from rollout.transfer import (
    IntegrityError,
    PeerError,
    TransferConfig,
    TransferTimeout,
    WeightReceiver,
    WeightSender,
    new_endpoint,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices"),
]

SENDER, RECEIVER = "cuda:0", "cuda:1"


def _cfg(**kw) -> dict:
    return {"transport": "nccl", "bucket_mb": 1, "timeout_s": 60.0, **kw}


def _allocated(device: str) -> int:
    gc.collect()  # a dropped traceback's frames may still hold views until collected
    return torch.cuda.memory_allocated(device)


@pytest.mark.parametrize("sync", ["fenced", "double_buffer", "clone"])
def test_nccl_bitwise_round_trip_gpu0_to_gpu1(sender_server, sync):
    cfg = _cfg(sync=sync)
    endpoint = new_endpoint()
    seeds = [31, 32]
    sender_server.run(
        cfg,
        endpoint,
        [{"kind": "mixed", "bucket_bytes": 1 << 20, "seed": s, "version": s} for s in seeds],
        device=SENDER,
    )
    allocated = _allocated(RECEIVER)
    nvls_before = os.environ.get("NCCL_NVLS_ENABLE")
    with WeightReceiver(TransferConfig(**cfg), endpoint, device=RECEIVER) as receiver:
        for seed in seeds:
            got = {}

            def consume(weights, is_last):
                for name, view in weights:
                    assert view.device == torch.device(RECEIVER), (name, view.device)
                    got[name] = view.cpu()

            stats = receiver.receive(consume)
            assert stats.version == seed and stats.num_buckets >= 4  # 3.5x the bucket spans 4 alone
            expected = mixed_tensors(1 << 20, seed)
            assert list(got) == [n for n, _ in expected]
            for name, t in expected:
                assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
                assert torch.equal(as_bytes(got[name]), as_bytes(t)), name
        assert receiver._hello.nccl_buffers[0].backend == "nccl"
    assert [r[0] for r in sender_server.result()] == ["ok", "ok"]
    assert _allocated(RECEIVER) == allocated  # buffer and reassembly freed on close
    assert (
        os.environ.get("NCCL_NVLS_ENABLE") == nvls_before
    )  # set only around the communicator's creation


def _late_gpu_reads(sender_server, sync: str, policy=None) -> list[str]:
    return late_gpu_reads(
        sender_server, _cfg(sync=sync), SENDER, RECEIVER, num_refits=4, policy=policy
    )


@pytest.mark.parametrize("sync", ["fenced", "double_buffer", "clone"])
def test_nccl_pending_gpu_reads_see_their_bucket(sender_server, sync):
    assert _late_gpu_reads(sender_server, sync) == []


def test_nccl_next_pull_waits_for_queued_reads_even_without_the_fence(sender_server):
    """The receiver's buffer is only rewritten by its own next broadcast, which NCCL queues behind the
    reads on our current stream: why one receiver buffer serves every sync policy."""
    assert _late_gpu_reads(sender_server, "fenced", policy=AckWithoutFence()) == []


def test_nccl_verify_detects_corruption(sender_server):
    cfg = _cfg(sync="fenced", verify=True)
    endpoint = new_endpoint()
    sender_server.run(cfg, endpoint, [{"kind": "race", "version": 1}], corrupt=True, device=SENDER)
    with WeightReceiver(TransferConfig(**cfg), endpoint, device=RECEIVER) as receiver:
        with pytest.raises(IntegrityError, match="layer.0"):
            receiver.receive(lambda w, last: None)
    assert sender_server.result()[0][1] == "PeerError"


def test_nccl_failed_refit_then_a_good_one_on_a_fresh_communicator(sender_server):
    cfg = _cfg(sync="double_buffer")
    endpoint = new_endpoint()
    sender_server.run(
        cfg,
        endpoint,
        [{"kind": "duplicate", "version": 1}, {"kind": "race", "version": 2}],
        device=SENDER,
    )
    with WeightReceiver(TransferConfig(**cfg), endpoint, device=RECEIVER) as receiver:
        with pytest.raises(PeerError, match="duplicate"):
            receiver.receive(lambda w, last: None)
        got = {}
        stats = receiver.receive(lambda w, last: got.update((n, v.cpu()) for n, v in w))
        assert stats.version == 2 and receiver._hello.generation == 2
    assert all(torch.equal(got[n], t) for n, t in race_tensors(2))
    assert [r[0] for r in sender_server.result()] == ["error", "ok"]


def test_nccl_receiver_stuck_on_a_broadcast_times_out_and_frees_its_memory():
    cfg = _cfg(timeout_s=10.0)  # the first bucket's wait includes NCCL's communicator set-up
    endpoint = new_endpoint()
    torch.zeros(1, device=RECEIVER)  # CUDA up here too, before the handshake's short waits
    ready = CTX.Queue()
    sender = CTX.Process(
        target=sender_silent_after_first_bucket, args=(cfg, endpoint, SENDER, ready)
    )
    sender.start()
    try:
        assert (
            ready.get(timeout=120) == "ready"
        )  # CUDA is up in the child: the waits below are short
        allocated = _allocated(RECEIVER)
        with WeightReceiver(TransferConfig(**cfg), endpoint, device=RECEIVER) as receiver:
            with pytest.raises(TransferTimeout, match="the bytes of bucket 1 of refit 1") as err:
                receiver.receive(lambda w, last: None)
            assert endpoint in str(err.value) and "nccl broadcast" in str(err.value)
            assert receiver._transport is None  # communicator aborted, buffer released
            del err  # its frames hold views of the buffer
            assert _allocated(RECEIVER) == allocated
    finally:
        sender.kill()
        sender.join()


def test_nccl_sender_survives_sigkilled_receiver_frees_memory_and_serves_a_restarted_one():
    cfg = _cfg(timeout_s=60.0)
    endpoint = new_endpoint()
    tensors = [(n, t.to(SENDER)) for n, t in race_tensors(1)]
    allocated = _allocated(SENDER)
    with WeightSender(TransferConfig(**cfg), endpoint, device=SENDER) as sender:
        dying = CTX.Process(target=receiver_that_dies, args=(cfg, endpoint, RECEIVER))
        dying.start()
        sender._channel.timeout_s = (
            10.0  # the child connects first (the send of BeginRefit waits for it)
        )
        with pytest.raises(TransferTimeout, match="Ack") as err:
            sender.send(tensors, version=1)
        dying.join()
        assert dying.exitcode == -signal.SIGKILL and endpoint in str(err.value)
        del err  # its frames hold views of the buffer
        assert sender._transport is None and _allocated(SENDER) == allocated

        queue = CTX.Queue()
        sender._channel.timeout_s = 60.0
        restarted = CTX.Process(target=receiver_process, args=(cfg, endpoint, 1, queue, RECEIVER))
        restarted.start()
        stats = sender.send(tensors, version=2)
        assert stats.version == 2 and queue.get(timeout=60)[:2] == ("ok", 2)
        restarted.join(60)
    assert _allocated(SENDER) == allocated


def test_bench_measures_gpu0_to_gpu1_against_the_three_copy_floor():
    cfg = TransferConfig(transport="nccl", bucket_mb=4, sync="fenced", timeout_s=60.0)
    result = bench.run(
        cfg, bench.BenchConfig(device="cuda", total_gb=0.05, hidden_size=256, num_repeats=2)
    )
    assert (result["sender_device"], result["receiver_device"]) == ("cuda:0", "cuda:1")
    assert result["num_buckets"] >= 10 and len(result["refit_all_s"]) == 2
    assert result["floor_s"] > 0 and result["refit_s"] > 0
