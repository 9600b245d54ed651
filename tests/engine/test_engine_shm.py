"""vLLM's own shared memory (`psm_*` message queues, `sem.mp-*` locks) after an engine whose worker was
SIGKILLed is closed: vLLM leaves the dead worker's segments (hundreds of MB) until this process exits;
close() removes them (rollout/vllm_segments.py). Normal closes are checked by every engine fixture."""

from __future__ import annotations

import os
import signal

import psutil
from vllm_shm import vllm_segments_held_by, vllm_segments_left


def test_close_after_a_sigkilled_worker_leaves_none_of_the_engines_vllm_segments(
    extra_engine, tiny_path
):
    ro = extra_engine(tiny_path)
    pids = ro.vllm_segments.pids
    held = vllm_segments_held_by(pids)
    assert any(name.startswith("psm_") for name in held), held  # vLLM's message queues
    assert sorted(ro.vllm_segments.segments) == sorted(held)
    worker = next(p for p in pids if "Worker" in " ".join(psutil.Process(p).cmdline()))
    os.kill(worker, signal.SIGKILL)
    ro.close()
    _, alive = psutil.wait_procs(
        [psutil.Process(p) for p in pids if psutil.pid_exists(p)], timeout=30
    )
    assert not alive, f"vLLM processes survived close(): {alive}"
    assert vllm_segments_left(held) == [], "close() left the engine's vLLM shared memory behind"
