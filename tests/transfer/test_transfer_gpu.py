"""cuda_ipc: the sender's GPU buffers opened by a receiver process through CUDA IPC (needs a GPU)."""

from __future__ import annotations

import pytest
import torch
from transfer_procs import AckWithoutFence, as_bytes, late_gpu_reads, mixed_tensors, race_value

from rollout.transfer import (
    IntegrityError,
    TransferConfig,
    WeightReceiver,
    new_endpoint,
    resolve_transport,
)

pytestmark = pytest.mark.gpu


def _cfg(**kw) -> dict:
    return {"transport": "cuda_ipc", "bucket_mb": 1, "timeout_s": 60.0, **kw}


def test_auto_resolves_by_device():
    cfg = TransferConfig()
    assert (
        resolve_transport(cfg, "cuda:0").value == "cuda_ipc"
        and resolve_transport(cfg, "cpu").value == "shm"
    )


@pytest.mark.parametrize("sync", ["fenced", "double_buffer", "clone"])
def test_cuda_ipc_bitwise_round_trip(sender_server, sync):
    cfg = _cfg(sync=sync)
    endpoint = new_endpoint()
    seeds = [21, 22]
    sender_server.run(
        cfg,
        endpoint,
        [{"kind": "mixed", "bucket_bytes": 1 << 20, "seed": s, "version": s} for s in seeds],
        device="cuda",
    )
    with WeightReceiver(TransferConfig(**cfg), endpoint, device="cuda:0") as receiver:
        for seed in seeds:
            got = {}

            def consume(weights, is_last):
                for name, view in weights:
                    assert view.device.type == "cuda"
                    got[name] = view.cpu()  # a copy: the view dies with the call

            stats = receiver.receive(consume)
            assert stats.version == seed
            for name, t in mixed_tensors(1 << 20, seed):
                assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
                assert torch.equal(as_bytes(got[name]), as_bytes(t)), name
    assert all(r[0] == "ok" for r in sender_server.result())


def _late_gpu_reads(sender_server, sync: str, policy=None) -> list[str]:
    return late_gpu_reads(
        sender_server, _cfg(sync=sync), "cuda", "cuda:0", num_refits=6, policy=policy
    )


@pytest.mark.parametrize("sync", ["fenced", "double_buffer"])
def test_cuda_ipc_pending_gpu_reads_are_fenced(sender_server, sync):
    """consume only queues its reads behind a long kernel and returns; the fence before the ack
    must hold the sender off until they ran. The check happens after receive() returned."""
    assert _late_gpu_reads(sender_server, sync) == []


def test_cuda_ipc_fence_test_catches_a_missing_fence(sender_server):
    assert _late_gpu_reads(sender_server, "fenced", policy=AckWithoutFence())


def _late_packs(sender_server) -> list[str]:
    """The sender's packing copies run behind a long kernel, so its BucketMeta arrives long before the
    bytes are in the buffer: the receiver must wait for the sender's "packed" event before reading."""
    cfg = _cfg(sync="fenced")
    endpoint = new_endpoint()
    versions = list(range(1, 5))
    corrupt = []
    sender_server.run(
        cfg,
        endpoint,
        [{"kind": "race", "version": v, "gpu_sleep_cycles": 50_000_000} for v in versions],
        device="cuda",
    )
    with WeightReceiver(TransferConfig(**cfg), endpoint, device="cuda:0") as receiver:
        for v in versions:
            dest: dict[str, torch.Tensor] = {}

            def consume(weights, is_last):
                for name, view in weights:
                    dest[name] = view.clone()

            receiver.receive(consume)
            torch.cuda.synchronize()
            corrupt += [
                f"refit {v}: {n}"
                for n, t in dest.items()
                if not bool((t == race_value(v, n)).all())
            ]
    assert all(r[0] == "ok" for r in sender_server.result())
    return corrupt


def test_cuda_ipc_receiver_waits_for_late_packs(sender_server):
    assert _late_packs(sender_server) == []


def test_cuda_ipc_late_pack_test_catches_a_missing_wait(sender_server, monkeypatch):
    from rollout.transfer.cuda_ipc import CudaIpcTransport

    monkeypatch.setattr(
        CudaIpcTransport,
        "acquire",
        lambda self, index, nbytes, deadline, what: self.buffer(index)[:nbytes],
    )
    assert _late_packs(sender_server)


def test_cuda_ipc_verify_detects_corruption(sender_server):
    cfg = _cfg(sync="fenced", verify=True)
    endpoint = new_endpoint()
    sender_server.run(cfg, endpoint, [{"kind": "race", "version": 1}], corrupt=True, device="cuda")
    with WeightReceiver(TransferConfig(**cfg), endpoint, device="cuda:0") as receiver:
        with pytest.raises(IntegrityError, match="layer.0"):
            receiver.receive(lambda w, last: None)
    assert sender_server.result()[0][1] == "PeerError"


def test_cuda_ipc_reassembled_tensor_is_complete_for_a_consumer_on_another_stream(sender_server):
    """A tensor larger than a bucket is reassembled by the receiver (a device copy per chunk); its last
    chunk's copy must be complete before consume sees the tensor, whatever stream the consumer reads on.
    vLLM's worker loads on a dedicated non-blocking stream of its own (vllm.utils.torch_utils.current_stream),
    which does not wait for the receiver's stream: reading at once, as the direct load path does, saw a
    half-copied embedding on a 15 GB refit (the 7B H200 run). Refit 2 overwrites refit 1's bytes, so a read
    that runs ahead of the copy sees the old values."""
    bucket = 256 << 20
    cfg = _cfg(bucket_mb=256)
    endpoint = new_endpoint()
    seeds = [31, 32]
    sender_server.run(
        cfg,
        endpoint,
        [{"kind": "mixed", "bucket_bytes": bucket, "seed": s, "version": s} for s in seeds],
        device="cuda",
    )
    loader = torch.cuda.Stream(device="cuda:0")  # non-blocking, as PyTorch's pool streams are
    with WeightReceiver(TransferConfig(**cfg), endpoint, device="cuda:0") as receiver:
        for seed in seeds:
            got = {}

            def consume(weights, is_last):
                with torch.cuda.stream(
                    loader
                ):  # read at once, on another stream, as vLLM's loader does
                    for name, view in weights:
                        got[name] = view.clone()
                loader.synchronize()

            receiver.receive(consume)
            big = dict(mixed_tensors(bucket, seed))["big.3_5x"]
            assert torch.equal(as_bytes(got["big.3_5x"].cpu()), as_bytes(big)), (
                f"refit {seed}: a partial reassembly"
            )
    assert all(r[0] == "ok" for r in sender_server.result())
