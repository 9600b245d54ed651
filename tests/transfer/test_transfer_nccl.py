"""The nccl transport's own failure paths, run for real over gloo on CPU (the same code drives NCCL on
GPUs): killed peers, a silent broadcast, a restarted receiver, and nothing left listening or open."""

from __future__ import annotations

import gc
import os
import re

import pytest
import torch
from transfer_procs import (
    listening,
    race_tensors,
    receivers_in_turn,
    receiving_from_a_killed_sender,
    recording_allocate,
    refit_to_a_receiver_that_dies,
    refit_to_a_restarted_receiver,
    send_in_thread,
    store_ports,
)

from rollout.transfer import (
    TransferConfig,
    TransferError,
    TransferTimeout,
    WeightReceiver,
    WeightSender,
    new_endpoint,
    wire,
)
from rollout.transfer.nccl import NcclConfig, NcclTransport, nccl_environment

SHORT = {"transport": "nccl", "bucket_mb": 1, "sync": "fenced", "timeout_s": 1.5}


def _port(fields: dict) -> int:
    return fields["nccl_buffers"][0].store_port


def test_receiver_survives_sigkilled_sender_and_drops_the_group():
    endpoint = new_endpoint()
    with receiving_from_a_killed_sender(SHORT, endpoint) as (receiver, error, seen):
        assert isinstance(error, TransferError) and re.search("Packed 1|bucket 1", str(error)), (
            error
        )
        assert endpoint in str(error)
        assert (
            receiver._transport is None
        )  # the group is aborted and released at once, not at close()
    assert seen
    assert not os.path.exists(os.path.dirname(endpoint[len("ipc://") :]))


def test_sender_survives_sigkilled_receiver_and_serves_a_restarted_one(monkeypatch):
    made = recording_allocate(monkeypatch)
    endpoint = new_endpoint()
    with WeightSender(
        TransferConfig(**{**SHORT, "timeout_s": 20.0}), endpoint, device="cpu"
    ) as sender:
        refit_to_a_receiver_that_dies(sender, SHORT, endpoint)
        assert len(made) == 1 and sender._transport is None and not listening(_port(made[0]))

        refit_to_a_restarted_receiver(
            sender, SHORT, endpoint
        )  # a fresh group: the old one died with its peer
        assert len(made) == 2 and listening(_port(made[1]))
    assert not listening(_port(made[1]))  # close() stopped the store
    assert not os.path.exists(os.path.dirname(endpoint[len("ipc://") :]))


def test_a_second_receiver_gets_a_fresh_group():
    """A restarted worker must not join the group its predecessor claimed: it asks for a new one."""
    cfg = TransferConfig(**{**SHORT, "timeout_s": 20.0})
    endpoint = new_endpoint()
    with WeightSender(
        cfg, endpoint, device="cpu"
    ) as sender:  # each receiver closes before the next one
        hellos = [receiver._hello for receiver in receivers_in_turn(sender, cfg, endpoint)]
    assert [h.generation for h in hellos] == [1, 2] and store_ports(hellos[0]) != store_ports(
        hellos[1]
    )
    assert not any(listening(p) for h in hellos for p in store_ports(h))


def _open_fds() -> int:
    gc.collect()  # garbage of earlier tests must not close its files between the two counts
    return len(os.listdir("/proc/self/fd"))


def _good_refit(sender: WeightSender, receiver: WeightReceiver, version: int) -> None:
    thread, sent = send_in_thread(sender, version)
    got = {}
    stats = receiver.receive(lambda w, last: got.update((n, v.clone()) for n, v in w))
    thread.join(20)
    assert stats.version == version and sent[0].version == version
    assert all(torch.equal(got[n], t) for n, t in race_tensors(version, num_tensors=4))


