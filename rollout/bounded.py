"""Bounded waits on vLLM's engine core: vLLM's clients wait on a utility call's future and on their output
queue with no timeout, and nothing fails them when the engine-core process dies (a SIGKILL, a Ctrl-C it
took), so a call in flight then, `close()`'s included, waited forever. `EngineCoreWatch` fails them the
moment the process is gone; `bounded` caps any blocking call in time."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from multiprocessing import connection
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


class EngineCoreWatch:
    """A daemon thread waiting on the engine-core processes of a vLLM client (`LLM.llm_engine.engine_core`,
    `AsyncLLM.engine_core`). When one exits unexpectedly it logs it, marks the client dead (vLLM's own flag:
    later calls raise EngineDeadError at once), then fails every pending utility call and wakes the output
    reader with EngineDeadError. `loop`: the event loop of an async client (its futures and queue live there).

    Example:
        watch = EngineCoreWatch(llm.llm_engine.engine_core, "engine 0")
        ...                                  # a dead core fails generate() / collective_rpc() at once
        watch.stop()                         # before the engine's own shutdown, where exits are expected
    """

    def __init__(self, client: Any, owner: str, loop: Any = None) -> None:
        self.client, self.owner, self.loop = client, owner, loop
        manager = getattr(getattr(client, "resources", None), "engine_manager", None)
        self._procs = [p for p in getattr(manager, "processes", None) or [] if p.pid is not None]
        self._stopped = threading.Event()
        self.died: str | None = None  # what died, once it did
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"refit-watch-{owner}")
        if self._procs:
            self._thread.start()

    def dead(self) -> str | None:
        """What died, or None while the core lives. vLLM's own monitor may see the exit first: then the watch
        gets a moment to read the exit code."""
        resources = getattr(self.client, "resources", None)
        if self.died is None and getattr(resources, "engine_dead", False):
            if self._thread.is_alive():
                self._thread.join(2.0)
            if self.died is None:  # a loaded machine can starve the watch: read the exit code here
                ended = set(connection.wait([p.sentinel for p in self._procs], timeout=0))
                exited = [p for p in self._procs if p.sentinel in ended]
                return (
                    self._exit_message(exited[0])
                    if exited
                    else f"{self.owner}: vLLM's engine core is dead"
                )
        return self.died

    def _exit_message(self, proc: Any) -> str:
        # Reaps it for its exit code. vLLM's own monitor may be reaping it in another thread: the loser
        # of that waitpid sees None until the winner has stored the code, so wait for it a moment.
        deadline = time.monotonic() + 2.0
        proc.join(1.0)
        while proc.exitcode is None and time.monotonic() < deadline:
            time.sleep(0.01)
        code = proc.exitcode if proc.exitcode is not None else "unknown (not reaped yet)"
        return f"{self.owner}: vLLM's engine core (pid {proc.pid}) exited with code {code}"

    def stop(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        by_sentinel = {p.sentinel: p for p in self._procs}
        done: list = []
        while not done and not self._stopped.is_set():
            done = connection.wait(list(by_sentinel), timeout=0.5)
        if self._stopped.is_set():
            return
        proc = by_sentinel[done[0]]
        self.died = self._exit_message(proc)
        logger.error("%s; failing the calls waiting on it", self.died)
        self._fail_waiters()

    def _fail_waiters(self) -> None:
        from vllm.v1.engine.exceptions import EngineDeadError

        client = self.client
        client.resources.engine_dead = (
            True  # first: a call registered after the sweep below fails on it
        )
        futures = list(getattr(client, "utility_results", {}).values())
        queue = getattr(client, "outputs_queue", None)
        if self.loop is None:
            for future in futures:
                if not future.done():
                    future.set_exception(EngineDeadError())
            if queue is not None:
                queue.put_nowait(EngineDeadError())
        elif not self.loop.is_closed():
            self.loop.call_soon_threadsafe(_fail_async, futures, queue)


def _fail_async(futures: list, queue: Any) -> None:
    from vllm.v1.engine.exceptions import EngineDeadError

    for future in futures:
        if not future.done():
            future.set_exception(EngineDeadError())
    if queue is not None:
        queue.put_nowait(EngineDeadError())


def bounded(fn: Callable[[], T], timeout_s: float, what: str) -> T:
    """`fn()` in a daemon thread, waited for at most `timeout_s`: a call that never returns is left
    behind (a daemon thread does not hold up exit) and raises TimeoutError naming `what`."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True, name=f"refit-bounded-{what}")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"{what} did not return within {timeout_s} s")
    if "error" in result:
        raise result["error"]
    return result["value"]
