"""mode=direct over shm: the receiver reads a trainer process's own tensors, mapped once, over many refits with
in-place optimizer steps between them; re-allocated parameters, the race this mode must not have, dead peers."""

from __future__ import annotations

import gc
import logging
import os
import signal

import pytest
import torch
from direct_procs import (
    mapped_storages_of,
    receiver_once,
    receiver_that_dies,
    sender_then_hang,
    shm_entries_of,
    snapshot,
    start_sender,
    tensors,
    tiny_trainer,
)
from transfer_procs import CTX, race_value

from rollout.transfer import (
    PeerError,
    TransferConfig,
    TransferTimeout,
    WeightReceiver,
    WeightSender,
    new_endpoint,
)

DIRECT = {"transport": "shm", "mode": "direct", "timeout_s": 30.0}
NUM_REFITS = 6


def _collect(store: dict, calls: list):
    def consume(weights, is_last):
        calls.append((len(weights), is_last))
        store.update(snapshot(weights))

    return consume


def test_bitwise_round_trips_with_optimizer_steps_and_reallocated_parameters():
    endpoint = new_endpoint()
    proc, queue = start_sender("refits", DIRECT, endpoint, NUM_REFITS)
    segments_after = []
    with WeightReceiver(TransferConfig(**DIRECT), endpoint) as receiver:
        previous = None
        for v in range(1, NUM_REFITS + 1):
            got, calls = {}, []
            stats = receiver.receive(_collect(got, calls))
            sent = queue.get(timeout=30)
            assert sent[0] == "sent", sent
            _, version, num_tensors, num_buckets, expected, not_shared = sent
            assert stats.version == version == v and stats.num_tensors == num_tensors == len(
                expected
            )
            assert stats.num_buckets == num_buckets == 0 and calls == [
                (len(expected), True)
            ]  # one hand-out
            assert list(got) == list(expected)  # order kept
            for name, (dtype, shape, data) in expected.items():
                assert got[name][:2] == (dtype, shape) and got[name][2] == data, (
                    f"refit {v}: {name} differs"
                )
            assert not_shared == []  # every sent storage now lives in shared memory
            if previous is not None:  # the step changed the tensors in place and we saw it
                assert (
                    got["2.weight"][2] != previous["2.weight"][2]
                    and got["steps_i64"][2] != previous["steps_i64"][2]
                )
            previous = got
            segments_after.append(sorted(receiver._direct._segments))
    proc.join(30)
    # The same 7 storages (the empty buffer has none) stay mapped across refits; refit 3 (a re-allocated
    # weight) and refit 4 (a new
    # Parameter object) each replace exactly one segment; state_dict() views (refit 5) map nothing new.
    assert all(len(s) == 7 for s in segments_after), segments_after
    assert segments_after[0] == segments_after[1]
    assert len(set(segments_after[2]) - set(segments_after[1])) == 1
    assert len(set(segments_after[3]) - set(segments_after[2])) == 1
    assert segments_after[4] == segments_after[3] == segments_after[5]
    assert not shm_entries_of(proc.pid) and not os.path.exists(endpoint[len("ipc://") :])


def _race(broken: str) -> list[str]:
    endpoint = new_endpoint()
    proc, queue = start_sender("race", DIRECT, endpoint, NUM_REFITS, broken=broken)
    corrupt = []
    with WeightReceiver(TransferConfig(**DIRECT), endpoint) as receiver:
        for v in range(1, NUM_REFITS + 1):

            def consume(weights, is_last):
                import time

                time.sleep(
                    0.02
                )  # the trainer's next in-place update runs meanwhile, if send() returned early
                corrupt.extend(
                    f"refit {v}: {n}"
                    for n, view in weights
                    if not bool((view == race_value(v, n)).all())
                )

            receiver.receive(consume)
    assert queue.get(timeout=30) == ("sent", NUM_REFITS)
    proc.join(30)
    return corrupt


def test_late_reader_never_sees_the_next_update():
    assert _race(broken="") == []


def test_race_test_catches_a_sender_that_returns_before_the_final_ack():
    assert _race(broken="returns_before_done")


