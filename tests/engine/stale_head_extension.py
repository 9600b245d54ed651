"""Test-only worker extension: the refit as it was before issue 10's fix (the reload alone), so the
tests can show that a tied model's output head then serves stale weights."""

from __future__ import annotations

from typing import Any

from rollout.worker.extension import RefitWorkerExtension
from rollout.worker.refit import LoadTarget, WorkerRefit


class _ReloadAlone(WorkerRefit):
    def reload(self, path: Any, **source: Any) -> str:
        self.target.reload_layerwise(**source)  # no reprocess_tied_heads
        return ""


class KeepStaleTiedHead(RefitWorkerExtension):
    def _refit_make_component(self) -> WorkerRefit:
        return _ReloadAlone(LoadTarget.of_worker(self), rank=self.rank)
