"""backend="refit" behind a real `vllm serve` (CPU, tiny model), driven through vLLM's own
HTTPVLLMWeightSyncClient: refits equal a fresh server, /weight_info follows, and a killed trainer
or a killed server leaves nothing behind and a clear error on the side that survives.

One server for the module; the last test kills it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from backend_helpers import PROMPTS, assert_same, load, refit_segments_mapped, send_halfway
from helpers import wait_gone

from benchmarks.serve import VllmServer
from rollout.config import RefitTimeouts
from rollout.transfer import TransferConfig

TRAINER_PROC = Path(__file__).with_name("trainer_proc.py")
TIMEOUT_S = 5.0  # each message's wait; the kill tests bound the other side's error by it


def _init_info():
    from rollout import RefitTrainerInitInfo

    return RefitTrainerInitInfo(
        transfer=TransferConfig(bucket_mb=1, timeout_s=TIMEOUT_S),
        timeouts=RefitTimeouts(next_bucket_s=10.0, receiver_exit_s=10.0, worker_reply_s=30.0),
        call_timeout_s=60.0,
        rank=0,
    )


def _trainer_engine(server, source):
    from vllm.distributed.weight_transfer.clients import HTTPVLLMWeightSyncClient
    from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

    client = HTTPVLLMWeightSyncClient(server.url, timeout=60)
    return WeightTransferTrainerFactory.trainer_init(_init_info(), client=client, source=source)


@pytest.fixture(scope="module")
def server(tiny_path, fresh_new, tmp_path_factory):  # fresh_new first: one server at a time
    log = tmp_path_factory.mktemp("serve") / "server.log"
    srv = VllmServer(tiny_path, backend="refit", log_path=log).start()
    srv.start_outputs = srv.complete(PROMPTS)  # a fresh server on the start-up weights
    srv.start_version = srv.weight_version()
    pids = srv.pids()
    yield srv
    srv.close()
    assert not wait_gone(pids), "vllm serve's processes outlived it"


def test_three_refits_equal_a_fresh_server_and_weight_info_follows(
    server, trainer, base_state, new_state, fresh_new, mapped_before
):
    from vllm.distributed.weight_transfer.base import ModuleSource

    engine = _trainer_engine(server, ModuleSource(trainer))
    try:
        for version, state, expected in [
            (1, new_state, fresh_new),
            (2, base_state, server.start_outputs),  # back: every prefix block of version 1 dropped
            (3, new_state, fresh_new),
        ]:
            load(trainer, state)
            stats = engine.send_weights()
            assert stats.version == version and stats.num_buckets >= 2
            assert server.weight_version() == str(version)
            assert_same(server.complete(PROMPTS), expected, f"version {version}")
    finally:
        load(trainer, base_state)
        engine.shutdown()
    assert not os.path.exists(engine.endpoint.removeprefix("ipc://")), "the socket outlived it"
    assert set(refit_segments_mapped()) - mapped_before == set(), (
        "the trainer still maps its buffers"
    )


def _wait_for_line(proc: subprocess.Popen, word: str, timeout_s: float) -> list[str]:
    """The lines `proc` printed up to the one that is `word`."""
    found, lines = threading.Event(), []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line.strip())
            if line.strip() == word:
                found.set()
                return

    threading.Thread(target=read, daemon=True).start()
    assert found.wait(timeout_s), f"the trainer process did not print {word} in {timeout_s} s"
    return lines


def _log_has(path: Path, text: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if text in path.read_text(errors="replace"):
            return True
        time.sleep(0.2)
    return False


def test_a_killed_trainer_leaves_the_last_complete_version_and_nothing_behind(
    server, tiny_path, trainer, new_state, fresh_new
):
    from vllm.distributed.weight_transfer.base import ModuleSource

    version, before = server.weight_version(), server.complete(PROMPTS)
    args = [sys.executable, str(TRAINER_PROC), server.url, str(tiny_path), "7", "70", "hang"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    try:
        printed = _wait_for_line(proc, "HALF", timeout_s=180)
        socket = next(p for p in printed if p.startswith("CONNECTED ")).split()[1]
        socket = socket.removeprefix("ipc://")
        mapped = refit_segments_mapped(proc.pid)
        assert mapped, "the trainer had sent nothing yet"
        proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        assert _log_has(server.log_path, "update to version 70 failed", 4 * TIMEOUT_S + 30)
        print(f"the server reported the dead trainer {time.monotonic() - killed:.1f} s after")
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert server.weight_version() == version  # version 70 never published
    assert_same(server.complete(PROMPTS), before, "after the killed update")
    assert all(refit_segments_mapped(pid) == [] for pid in server.pids())
    assert not any(os.path.exists(f"/dev/shm/{os.path.basename(m)}") for m in mapped)
    # the dead sender's socket and its private directory: removed by the worker's receiver
    assert not os.path.exists(os.path.dirname(socket)), "the dead trainer's socket was left"

    load(trainer, new_state)  # the next trainer is served as usual
    engine = _trainer_engine(server, ModuleSource(trainer))
    try:
        engine.send_weights(71)
        assert server.weight_version() == "71"
        assert_same(server.complete(PROMPTS), fresh_new, "a new trainer after the killed one")
    finally:
        engine.shutdown()


def test_a_killed_server_fails_the_trainer_within_its_timeout(
    server, trainer, base_state, mapped_before
):
    """Kills the module's server (this test runs last)."""
    from rollout.vllm_backend.trainer import RefitBackendError

    load(trainer, base_state)
    engine, sender, go_on, outcome = send_halfway(
        lambda source: _trainer_engine(server, source), trainer, 80
    )
    pids, vllm_own = server.pids(), dict(server.segments.segments)
    assert vllm_own, "vLLM's own segments were not recorded at start-up"
    server.kill()
    killed = time.monotonic()
    go_on.set()
    sender.join(4 * TIMEOUT_S + 60)
    assert not sender.is_alive(), "send_weights did not return"
    print(f"the trainer reported the dead server {time.monotonic() - killed:.1f} s after")
    assert time.monotonic() - killed < 4 * TIMEOUT_S + 60
    assert isinstance(outcome.get("error"), RefitBackendError), outcome
    assert "update to version 80" in str(outcome["error"])
    engine.shutdown()
    assert set(refit_segments_mapped()) - mapped_before == set(), (
        "the trainer still maps its buffers"
    )
    assert not os.path.exists(os.path.dirname(engine.endpoint.removeprefix("ipc://")))
    assert not wait_gone(pids)
    server.close()  # vLLM's own segments, which its killed processes left: removed
    assert not [name for name in vllm_own if os.path.exists(f"/dev/shm/{name}")]