def test_receiver_survives_sigkilled_sender_and_unmaps_its_memory():
    endpoint = new_endpoint()
    proc = CTX.Process(target=sender_then_hang, args=(DIRECT, endpoint))
    proc.start()
    names = []

    def consume(weights, is_last):
        os.kill(proc.pid, signal.SIGKILL)  # mid-refit, while we read its tensors
        proc.join()
        names.extend(n for n, _ in weights)
        assert mapped_storages_of(proc.pid)  # its memory outlives it only in our mapping

    with WeightReceiver(TransferConfig(**DIRECT), endpoint) as receiver:
        outcomes = []
        for _ in range(2):  # Done may still be queued for the dead peer; the next refit cannot come
            try:
                receiver.receive(consume if not names else (lambda w, last: None))
                outcomes.append("ok")
            except TransferTimeout as exc:
                outcomes.append(str(exc))
                break
            receiver._channel.timeout_s = 1.5
        assert outcomes[-1] != "ok" and "BeginRefit" in outcomes[-1] and endpoint in outcomes[-1], (
            outcomes
        )
        gc.collect()
        assert not mapped_storages_of(proc.pid)  # a failed refit drops every mapping
    assert names and proc.exitcode == -signal.SIGKILL
    assert not shm_entries_of(proc.pid)
    assert not os.path.exists(os.path.dirname(endpoint[len("ipc://") :]))


def test_sender_survives_sigkilled_receiver_and_serves_a_restarted_one():
    endpoint = new_endpoint()
    model, _ = tiny_trainer()
    with WeightSender(TransferConfig(**DIRECT), endpoint) as sender:
        ready = CTX.Queue()
        dying = CTX.Process(target=receiver_that_dies, args=(DIRECT, endpoint, ready))
        dying.start()
        assert (
            ready.get(timeout=30) == "connected"
        )  # its start-up took seconds; our wait for Done must not
        sender._channel.timeout_s = 1.5
        with pytest.raises(TransferTimeout, match="Done") as err:
            sender.send(tensors(model), version=1)
        dying.join()
        assert dying.exitcode == -signal.SIGKILL and endpoint in str(err.value)
        assert not shm_entries_of(dying.pid) and not shm_entries_of(os.getpid())

        queue = CTX.Queue()
        restarted = CTX.Process(target=receiver_once, args=(DIRECT, endpoint, queue))
        restarted.start()
        sender._channel.timeout_s = 30.0
        with torch.no_grad():
            model[2].weight.add_(1.0)
        stats = sender.send(tensors(model), version=2)
        version, got = queue.get(timeout=30)
        restarted.join(30)
        assert stats.version == version == 2 and got == snapshot(tensors(model))
    assert not shm_entries_of(os.getpid())


def test_a_receiver_restarted_between_refits_gets_the_layout_it_lacks(caplog):
    """Refit 2 repeats refit 1's plan (the weights changed in place), but the receiver that completed refit 1
    is gone: the new one asks for the layout instead of failing."""
    endpoint = new_endpoint()
    model, _ = tiny_trainer()
    with WeightSender(TransferConfig(**DIRECT), endpoint) as sender:
        for version in (1, 2, 3):
            queue = CTX.Queue()
            receiver = CTX.Process(target=receiver_once, args=(DIRECT, endpoint, queue))
            receiver.start()
            with torch.no_grad():
                model[2].weight.add_(1.0)
            with caplog.at_level(logging.INFO, logger="rollout.transfer.direct"):
                stats = sender.send(tensors(model), version=version)
            got_version, got = queue.get(timeout=30)
            receiver.join(30)
            assert stats.version == got_version == version and got == snapshot(tensors(model))
    asked = [r.getMessage() for r in caplog.records if "has no plan" in r.getMessage()]
    assert len(asked) == 2 and "have none" in asked[0]
    assert not shm_entries_of(os.getpid())


def test_consume_error_reaches_the_sender_and_the_next_refit_maps_afresh():
    endpoint = new_endpoint()
    proc, queue = start_sender("refits", DIRECT, endpoint, 2)
    with WeightReceiver(TransferConfig(**DIRECT), endpoint) as receiver:

        def explode(weights, is_last):
            raise RuntimeError("load_weights exploded on purpose")

        with pytest.raises(RuntimeError, match="exploded on purpose"):
            receiver.receive(explode)
        assert receiver._direct._segments == {}  # a failed refit drops its mappings
        peer_error = queue.get(timeout=30)
        assert peer_error[:2] == ("peer_error", 1) and "exploded on purpose" in peer_error[2]
        got, calls = {}, []
        assert receiver.receive(_collect(got, calls)).version == 2
        sent = queue.get(timeout=30)
        assert sent[:2] == ("sent", 2) and got == sent[4] and len(receiver._direct._segments) == 7
    proc.join(30)


