"""How long vLLM's worker busy-waits for the scheduler's next step before it sleeps (vLLM: 1 s).

Generation beside training (the async engine): a worker spinning through the trainer's step takes
one of its cores.
"""

from __future__ import annotations

import gc


def set_idle_spin(seconds: float) -> int:
    """Every shared-memory queue this process reads busy-waits `seconds` after its last read, then
    sleeps until the writer's notification. Returns how many readers it set."""
    from vllm.distributed.device_communicators.shm_broadcast import SpinCondition

    # type(), not isinstance(): gc holds weak proxies too, and touching a dead one raises
    readers = [o for o in gc.get_objects() if issubclass(type(o), SpinCondition) and o.is_reader]
    for reader in readers:
        reader.busy_loop_s = seconds
    return len(readers)
