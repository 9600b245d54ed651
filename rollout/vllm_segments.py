"""vLLM's own shared-memory segments, attributed to the engine whose processes made them, and removed once
those processes are gone.

vLLM's processes create POSIX shared memory of their own (none of it is the transfer's `refit-*`):
`psm_*` (its message queues, ShmRingBuffer through `multiprocessing.shared_memory`, 160-240 MB each),
`sem.mp-*` (multiprocessing locks of spawned processes) and, for TP > 1 on the CPU,
`vllm_dist_<id>-tp:0-[0-1]-cpushm_<rank>` (its C++ SHM all-reduce). A process that exits cleanly removes
what it created; one that is SIGKILLed does not. Python's resource tracker removes the first two kinds when
the whole process tree exits, but not the third, and not at all where the tracker dies with the tree (a
killed Ray actor: Ray kills the actor's children, the tracker with them).

vLLM offers no list of these names outside its processes (the queues' handles live in the engine-core
process), so an engine records them while its processes run: the segments its processes map or hold open,
matched by inode (a semaphore's creator maps it under a temporary name). `release()` waits for those
processes to exit and removes what is left of them: only the recorded names, only where the file is still
the one recorded (same inode), and only where no live process maps or holds it, so another engine's
segments (other jobs run vLLM on the same host) are never touched.

Example:
    segments = EngineSegments.of_client(llm.llm_engine.engine_core, "engine 0")  # right after start-up
    ...                                   # the engine runs; a worker may die
    llm.llm_engine.engine_core.shutdown()
    segments.release()                    # removes what the exited processes left, with a warning naming it
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

logger = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
VLLM_PREFIXES = (
    "psm_",
    "sem.mp-",
    "vllm_dist_",
)  # vLLM's message queues, mp locks, CPU SHM all-reduce


def held_inodes(pid: int) -> set[int]:
    """The inodes of the files under /dev/shm that process `pid` maps or holds open (empty if it is gone)."""
    inodes: set[int] = set()
    try:
        with open(f"/proc/{pid}/maps") as maps:
            for line in maps:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].startswith(SHM_DIR + "/"):
                    inodes.add(int(parts[4]))
    except (OSError, ValueError):
        return inodes
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(SHM_DIR + "/"):
                inodes.add(os.stat(f"/proc/{pid}/fd/{fd}").st_ino)
        except OSError:
            continue
    return inodes


def vllm_segments(pids: Iterable[int]) -> dict[str, int]:
    """{name: inode} of vLLM's segments in /dev/shm that processes `pids` map or hold open."""
    inodes: set[int] = set()
    for pid in pids:
        inodes |= held_inodes(pid)
    if not inodes:
        return {}
    found = {}
    try:
        entries = list(os.scandir(SHM_DIR))
    except OSError:
        return {}
    for entry in entries:
        if entry.name.startswith(VLLM_PREFIXES):
            try:
                if entry.inode() in inodes:
                    found[entry.name] = entry.inode()
            except OSError:
                continue
    return found


def inodes_held_by_anyone(inodes: set[int]) -> set[int]:
    """Which of `inodes` (files under /dev/shm) some live process on this host maps or holds open."""
    held: set[int] = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            held |= held_inodes(int(name)) & inodes
            if held == inodes:
                break
    return held


def _alive(pids: Iterable[int]) -> set[int]:
    import psutil

    alive = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:  # a zombie holds no memory
                alive.add(pid)
        except psutil.Error:
            continue
    return alive


def engine_core_pids(client: Any) -> set[int]:
    """The processes of a vLLM engine-core client (`LLM.llm_engine.engine_core`, `AsyncLLM.engine_core`):
    its engine-core processes and their descendants (the workers). Empty where vLLM has none (in-process)."""
    import psutil

    manager = getattr(getattr(client, "resources", None), "engine_manager", None)
    pids = {p.pid for p in getattr(manager, "processes", None) or [] if p.pid is not None}
    for pid in list(pids):
        try:
            pids |= {c.pid for c in psutil.Process(pid).children(recursive=True)}
        except psutil.Error:
            continue
    return pids


