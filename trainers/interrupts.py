"""Ctrl-C (SIGINT) and SIGTERM (`timeout`, Slurm) end a run between two steps instead of killing it.

The first signal sets a flag that the loop reads before each step: the step in progress finishes, then the
run writes a checkpoint, its summary and plot, prints how to resume, and exits non-zero. A second signal
while steps run raises KeyboardInterrupt at once; once the run is shutting down (every wait there has a
timeout), further signals are only noted. A terminal's Ctrl-C reaches vLLM's processes too (one process
group), and they shut down on it: a step that then fails on the engine is dropped, and the run keeps the
last finished one.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any, Callable, Optional, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupts:
    """The run's signal handlers, installed for the `with` block (main thread only: elsewhere, a no-op).

    Example:
        with Interrupts() as stop:
            for step in steps:
                if stop.requested:
                    break
                rollouts = stop.unless_signalled(generate, step)   # None: the engine died with the signal
            stop.shutting_down = True
    """

    def __init__(self) -> None:
        self.signum: Optional[int] = None  # the first signal received
        self.shutting_down = False  # past the loop: later signals no longer raise
        self._saved: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        """The shell's convention: 128 + the signal's number (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + (self.signum or 0)

    def __enter__(self) -> "Interrupts":
        if threading.current_thread() is threading.main_thread():
            self._saved = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum = signum
            logger.warning(
                "%s: finishing this step, then checkpoint and stop (again to stop now)", name
            )
        elif not self.shutting_down:
            raise KeyboardInterrupt(f"{name} again: stopping now")
        else:
            logger.warning("%s: already stopping (every wait is bounded)", name)

    def unless_signalled(self, fn: Callable[..., T], *args: Any) -> Optional[T]:
        """`fn(*args)`; None where it raised after a signal (vLLM's processes took a Ctrl-C too)."""
        try:
            return fn(*args)
        except Exception as exc:
            if not self.requested:
                raise
            logger.warning(
                "%s failed after the signal (%s: %s): the step is dropped",
                getattr(fn, "__name__", fn),
                type(exc).__name__,
                exc,
            )
            return None
