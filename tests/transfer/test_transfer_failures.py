"""Dead peers, silent peers and leaks: every wait ends within timeout_s with a clear error, and no
shared-memory segment or socket file of ours survives any exit."""

from __future__ import annotations

import os
import re

import pytest
import torch
from transfer_procs import (
    our_segments,
    race_tensors,
    receivers_in_turn,
    receiving_from_a_killed_sender,
    recording_allocate,
    refit_to_a_receiver_that_dies,
    refit_to_a_restarted_receiver,
)

from rollout.transfer import (
    IntegrityError,
    TransferConfig,
    TransferTimeout,
    WeightReceiver,
    WeightSender,
    new_endpoint,
)

SHORT = {"transport": "shm", "bucket_mb": 1, "sync": "fenced", "timeout_s": 1.5}


def _socket_path(endpoint: str) -> str:
    return endpoint[len("ipc://") :]


def test_new_endpoint_is_unique_and_private():
    a, b = new_endpoint(), new_endpoint()
    assert a != b and a.startswith("ipc://")
    for ep in (a, b):
        assert os.stat(os.path.dirname(_socket_path(ep))).st_mode & 0o777 == 0o700
        WeightSender(TransferConfig(**SHORT), ep).close()  # the binding side removes the directory
        assert not os.path.exists(os.path.dirname(_socket_path(ep)))


def _names(fields: dict) -> list[str]:
    return [b.name for b in fields["shm_buffers"]]


def test_sender_without_receiver_times_out_naming_endpoint(monkeypatch):
    made = recording_allocate(monkeypatch)
    endpoint = new_endpoint()
    with WeightSender(TransferConfig(**SHORT), endpoint) as sender:
        with pytest.raises(TransferTimeout, match="BeginRefit") as err:
            sender.send(race_tensors(1, num_tensors=2), version=1)
        assert endpoint in str(err.value)
        names = _names(made[0])
    assert names and not our_segments(names)
    assert not os.path.exists(os.path.dirname(_socket_path(endpoint)))


def test_receiver_without_sender_times_out_naming_endpoint():
    endpoint = new_endpoint()
    with WeightReceiver(TransferConfig(**SHORT), endpoint) as receiver:
        with pytest.raises(TransferTimeout, match="waiting for BeginRefit") as err:
            receiver.receive(lambda w, last: None)
        assert endpoint in str(err.value)
    assert not os.path.exists(os.path.dirname(_socket_path(endpoint)))


def test_receiver_survives_sigkilled_sender_and_cleans_up(monkeypatch):
    attached = recording_allocate(monkeypatch, "attach")
    endpoint = new_endpoint()
    with receiving_from_a_killed_sender(SHORT, endpoint) as (receiver, error, seen):
        assert isinstance(error, TransferTimeout) and re.search("Packed 1|bucket 1", str(error)), (
            error
        )
        assert endpoint in str(error)
        assert receiver._transport is None  # unmapped at once, not at close()
        names = _names(attached[0])
    assert seen and not our_segments(names)
    assert not os.path.exists(_socket_path(endpoint))
    assert not os.path.exists(os.path.dirname(_socket_path(endpoint)))


def test_sender_survives_sigkilled_receiver_and_serves_a_restarted_one(monkeypatch):
    made = recording_allocate(monkeypatch)
    endpoint = new_endpoint()
    cfg = TransferConfig(**{**SHORT, "timeout_s": 20.0})
    with WeightSender(cfg, endpoint) as sender:
        refit_to_a_receiver_that_dies(sender, SHORT, endpoint)
        first_names = _names(made[0])
        assert (
            not our_segments(first_names) and sender._transport is None
        )  # a failed refit drops its buffers

        refit_to_a_restarted_receiver(sender, SHORT, endpoint)  # fresh buffers for a fresh receiver
        second_names = _names(sender._transport.describe())
        assert len(made) == 2 and second_names == _names(made[1]) != first_names
    assert not our_segments(first_names + second_names)
    assert not os.path.exists(os.path.dirname(_socket_path(endpoint)))


