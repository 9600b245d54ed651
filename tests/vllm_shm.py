"""The suite's check for vLLM's own shared memory (`psm_*`, `sem.mp-*`, `vllm_dist_*cpushm*`): a test's engine
must leave none of the segments ITS processes held. Attributed by inode to the engine's pids while they run
(other jobs on the host run vLLM too: their segments are never looked at). Written apart from
rollout/vllm_segments.py on purpose, so that the check does not trust the code it checks."""

from __future__ import annotations

import os

SHM = "/dev/shm"
PREFIXES = ("psm_", "sem.mp-", "vllm_dist_")


def _inodes(pid: int) -> set[int]:
    found = set()
    try:
        with open(f"/proc/{pid}/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].startswith(SHM + "/"):
                    found.add(int(fields[4]))
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(SHM + "/"):
                    found.add(os.stat(f"/proc/{pid}/fd/{fd}").st_ino)
            except OSError:
                pass
    except OSError:
        pass
    return found


def vllm_segments_held_by(pids) -> dict[str, int]:
    """{name: inode} of vLLM's segments that processes `pids` map or hold open now."""
    inodes = set().union(*(_inodes(p) for p in pids)) if pids else set()
    return {
        e.name: e.inode()
        for e in os.scandir(SHM)
        if e.name.startswith(PREFIXES) and e.inode() in inodes
    }


def vllm_segments_left(segments: dict[str, int]) -> list[str]:
    """Those of `segments` that still exist (the same file)."""
    left = []
    for name, inode in segments.items():
        try:
            if os.stat(os.path.join(SHM, name)).st_ino == inode:
                left.append(name)
        except OSError:
            pass
    return sorted(left)
