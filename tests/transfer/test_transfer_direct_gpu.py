"""mode=direct over CUDA IPC (needs a GPU): the receiver opens the trainer's storages once and reads them in
place; the fences on both sides are what keep it exact, and each test that removes one shows corruption."""

from __future__ import annotations

import pytest
import torch
from direct_procs import snapshot, start_sender
from transfer_procs import AckWithoutFence, race_value

from rollout.transfer import TransferConfig, WeightReceiver, WeightSender, new_endpoint

pytestmark = pytest.mark.gpu

DIRECT = {"transport": "cuda_ipc", "mode": "direct", "timeout_s": 60.0}
NUM_REFITS = 6


def test_cuda_direct_bitwise_round_trips_with_optimizer_steps_and_reallocated_parameters():
    endpoint = new_endpoint()
    proc, queue = start_sender("refits", DIRECT, endpoint, NUM_REFITS, device="cuda")
    with WeightReceiver(TransferConfig(**DIRECT), endpoint, device="cuda:0") as receiver:
        for v in range(1, NUM_REFITS + 1):
            got = {}

            def consume(weights, is_last):
                assert all(view.device.type == "cuda" for _, view in weights)
                got.update(snapshot(weights))  # copies to the host before the ack

            stats = receiver.receive(consume)
            sent = queue.get(timeout=60)
            assert sent[0] == "sent", sent
            assert stats.version == v and stats.num_buckets == 0 and got == sent[4], (
                f"refit {v} differs"
            )
            segments = sorted(receiver._direct._segments)
            assert len(segments) == 7, segments
    proc.join(60)


def _late_reads(
    sender: str, receiver_policy=None, gate_s: float = 0.0, late_consume: bool = True
) -> list[str]:
    """The trainer overwrites its tensors in place right after send(); the receiver's consume queues its copies
    behind a long kernel (late_consume) and returns. Returns the tensors whose copy, checked once the refit is
    over, holds other bytes than its refit's."""
    endpoint = new_endpoint()
    proc, queue = start_sender(
        "race", DIRECT, endpoint, NUM_REFITS, broken=sender, device="cuda", gate_s=gate_s
    )
    corrupt = []
    with WeightReceiver(TransferConfig(**DIRECT), endpoint, device="cuda:0") as receiver:
        if receiver_policy is not None:
            receiver._policy = receiver_policy
        for v in range(1, NUM_REFITS + 1):
            dest: dict[str, torch.Tensor] = {}

            def consume(weights, is_last):
                if late_consume:
                    torch.cuda._sleep(50_000_000)  # tens of ms of GPU time before the copies start
                for name, view in weights:
                    dest[name] = torch.empty_like(view).copy_(view)

            receiver.receive(consume)
            torch.cuda.synchronize()
            corrupt += [
                f"refit {v}: {n}"
                for n, t in dest.items()
                if not bool((t == race_value(v, n)).all())
            ]
    assert queue.get(timeout=60) == ("sent", NUM_REFITS)
    proc.join(60)
    return corrupt


def test_cuda_direct_pending_reads_are_fenced_before_done():
    assert _late_reads(sender="") == []


def test_cuda_direct_race_test_catches_a_receiver_that_acks_before_its_reads_complete():
    assert _late_reads(sender="", receiver_policy=AckWithoutFence())


def test_cuda_direct_race_test_catches_a_sender_that_returns_before_done():
    assert _late_reads(sender="returns_before_done")


def test_cuda_direct_layout_waits_for_the_trainers_queued_writes():
    """The trainer's in-place writes wait behind a 0.2 s host function on its stream when send() starts (the
    GPU idle meanwhile: cuda_gate.py): the sender's device fence must hold the layout back until they landed."""
    assert _late_reads(sender="", gate_s=0.2, late_consume=False) == []


def test_cuda_direct_missing_trainer_fence_is_caught():
    """Without the fence the receiver reads the previous refit's bytes at every refit after the first (the
    first is ordered anyway: torch's IPC export records an event the receiver waits on when it opens a
    storage)."""
    corrupt = _late_reads(sender="no_trainer_fence", gate_s=0.2, late_consume=False)
    assert {f"refit {v}" for v in range(2, NUM_REFITS + 1)} <= {
        line.split(":")[0] for line in corrupt
    }, corrupt


def test_cuda_direct_refuses_a_tensor_on_another_device():
    with WeightSender(
        TransferConfig(**{**DIRECT, "timeout_s": 1.5}), new_endpoint(), device="cuda:0"
    ) as sender:
        with pytest.raises(
            ValueError, match=r"'host.w' lives on cpu, the transport \(cuda_ipc\) on cuda:0"
        ):
            sender.send(
                [("gpu.w", torch.zeros(3, device="cuda:0")), ("host.w", torch.zeros(3))], version=1
            )