def test_silent_broadcast_times_out_naming_the_bucket_then_a_good_refit_works(monkeypatch):
    """Both ends in this process (two threads, a real gloo group): the sender joins the group but
    never broadcasts bucket 0; the receiver's wait ends at timeout_s, both ends drop the group, and
    the next refit rendezvous afresh, with no socket of the dropped group left open."""
    endpoint = new_endpoint()
    cfg = TransferConfig(**SHORT)
    with (
        WeightSender(cfg, endpoint, device="cpu") as sender,
        WeightReceiver(cfg, endpoint) as receiver,
    ):
        _good_refit(sender, receiver, 1)
        fds_with_one_group = _open_fds()
        ports = store_ports(receiver._hello)

        with monkeypatch.context() as patch:
            # Packed goes out and the sender joins the group, but never broadcasts
            patch.setattr(
                NcclTransport,
                "publish",
                lambda self, index, nbytes, announce, what: (announce(), self._connect(what)),
            )
            thread, sent = send_in_thread(sender, 2)
            with pytest.raises(TransferTimeout, match="the bytes of bucket 0 of refit 2") as err:
                receiver.receive(lambda w, last: None)
            thread.join(20)
        assert endpoint in str(err.value) and "gloo broadcast" in str(err.value)
        assert isinstance(sent[0], TransferError) and endpoint in str(
            sent[0]
        )  # PeerError or its own timeout
        assert sender._transport is None and receiver._transport is None

        _good_refit(sender, receiver, 3)
        assert (
            receiver._hello.generation == 2
        )  # the group of refits 1-2 was dropped with the failure
        assert _open_fds() <= fds_with_one_group
        ports += store_ports(receiver._hello)
    assert len(set(ports)) == 2 and not any(listening(p) for p in ports)


def test_backend_must_match_the_receiver_device():
    hello = wire.Hello(
        wire.PROTOCOL_VERSION,
        "nccl",
        "fenced",
        1 << 20,
        1,
        [],
        [],
        [wire.NcclBuffer("127.0.0.1", 1234, "nccl", 1 << 20)],
    )
    with pytest.raises(
        TransferError, match="broadcasts over nccl, but this receiver's device cpu needs gloo"
    ):
        NcclTransport.attach(hello, torch.device("cpu"), timeout_s=1.0, cfg=NcclConfig())
    bad_size = wire.Hello(
        wire.PROTOCOL_VERSION,
        "nccl",
        "fenced",
        1 << 20,
        1,
        [],
        [],
        [wire.NcclBuffer("127.0.0.1", 1234, "gloo", 1 << 30)],
    )
    with pytest.raises(TransferError, match="does not fit the handshake"):
        NcclTransport.attach(bad_size, torch.device("cpu"), timeout_s=1.0, cfg=NcclConfig())


def test_nvls_setting_lives_in_os_environ_only_while_the_communicator_is_made(monkeypatch):
    monkeypatch.delenv("NCCL_NVLS_ENABLE", raising=False)
    with nccl_environment(NcclConfig()):
        assert os.environ["NCCL_NVLS_ENABLE"] == "0"  # NVLink multicast off by default
    assert "NCCL_NVLS_ENABLE" not in os.environ
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "0")
    with nccl_environment(NcclConfig(nvls=True)):
        assert os.environ["NCCL_NVLS_ENABLE"] == "1"  # the config decides
    assert os.environ["NCCL_NVLS_ENABLE"] == "0"  # and what was there is put back


def test_nccl_options_are_checked():
    assert TransferConfig(transport="nccl", nccl={"watchdog_s": 600.0}).nccl == NcclConfig(
        watchdog_s=600.0
    )
    with pytest.raises(
        ValueError, match=r"nccl.watchdog_s=100.0 must exceed twice rollout.transfer.timeout_s=60.0"
    ):
        TransferConfig(transport="nccl", timeout_s=60.0, nccl=NcclConfig(watchdog_s=100.0))
    TransferConfig(
        transport="shm", timeout_s=60.0, nccl=NcclConfig(watchdog_s=100.0)
    )  # read by nccl only
    with pytest.raises(ValueError, match="nccl.store_host"):
        NcclConfig(store_host="")
    with pytest.raises(ValueError, match="nccl.nvls must be true or false, got 'yes'"):
        NcclConfig(nvls="yes")
