"""An engine whose vLLM engine core dies (SIGKILL) mid-generate: generate() fails at once with vLLM's
EngineDeadError and close() returns within the transfer timeout, leaving no process, vLLM segment or
transfer socket. Before rollout/bounded.py both waited forever (vLLM's sync client waits on its output
queue and on a utility call's future with no timeout)."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import psutil
import pytest
from helpers import TEST_ENGINE_CFG, child_pids, wait_gone
from vllm_shm import vllm_segments_held_by, vllm_segments_left

from rollout import build_rollout

GENERATE_BOUND_S = (
    10.0  # a dead core fails generate() in well under this (the watch polls every 0.5 s)
)


def engine_core(pids: set[int]) -> psutil.Process:
    return next(
        psutil.Process(p) for p in pids if "EngineCore" in " ".join(psutil.Process(p).cmdline())
    )


def kill_mid_generate_then_close(ro, pids: set[int]) -> float:
    """SIGKILL the engine core 1 s into a long generate(); returns how long close() took."""
    from vllm.v1.engine.exceptions import EngineDeadError

    threading.Timer(1.0, os.kill, (engine_core(pids).pid, signal.SIGKILL)).start()
    start = time.monotonic()
    with pytest.raises(Exception) as failed:  # the async engine wraps it: "the batch failed: ..."
        ro.generate(["1+2="] * 32, n=16, max_tokens=400, temperature=1.0, seed=0)
    assert isinstance(failed.value, EngineDeadError) or isinstance(
        failed.value.__cause__, EngineDeadError
    ), failed.value
    assert time.monotonic() - start < GENERATE_BOUND_S, "generate() outlived its dead engine core"
    start = time.monotonic()
    ro.close()
    return time.monotonic() - start


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_dead_engine_core_fails_generate_and_close_in_time_leaving_nothing(
    tiny_path, base_state, kind, caplog
):
    import dataclasses

    cfg = dataclasses.replace(TEST_ENGINE_CFG, engine=kind, generate_timeout_s=120.0)
    before = child_pids()
    ro = build_rollout(cfg, tiny_path)
    pids = child_pids() - before
    segments = vllm_segments_held_by(pids)
    try:
        ro.update_weights(
            base_state.items(), version=1
        )  # the workers' receivers are open: close() calls them
        endpoint = ro.refitter.endpoint.removeprefix("ipc://")
        close_s = kill_mid_generate_then_close(ro, pids)
    finally:
        ro.close()  # idempotent; a failed assertion above still closes
    assert close_s < cfg.transfer.timeout_s, f"close() took {close_s:.1f} s"
    said = [r.getMessage() for r in caplog.records if r.name.startswith("rollout.")]
    assert any("exited with code -9" in m and "skipping the receivers' close" in m for m in said), (
        said
    )
    assert not wait_gone(pids), "vLLM processes survived close()"
    assert not vllm_segments_left(segments), (
        f"vLLM segments survived close(): {vllm_segments_left(segments)}"
    )
    assert not os.path.exists(endpoint), "the transfer socket survived close()"


def test_close_with_a_hung_engine_core_returns_within_its_bounds(tiny_path, base_state):
    """SIGSTOP the engine core (alive, answering nothing) before close(): the receivers' RPC gives up after the
    transfer timeout + 5 s (rollout/bounded.py), vLLM's shutdown kills the core after its own timeout, and
    nothing is left. Before bounded() close() waited on the RPC's future forever."""
    import dataclasses

    cfg = dataclasses.replace(
        TEST_ENGINE_CFG,
        transfer=dataclasses.replace(TEST_ENGINE_CFG.transfer, timeout_s=5.0),
        backend=dataclasses.replace(TEST_ENGINE_CFG.backend, shutdown_timeout_s=5.0),
    )
    before = child_pids()
    ro = build_rollout(cfg, tiny_path)
    pids = child_pids() - before
    segments = vllm_segments_held_by(pids)
    closed = False
    try:
        ro.update_weights(
            base_state.items(), version=1
        )  # the workers' receivers are open: close() calls them
        os.kill(engine_core(pids).pid, signal.SIGSTOP)
        closing = threading.Thread(target=ro.close, daemon=True)
        start = time.monotonic()
        closing.start()
        closing.join(60.0)
        close_s, closed = time.monotonic() - start, not closing.is_alive()
        assert closed, "close() hung on a stopped engine core"
    finally:
        if not closed:  # do not leak the stopped core (and its worker) into the session
            for pid in pids:
                with contextlib.suppress(psutil.NoSuchProcess):
                    psutil.Process(pid).kill()
    assert close_s < 5.0 + 5.0 + 5.0 + 15.0, (
        f"close() took {close_s:.1f} s"
    )  # RPC bound + shutdown + slack
    assert not wait_gone(pids), "vLLM processes survived close()"
    assert not vllm_segments_left(segments), (
        f"vLLM segments survived close(): {vllm_segments_left(segments)}"
    )