@dataclass
class EngineSegments:
    """vLLM's segments of ONE engine: its processes' pids and the segments they held, {name: inode}.
    `tracked`: the processes share this process's multiprocessing resource tracker (they were spawned from
    here), so what is removed is also unregistered there (no "leaked shared_memory" warning at exit).
    Plain data: a Ray actor hands it to the driver, which releases it after the actor is killed."""

    owner: str
    pids: set[int] = field(default_factory=set)
    segments: dict[str, int] = field(default_factory=dict)
    tracked: bool = True

    @classmethod
    def of_client(cls, client: Any, owner: str) -> "EngineSegments":
        """Right after start-up: the engine's processes and the segments they hold now. Never raises
        (the engine runs whether or not its segments can be found)."""
        try:
            found = cls(owner, engine_core_pids(client))
            found.record()
        except Exception as exc:  # noqa: BLE001 - bookkeeping only
            logger.debug("%s: vLLM's shared-memory segments not recorded: %s", owner, exc)
            found = cls(owner)
        logger.debug(
            "%s: vLLM processes %s hold segments %s",
            owner,
            sorted(found.pids),
            sorted(found.segments),
        )
        return found

    @classmethod
    def merge(
        cls, owner: str, parts: Iterable["EngineSegments"], tracked: bool | None = None
    ) -> "EngineSegments":
        """One record of several engines' (an EngineGroup's); `tracked` overrides theirs (a Ray driver: False)."""
        parts = list(parts)
        merged = cls(owner, tracked=all(p.tracked for p in parts) if tracked is None else tracked)
        for part in parts:
            merged.pids |= part.pids
            merged.segments.update(part.segments)
        return merged

    def record(self) -> None:
        """Add the segments the engine's live processes hold now (call again before a shutdown)."""
        try:
            self.segments.update(vllm_segments(_alive(self.pids)))
        except Exception as exc:  # noqa: BLE001 - bookkeeping only
            logger.debug("%s: vLLM's shared-memory segments not recorded: %s", self.owner, exc)

    def left_behind(self) -> dict[str, int]:
        """The recorded segments that still exist (the same file: same inode)."""
        left = {}
        for name, inode in self.segments.items():
            try:
                if os.stat(os.path.join(SHM_DIR, name)).st_ino == inode:
                    left[name] = inode
            except OSError:
                continue
        return left

    def release(self, wait_s: float = 10.0) -> list[str]:
        """After the engine shut down (or died): wait up to `wait_s` for its processes to exit, then remove
        its recorded segments that no live process maps or holds. Returns the names removed; never raises."""
        try:
            return self._release(wait_s)
        except Exception as exc:  # noqa: BLE001 - a close path must not fail on this
            logger.warning(
                "%s: removing vLLM's leftover shared-memory segments failed: %s", self.owner, exc
            )
            return []

    def _release(self, wait_s: float) -> list[str]:
        deadline = time.monotonic() + wait_s
        alive = _alive(self.pids)
        while alive and time.monotonic() < deadline:
            time.sleep(0.1)
            alive = _alive(alive)
        left = self.left_behind()
        if not left:
            return []
        held = inodes_held_by_anyone(set(left.values()))
        removed, kept = [], []
        for name, inode in sorted(left.items()):
            if inode in held:
                kept.append(name)
                continue
            try:
                os.unlink(os.path.join(SHM_DIR, name))
            except FileNotFoundError:
                continue  # its creator removed it just now
            removed.append(name)
            if self.tracked:
                _untrack(name)
        self.segments = {n: i for n, i in self.segments.items() if n not in removed}
        if removed:
            logger.warning(
                "%s: removed %d shared-memory segment(s) that vLLM's exited processes left in %s: %s",
                self.owner,
                len(removed),
                SHM_DIR,
                ", ".join(removed),
            )
        if kept:
            holders = (
                f"this engine's processes {sorted(alive)} still run"
                if alive
                else "another live process holds them"
            )
            logger.warning(
                "%s: vLLM segment(s) %s kept: still in use (%s)",
                self.owner,
                ", ".join(kept),
                holders,
            )
        return removed


def _untrack(name: str) -> None:
    """Tell this process's resource tracker that a segment it was told about is gone, so that it does not
    try (and warn) again at exit. Only Python-made kinds are registered there; the C++ all-reduce's are not."""
    from multiprocessing import resource_tracker

    if name.startswith("psm_"):
        resource_tracker.unregister("/" + name, "shared_memory")
    elif name.startswith("sem.mp-"):
        resource_tracker.unregister("/" + name.removeprefix("sem."), "semaphore")
