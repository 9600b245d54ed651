"""rollout/vllm_segments.py without vLLM: stand-in "engine" processes create segments named as vLLM's are
(`psm_*` through multiprocessing.shared_memory, a spawn-context lock's `sem.mp-*`, a raw
`vllm_dist_*-cpushm_0` file), are SIGKILLed, and `release()` removes exactly what they held."""

from __future__ import annotations

import logging
import mmap
import multiprocessing as mp
import os
import signal
import time
import uuid

from vllm_shm import vllm_segments_held_by, vllm_segments_left

from rollout.vllm_segments import SHM_DIR, EngineSegments


def _engine_process(conn, cpushm: str, foreign: str | None) -> None:
    """Holds what a vLLM process holds; maps `foreign` (another process's segment) too, if given."""
    from multiprocessing import shared_memory

    queue = shared_memory.SharedMemory(create=True, size=1 << 16)
    lock = mp.get_context("spawn").Lock()
    fd = os.open(os.path.join(SHM_DIR, cpushm), os.O_CREAT | os.O_RDWR, 0o600)
    os.ftruncate(fd, 1 << 16)
    views = [mmap.mmap(fd, 1 << 16)]
    if foreign is not None:
        with open(os.path.join(SHM_DIR, foreign), "r+b") as f:
            views.append(mmap.mmap(f.fileno(), 0))
    conn.send([queue.name, "sem." + lock._semlock.name.lstrip("/"), cpushm])
    time.sleep(600)


def _other_job(conn) -> None:
    """Another job's live vLLM-like segment: it removes it itself when told to."""
    from multiprocessing import shared_memory

    mine = shared_memory.SharedMemory(create=True, size=1 << 16)
    conn.send(mine.name)
    conn.recv()
    mine.close()
    mine.unlink()


def _start(target, *args):
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(child, *args), daemon=True)
    proc.start()
    assert parent.poll(60), "the stand-in process did not start"
    return proc, parent, parent.recv()


def _cpushm_name() -> str:
    return f"vllm_dist_{uuid.uuid4().hex}-tp:0-[0-1]-cpushm_0"


def _exists(name: str) -> bool:
    return os.path.exists(os.path.join(SHM_DIR, name))


def test_release_removes_what_a_sigkilled_engine_process_held_and_names_it(caplog):
    proc, _, names = _start(_engine_process, _cpushm_name(), None)
    try:
        segments = EngineSegments("test engine", {proc.pid})
        segments.record()
        assert set(segments.segments) == set(names), (
            segments.segments,
            names,
        )  # the lock by inode, too
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        assert all(_exists(n) for n in names)  # what vLLM leaves
        with caplog.at_level(logging.WARNING, logger="rollout.vllm_segments"):
            removed = segments.release(wait_s=5)
        assert sorted(removed) == sorted(names)
        assert not any(_exists(n) for n in names)
        assert all(n in caplog.text for n in names)
        assert segments.release(wait_s=1) == []  # idempotent
    finally:
        proc.kill()
        for n in names:
            if _exists(n):
                os.unlink(os.path.join(SHM_DIR, n))


def test_release_never_removes_a_segment_another_live_process_holds():
    other, other_conn, foreign = _start(_other_job)
    proc, _, names = _start(_engine_process, _cpushm_name(), foreign)
    try:
        segments = EngineSegments("test engine", {proc.pid})
        segments.record()
        assert (
            foreign in segments.segments
        )  # the engine mapped it: recorded, but someone else holds it
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        removed = segments.release(wait_s=5)
        assert sorted(removed) == sorted(names) and _exists(foreign)
    finally:
        proc.kill()
        other_conn.send("done")
        other.join(10)
        for n in names:
            if _exists(n):
                os.unlink(os.path.join(SHM_DIR, n))
    assert not _exists(foreign)


def test_release_waits_for_the_processes_and_keeps_what_a_survivor_holds():
    proc, _, names = _start(_engine_process, _cpushm_name(), None)
    try:
        segments = EngineSegments("test engine", {proc.pid})
        segments.record()
        start = time.monotonic()
        assert segments.release(wait_s=0.5) == []  # still running: nothing removed
        assert time.monotonic() - start >= 0.5
        assert all(_exists(n) for n in names)
    finally:
        proc.kill()
        proc.join(10)
        assert sorted(
            EngineSegments("test engine", {proc.pid}, dict(segments.segments)).release(1)
        ) == sorted(names)


def test_a_recorded_name_that_now_is_another_file_is_not_removed():
    name = _cpushm_name()
    path = os.path.join(SHM_DIR, name)
    with open(path, "wb"):
        pass
    try:
        inode = os.stat(path).st_ino
        stale = EngineSegments("test engine", set(), {name: inode + 1})  # recorded, then replaced
        assert stale.release(wait_s=0) == [] and _exists(name)
    finally:
        os.unlink(path)


def test_the_suite_check_sees_the_same_segments():
    proc, _, names = _start(_engine_process, _cpushm_name(), None)
    try:
        held = vllm_segments_held_by({proc.pid})
        assert sorted(held) == sorted(names)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        assert vllm_segments_left(held) == sorted(names)
        EngineSegments("test engine", {proc.pid}, dict(held)).release(wait_s=5)
        assert vllm_segments_left(held) == []
    finally:
        proc.kill()
