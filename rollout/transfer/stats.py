"""What one refit moved and how long it took, as both ends report it: in sum, and step by step to an observer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

# on_step(step, bucket_index): told by an end, on the thread that runs its send()/receive(), at each step
# of each bucket of a bucketed refit (WeightSender and WeightReceiver name their steps): "got X" just after
# message X came, "send X" just before X goes out (once sent, a peer woken by it may take our CPU), the
# others as they happen. For a timeline or a log: it runs on the refit's critical path, so it should do
# little more than take the time.
OnStep = Callable[[str, int], None]


def no_observer(step: str, bucket_index: int) -> None:
    """on_step when none is given."""


@dataclass(frozen=True)
class TransferStats:
    version: int
    num_bytes: int  # tensor payload, padding excluded
    num_tensors: int
    num_buckets: int
    seconds: float  # wall time of send() / receive()

    @property
    def gbps(self) -> float:
        """Payload throughput in GB/s (10^9 bytes per second)."""
        return self.num_bytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")