def test_names_go_once_mapped_and_a_second_receiver_gets_fresh_buffers():
    """The segments' names are unlinked as soon as the receiver mapped them (the sender still holds its
    buffers); a restarted receiver finds them gone and asks for fresh ones, so no two share a segment."""
    cfg = TransferConfig(**{**SHORT, "timeout_s": 20.0})
    endpoint = new_endpoint()
    hellos = []
    with WeightSender(cfg, endpoint) as sender:
        for receiver in receivers_in_turn(
            sender, cfg, endpoint
        ):  # the previous one closed between refits
            names = _names(sender._transport.describe())
            assert names == _names(
                {"shm_buffers": receiver._hello.shm_buffers}
            ) and not our_segments(names)
            hellos.append(receiver._hello)
    assert [h.generation for h in hellos] == [1, 2] and _names(vars(hellos[0])) != _names(
        vars(hellos[1])
    )


def test_checksum_mismatch_names_the_tensors(sender_server):
    cfg = {**SHORT, "timeout_s": 20.0, "verify": True}
    endpoint = new_endpoint()
    sender_server.run(cfg, endpoint, [{"kind": "race", "version": 1}], corrupt=True)
    with WeightReceiver(TransferConfig(**cfg), endpoint) as receiver:
        with pytest.raises(IntegrityError, match=r"bucket 0, tensors: layer\.0, layer\.1"):
            receiver.receive(lambda w, last: None)
    sent = sender_server.result()
    assert sent[0][1] == "PeerError" and "checksum mismatch" in sent[0][2]


def test_verify_passes_on_clean_data(sender_server):
    cfg = {**SHORT, "timeout_s": 20.0, "verify": True, "sync": "double_buffer"}
    endpoint = new_endpoint()
    sender_server.run(cfg, endpoint, [{"kind": "race", "version": 1}])
    with WeightReceiver(TransferConfig(**cfg), endpoint) as receiver:
        assert receiver.receive(lambda w, last: None).num_tensors == 20
    assert sender_server.result()[0][0] == "ok"


def test_meta_tensor_is_rejected_before_anything_is_sent():
    endpoint = new_endpoint()
    with WeightSender(TransferConfig(**SHORT), endpoint) as sender:
        with pytest.raises(ValueError, match="'m' is a meta tensor"):
            sender.send([("m", torch.empty(4, device="meta"))], version=1)


@pytest.mark.parametrize("transport", ["shm", "nccl"])
def test_a_begin_refit_lost_on_a_closing_pipe_is_sent_again(monkeypatch, transport):
    """ZMQ may hand a BeginRefit to the pipe of a receiver that closed a moment ago (a worker restarted
    at once): the message dies with that pipe. The lost message is forced here by dropping the first
    BeginRefit: the sender repeats it to a silent receiver (sender.RESEND_S), the refit completes well
    within timeout_s, and the receiver ignores the repeat. Without the repeat the receiver waits out
    its timeout for a BeginRefit that never comes."""
    from rollout.transfer import channel as channel_module
    from rollout.transfer import sender as sender_module
    from rollout.transfer import wire

    monkeypatch.setattr(sender_module, "RESEND_S", 0.2)
    real_send, dropped = channel_module.Channel.send, []

    def lossy_send(self, msg, what, if_blocked=None):
        if isinstance(msg, wire.BeginRefit) and not dropped:
            dropped.append(msg.refit_id)
            return None
        return real_send(self, msg, what, if_blocked)

    monkeypatch.setattr(channel_module.Channel, "send", lossy_send)
    cfg = TransferConfig(**{**SHORT, "transport": transport, "timeout_s": 5.0})
    endpoint = new_endpoint()
    with WeightSender(cfg, endpoint, device="cpu") as sender:
        got = [r for r in receivers_in_turn(sender, cfg, endpoint, versions=(1, 2, 3))]
    assert dropped == [1] and len(got) == 3  # refit 1 lost its first BeginRefit and still completed
