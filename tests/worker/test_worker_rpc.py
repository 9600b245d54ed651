"""The worker RPC's schema: one typed, versioned message each way, plain data only, and a clear
error for a protocol mismatch or an unknown or missing field (the worker answers, never raises)."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest

from rollout.load_path import LoadPath
from rollout.transfer import TransferConfig
from rollout.worker.extension import RefitWorkerExtension
from rollout.worker.rpc import PROTOCOL, AdapterSpec, ReceiveReply, ReceiveRequest

# Changing either list means changing the protocol: bump rollout.worker.rpc.PROTOCOL with it.
REQUEST_FIELDS = [
    "protocol",
    "endpoint",
    "transfer",
    "version",
    "next_bucket_s",
    "receiver_exit_s",
    "load_path",
    "rank_offset",
    "adapter",
]
REPLY_FIELDS = [
    "protocol",
    "receiver",
    "ok",
    "load_s",
    "detached_bytes",
    "load_path",
    "load_plan",
    "error",
    "traceback",
]


def _request() -> ReceiveRequest:
    cfg = TransferConfig(
        transport="shm", bucket_mb=3, sync="double_buffer", mode="bucketed", timeout_s=7.0
    )
    return ReceiveRequest(
        "ipc:///tmp/x/refit.sock", cfg, 5, 120.0, 60.0, "layerwise", rank_offset=2
    )


def test_the_request_crosses_as_plain_data_and_comes_back_equal():
    request = _request()
    data = request.to_dict()
    assert list(data) == REQUEST_FIELDS and data["protocol"] == PROTOCOL == 2
    assert data["transfer"]["sync"] == "double_buffer" and data["load_path"] == "layerwise"
    wire = msgpack.unpackb(msgpack.packb(data))  # plain values only: no object needs pickle
    back = ReceiveRequest.from_dict(wire)
    assert back == request and back.load_path is LoadPath.layerwise and back.transfer.bucket_mb == 3


def test_a_lora_refits_adapter_crosses_as_plain_data_and_comes_back_equal():
    adapter = AdapterSpec(4, 8, 16.0, ("q_proj", "v_proj"), 2)
    request = dataclasses.replace(_request(), adapter=adapter)
    wire = msgpack.unpackb(msgpack.packb(request.to_dict()))
    assert wire["adapter"]["target_modules"] == ["q_proj", "v_proj"]
    back = ReceiveRequest.from_dict(wire)
    assert back == request and back.adapter.peft_config()["lora_alpha"] == 16.0
    with pytest.raises(ValueError, match="adapter fields"):
        ReceiveRequest.from_dict({**wire, "adapter": {**wire["adapter"], "scale": 2}})


def test_the_reply_carries_only_what_the_driver_reads():
    reply = ReceiveReply(3, True, 0.25, 1024, "layerwise", "recorded")
    data = reply.to_dict()
    assert list(data) == REPLY_FIELDS
    assert ReceiveReply.from_dict(msgpack.unpackb(msgpack.packb(data))) == reply


def test_a_protocol_mismatch_names_both_protocols_and_the_fix():
    data = {**_request().to_dict(), "protocol": 0}
    with pytest.raises(ValueError, match=r"protocol 0, this side speaks 2.*reinstall"):
        ReceiveRequest.from_dict(data)
    with pytest.raises(ValueError, match="protocol None"):
        ReceiveReply.from_dict(
            {k: v for k, v in ReceiveReply(0, True).to_dict().items() if k != "protocol"}
        )


def test_unknown_and_missing_fields_are_named():
    data = _request().to_dict()
    data["timeouts"] = {}  # the old request's key
    del data["version"]
    with pytest.raises(
        ValueError, match=r"unknown fields \['timeouts'\] and missing fields \['version'\]"
    ):
        ReceiveRequest.from_dict(data)
    bad_transfer = {**_request().to_dict(), "transfer": {"bucket_megabytes": 3}}
    with pytest.raises(ValueError, match="transfer fields.*bucket_megabytes"):
        ReceiveRequest.from_dict(bad_transfer)


class _Worker(RefitWorkerExtension):
    rank = 1


def test_the_worker_answers_a_bad_request_with_its_error_instead_of_raising():
    # the old positional call's first argument (an endpoint string) is not a request
    reply = ReceiveReply.from_dict(_Worker().refit_receive("ipc:///tmp/x/refit.sock"))
    assert (
        not reply.ok and reply.receiver == 1 and "must be a dict" in reply.error and reply.traceback
    )
    reply = ReceiveReply.from_dict(_Worker().refit_receive({**_request().to_dict(), "protocol": 3}))
    assert not reply.ok and "protocol 3" in reply.error
