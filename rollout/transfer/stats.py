"""What one refit moved and how long it took, as both ends report it."""

from __future__ import annotations

from dataclasses import dataclass


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
