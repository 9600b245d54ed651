"""Test-only worker extension: the refit as it was before issue 10's fix (the reload alone), so the
tests can show that a tied model's output head then serves stale weights."""

from __future__ import annotations

from typing import Any

from rollout.worker_extension import RefitWorkerExtension


class KeepStaleTiedHead(RefitWorkerExtension):
    def _refit_reload(self, path: Any, **source: Any) -> None:
        self.reload_weights(**source, is_checkpoint_format=True)  # no reprocess_tied_heads