def test_a_tensor_direct_cannot_map_is_a_value_error_naming_it():
    model, _ = tiny_trainer()
    strided = [("ok", torch.zeros(4)), ("w.t", model[2].weight.t())]
    with WeightSender(TransferConfig(**{**DIRECT, "timeout_s": 1.5}), new_endpoint()) as sender:
        with pytest.raises(
            ValueError, match=r"'w.t' is a non-contiguous view .*direct_fallback=bucketed"
        ):
            sender.send(strided, version=1)  # before anything is sent: no receiver needed
        with pytest.raises(ValueError, match=r"'m' has no dense storage"):
            sender.send([("m", torch.empty(3, device="meta"))], version=1)
        with pytest.raises(ValueError, match="not supported"):
            sender.send([("q", torch.zeros(3, dtype=torch.uint16))], version=1)


def test_a_dtensor_is_refused_naming_it(tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        sharded = distribute_tensor(torch.randn(8, 4), init_device_mesh("cpu", (1,)), [Shard(0)])
        with WeightSender(TransferConfig(**{**DIRECT, "timeout_s": 1.5}), new_endpoint()) as sender:
            with pytest.raises(ValueError, match=r"'layer.w' is a DTensor \(a sharded parameter\)"):
                sender.send([("layer.w", sharded)], version=1)
    finally:
        dist.destroy_process_group()


def test_fallback_to_buckets_is_explicit_and_logged(caplog):
    cfg = {**DIRECT, "direct_fallback": "bucketed", "bucket_mb": 1}
    endpoint = new_endpoint()
    g = torch.Generator().manual_seed(3)
    strided = [
        ("a", torch.randn(300, 7, generator=g)),
        ("b.t", torch.randn(40, 30, generator=g).t()),
    ]
    queue = CTX.Queue()
    with WeightSender(TransferConfig(**cfg), endpoint) as sender:
        receivers = [
            CTX.Process(target=receiver_once, args=(cfg, endpoint, queue)) for _ in range(2)
        ]
        receivers[0].start()
        with caplog.at_level(logging.WARNING, logger="rollout.transfer.direct"):
            bucketed = sender.send(strided, version=1)
        assert (
            "'b.t' is a non-contiguous view" in caplog.text
            and "goes through buckets" in caplog.text
        )
        assert queue.get(timeout=30) == (1, snapshot(strided))
        # The first receiver must be gone before the second dials in: a DEALER socket deals its messages
        # round-robin over every pipe it still holds, and a refit's layout dealt to a dead one is lost.
        receivers[0].join(30)
        receivers[1].start()
        direct = sender.send(strided[:1], version=2)
        assert queue.get(timeout=30) == (2, snapshot(strided[:1]))
        for p in receivers:
            p.join(30)
    assert bucketed.num_buckets >= 1 and direct.num_buckets == 0


def test_mode_mismatch_is_reported_on_both_ends():
    endpoint = new_endpoint()
    queue = CTX.Queue()
    bucketed = {**DIRECT, "mode": "bucketed", "timeout_s": 30.0}
    proc = CTX.Process(target=receiver_once, args=(bucketed, endpoint, queue))
    proc.start()
    with WeightSender(TransferConfig(**DIRECT), endpoint) as sender:
        with pytest.raises(PeerError, match="mode mismatch: the sender sends mode=direct"):
            sender.send([("a", torch.zeros(3))], version=1)
    proc.join(30)


def test_zero_tensor_refit_completes_without_consume():
    endpoint = new_endpoint()
    queue = CTX.Queue()
    proc = CTX.Process(target=receiver_once, args=(DIRECT, endpoint, queue))
    proc.start()
    with WeightSender(TransferConfig(**DIRECT), endpoint) as sender:
        stats = sender.send([], version=4)
    assert stats.num_tensors == 0 and queue.get(timeout=30) == (4, {})
    proc.join(30)
