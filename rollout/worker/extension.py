"""vLLM worker extensions (`worker_extension_cls`): thin mixins that own one WorkerRefit.

vLLM mixes the named class into its worker class without running its __init__, and refuses extension
attributes that clash with the worker's: every name here starts with `refit_`/`_refit_`, and the one
piece of state, the WorkerRefit, is made on first use. Only plain data crosses the RPC
(rollout/worker/rpc.py); the weights come through the transfer.
"""

from __future__ import annotations

import traceback
from typing import Any

from rollout.worker.audit import ModelAudit
from rollout.worker.idle_spin import set_idle_spin
from rollout.worker.refit import LoadTarget, WorkerRefit
from rollout.worker.rpc import ReceiveReply, ReceiveRequest


class RefitWorkerExtension:
    """Mixed into vLLM's worker class; driven by `collective_rpc("refit_receive", args=(request,))`
    with `request` a ReceiveRequest's dict.

    Every worker of every engine is one receiver of the same sender: worker `self.rank` of an engine
    whose workers start at receiver `request.rank_offset` is receiver `rank_offset + self.rank`.

    Example (driver side, see rollout/refit.py Refitter._start and _check_engine):
        request = ReceiveRequest(endpoint, transfer_cfg, version, 120.0, 120.0).to_dict()
        thread per engine: replies = llm.collective_rpc("refit_receive", args=(request,))
        caller: sender.send(named_tensors, version); join; ReceiveReply.from_dict(each reply)
    """

    def refit_receive(self, request: dict[str, Any]) -> dict[str, Any]:
        """One refit; returns a ReceiveReply's dict. Never raises through vLLM's RPC (that could
        take the engine down): errors come back with ok=False and the driver raises them."""
        receiver = self.rank
        try:
            parsed = ReceiveRequest.from_dict(request)
            receiver = parsed.rank_offset + self.rank
            loaded = self._refit_component().receive(parsed)
            reply = ReceiveReply(
                receiver,
                True,
                loaded.load_s,
                loaded.detached_bytes,
                loaded.load_path,
                loaded.load_plan,
            )
        except BaseException as exc:  # noqa: BLE001 - reported to the caller, who raises
            error = f"{type(exc).__name__}: {exc}"
            reply = ReceiveReply(receiver, False, error=error, traceback=traceback.format_exc())
        return reply.to_dict()

    def refit_close(self) -> None:
        """Close the receiver (unmaps its buffers, closes its socket) before the engine stops."""
        self._refit_component().close()

    def refit_lora_ids(self) -> list[int]:
        """The LoRA ids registered in this worker's LoRA manager (adapter refits' and vLLM's own)."""
        manager = getattr(self.model_runner, "lora_manager", None)
        return sorted(manager.list_adapters()) if manager is not None else []

    def refit_audit_start(self) -> int:
        """The graph audit's start (rollout/worker/audit.py); returns how many tensors it recorded."""
        return self._refit_audit().start()

    def refit_audit(self) -> dict[str, Any]:
        """The model now against its start and the last audit (rollout.graph_audit.compare)."""
        return self._refit_audit().audit()

    def refit_audit_digests(self) -> dict[str, tuple[str, int]]:
        """Every tensor's (kind, digest) by name."""
        return self._refit_audit().digests()

    def _refit_component(self) -> WorkerRefit:
        # Made on first use: vLLM never runs an extension's __init__.
        component = self.__dict__.get("_refit_worker_refit")
        if component is None:
            component = self._refit_make_component()
            self.__dict__["_refit_worker_refit"] = component
        return component

    def _refit_audit(self) -> ModelAudit:
        audit = self.__dict__.get("_refit_model_audit")
        if audit is None:
            audit = self.__dict__["_refit_model_audit"] = ModelAudit(self.model_runner.get_model)
        return audit

    def _refit_make_component(self) -> WorkerRefit:
        """This worker's WorkerRefit (tests build a variant here)."""
        return WorkerRefit(LoadTarget.of_worker(self), rank=self.rank)


class AsyncWorkerExtension(RefitWorkerExtension):
    """The async engine's worker extension: the refit's, plus how long the worker busy-waits."""

    def refit_set_idle_spin(self, seconds: float) -> int:
        """See rollout/worker/idle_spin.py. Returns how many shm readers it set."""
        return set_idle_spin(seconds)
