"""The worker's half of the graph audit (rollout/graph_audit.py): the model's tensors recorded once
the engine is built, then compared after each refit. Plain data comes back through vLLM's RPC."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from rollout.graph_audit import TensorRecord, compare, snapshot


class ModelAudit:
    """Where every tensor of one worker's model was at the start and at the last audit.

    Example:
        audit = ModelAudit(worker.model_runner.get_model)
        audit.start()               # once the engine is built (its CUDA graphs captured)
        report = audit.audit()      # after each refit: rollout.graph_audit.compare's dict
    """

    def __init__(self, get_model: Callable[[], torch.nn.Module]) -> None:
        self.get_model = get_model
        self.at_start: dict[str, TensorRecord] | None = None
        self.last: dict[str, TensorRecord] | None = None

    def start(self) -> int:
        """Record the model as the graphs captured it; returns how many tensors were recorded."""
        self.at_start = self.last = self.snapshot()
        return len(self.at_start)

    def audit(self) -> dict[str, Any]:
        """Compare the model now with its start (places) and with the last audit (values)."""
        if self.at_start is None:
            raise RuntimeError(
                "refit_audit before refit_audit_start (rollout.graph_audit=true calls it when the "
                "engine is built)"
            )
        now = self.snapshot()
        report = compare(self.at_start, self.last, now)
        self.last = now
        return report

    def digests(self) -> dict[str, tuple[str, int]]:
        """Every tensor's (kind, digest) by name: two engines on the same weights agree (tests)."""
        return {name: (r.kind, r.digest) for name, r in self.snapshot().items()}

    def snapshot(self) -> dict[str, TensorRecord]:
        model = self.get_model()
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return snapshot(model, device.type)
