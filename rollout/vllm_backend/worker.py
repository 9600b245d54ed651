"""The `refit` backend's worker side: a vLLM WeightTransferEngine that owns one WorkerRefit.

vLLM creates it in every worker when the engine runs with `weight_transfer_config={"backend":
"refit"}` and drives it from its own RPCs: `init_weight_transfer_engine` (where the trainer's
sender is), `start_weight_update`, one `update_weights` per version (the whole version, through our
transfer), `finish_weight_update` (vLLM then publishes the version). The update is staged: the
model is loaded only once the whole version has arrived, so a trainer that dies or fails midway
leaves the engine serving the previous complete version, and `finish_weight_update` refuses, so
that version stays published (rollout/worker/refit.py `receive_staged`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from vllm.distributed.weight_transfer.base import WeightTransferEngine

from rollout.vllm_backend.messages import BackendInit, BackendUpdate
from rollout.worker.refit import LoadTarget, WorkerRefit

logger = logging.getLogger(__name__)


class RefitWeightTransferEngine(WeightTransferEngine[BackendInit, BackendUpdate]):
    """Worker `w` of data-parallel replica `d` is receiver `rank_offset + d * world_size + w`.

    Example (what vLLM's worker does with it):
        engine = RefitWeightTransferEngine(config, vllm_config, device, model)
        engine.init_transfer_engine(engine.parse_init_info(init_info))     # BackendInit's dict
        engine.start_weight_update()
        engine.update_weights({"protocol": 1, "version": 3})                # receive + load
        engine.finish_weight_update()                  # raises unless version 3 loaded whole
    """

    init_info_cls = BackendInit
    update_info_cls = BackendUpdate
    supports_draft_weight_update = False

    def __init__(self, config: Any, vllm_config: Any, device: torch.device, model: Any) -> None:
        super().__init__(config, vllm_config, device, model)
        parallel = vllm_config.parallel_config
        rank = parallel.data_parallel_index * parallel.world_size + parallel.rank
        target = LoadTarget(
            torch.device(device),
            vllm_config,
            self.model_config,
            lambda: self.model,
            self._reload_layerwise,
        )
        self.refit = WorkerRefit(target, rank)
        self.init: BackendInit | None = None
        self.loaded_version: int | None = None  # loaded whole in the update under way
        self.failure = ""  # why the update under way failed

    def parse_init_info(self, init_dict: dict[str, Any]) -> BackendInit:
        return BackendInit.from_dict(init_dict)

    def parse_update_info(self, update_dict: dict[str, Any]) -> BackendUpdate:
        return BackendUpdate.from_dict(update_dict)

    def init_transfer_engine(self, init_info: BackendInit) -> None:
        """A (new) trainer: its sender's endpoint. The receiver connects at the first update."""
        self.refit.close()
        self.init = init_info

    def start_weight_update(self) -> None:
        if self.init is None:
            raise RuntimeError(
                "refit backend: start_weight_update before init_weight_transfer_engine: build "
                "the trainer side first (WeightTransferTrainerFactory.trainer_init)"
            )
        self.loaded_version, self.failure = None, ""

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # vLLM's default adds torch.accelerator.synchronize(): WorkerRefit syncs its device itself
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: BackendUpdate) -> None:
        """Receive version `update_info.version` whole from the trainer's sender, then load it."""
        if self.init is None:
            raise RuntimeError("refit backend: update_weights before init_weight_transfer_engine")
        try:
            loaded = self.refit.receive_staged(self.init.request(update_info.version))
        except BaseException as exc:
            self.failure = f"{type(exc).__name__}: {exc}"
            self.refit.close()  # the sender may be dead: unmap, remove its socket file
            logger.error(
                "refit backend: update to version %d failed, the engine keeps the "
                "previous weights: %s",
                update_info.version,
                self.failure,
            )
            raise
        self.loaded_version = loaded.version
        logger.info(
            "refit backend: version %d loaded in %.3f s (%s path)",
            loaded.version,
            loaded.load_s,
            loaded.load_path,
        )

    def finish_weight_update(self) -> None:
        """Refuses (raises) unless a whole version was loaded since start_weight_update, so vLLM
        publishes no version whose weights did not all arrive."""
        if self.loaded_version is None:
            why = self.failure or "no update_weights since start_weight_update"
            raise RuntimeError(
                f"refit backend: no complete update to finish ({why}); the engine still serves "
                "the previous version: run the trainer's send_weights() again"
            )

    def shutdown(self) -> None:
        self.refit.close()

    def _reload_layerwise(self, **source: Any) -> None:
        from vllm.model_executor.model_loader.reload.inplace import reload_weights

        source.setdefault("weights_path", None)
        reload_weights(self.vllm_config, self.model, is_checkpoint_format=True, **source)
