"""The `refit` backend's trainer side: vLLM's TrainerWeightTransferEngine over our WeightSender.

`WeightTransferTrainerFactory.trainer_init(RefitTrainerInitInfo(...), client=..., source=...)`
opens one sender (its bucket buffers live as long as the engine) and tells every vLLM worker where
it is; each `send_weights()` is start -> update (the whole version, packed once for every worker)
-> finish with the version, which vLLM publishes only after every worker loaded it whole.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from vllm.distributed.weight_transfer.base import (
    TrainerInitInfo,
    TrainerWeightTransferEngine,
    WeightSource,
)

from rollout.config import RefitTimeouts
from rollout.load_path import LoadPath
from rollout.transfer import TransferConfig, TransferMode, TransferStats, WeightSender, new_endpoint
from rollout.vllm_backend import register
from rollout.vllm_backend.control import ControlPlane
from rollout.vllm_backend.messages import BackendInit, BackendUpdate

logger = logging.getLogger(__name__)


class RefitBackendError(RuntimeError):
    """A weight update through the `refit` backend failed; the engine keeps its previous version."""


@dataclass
class RefitTrainerInitInfo(TrainerInitInfo):
    """How the trainer side of backend `refit` sends (vLLM's TrainerInitInfo: `rank` keyword-only,
    rank 0 sends). `transfer`: transport, bucket_mb, sync, mode, timeout_s (each message's wait);
    `num_workers`: every vLLM worker of the engine (tensor x pipeline x data parallel sizes), all
    fed from one pass; `timeouts`: the waits around a whole update (rollout.config.RefitTimeouts);
    `call_timeout_s`: each other control-plane call; `device`: where the bucket buffers live (the
    engine's device type; None: cuda where torch sees one, else cpu).

    Example:
        info = RefitTrainerInitInfo(transfer=TransferConfig(bucket_mb=64), rank=0)
        engine = WeightTransferTrainerFactory.trainer_init(info, client=llm, source=source)
        engine.send_weights()                      # version 1, then 2, ...
    """

    backend: ClassVar[str] = "refit"

    transfer: TransferConfig = field(default_factory=TransferConfig)
    num_workers: int = 1
    timeouts: RefitTimeouts = field(default_factory=RefitTimeouts)
    load_path: LoadPath = LoadPath.auto
    call_timeout_s: float = 300.0
    device: str | None = None
    endpoint_dir: str | None = None  # where the sender's socket goes (None: a private temp dir)
    reset_prefix_cache: bool = True  # after each update: no prompt block of the old weights

    def __post_init__(self) -> None:
        self.load_path = LoadPath(self.load_path)
        t, message_s = self.timeouts, self.transfer.timeout_s
        if not t.next_bucket_s > message_s:
            raise ValueError(
                f"RefitTrainerInitInfo: timeouts.next_bucket_s={t.next_bucket_s!r} "
                f"must exceed transfer.timeout_s={message_s!r}"
            )
        if not t.worker_reply_s > max(t.next_bucket_s, t.receiver_exit_s):
            raise ValueError(
                f"RefitTrainerInitInfo: timeouts.worker_reply_s={t.worker_reply_s!r} "
                "must exceed timeouts.next_bucket_s and timeouts.receiver_exit_s"
            )
        if isinstance(self.num_workers, bool) or self.num_workers < 1:
            raise ValueError(f"RefitTrainerInitInfo: num_workers={self.num_workers!r} must be >= 1")
        if self.num_workers > 1 and self.transfer.mode is TransferMode.direct:
            raise ValueError(
                f"RefitTrainerInitInfo: transfer.mode=direct feeds one worker, not "
                f"num_workers={self.num_workers}: use mode=bucketed"
            )
        if not self.call_timeout_s > 0:
            raise ValueError(
                f"RefitTrainerInitInfo: call_timeout_s={self.call_timeout_s!r} must be > 0 seconds"
            )


class RefitTrainerEngine(TrainerWeightTransferEngine[RefitTrainerInitInfo]):
    """Built by `WeightTransferTrainerFactory.trainer_init` on every trainer rank; rank 0 sends.

    Example:
        engine = WeightTransferTrainerFactory.trainer_init(info, client=client, source=source)
        stats = engine.send_weights()              # TransferStats of version 1 (rank 0)
        engine.shutdown()                          # the engine drops its receiver, buffers freed
    """

    init_info_cls = RefitTrainerInitInfo

    def __init__(self, *, client: Any, source: WeightSource, info: RefitTrainerInitInfo) -> None:
        super().__init__(client=client, source=source, is_sender=info.is_sender)
        self.info = info
        self.control = ControlPlane(client, info.call_timeout_s)
        self.version = 0  # the last version sent whole (0: the engine's own start-up weights)
        self.sender: WeightSender | None = None
        self.endpoint = ""  # the sender's socket, where every vLLM worker's receiver connects

    @classmethod
    def trainer_init(
        cls, init_info: RefitTrainerInitInfo, *, client: Any, source: WeightSource | None = None
    ) -> RefitTrainerEngine:
        if source is None:
            raise ValueError(
                "the refit backend sends the whole model every round: pass "
                "source=ModuleSource(model) or another vLLM WeightSource"
            )
        engine = cls(client=client, source=source, info=init_info)
        if engine.is_sender:
            engine._connect()
        return engine

    def _connect(self) -> None:
        info, t = self.info, self.info.timeouts
        device = info.device or ("cuda" if torch.cuda.is_available() else "cpu")
        endpoint = new_endpoint(info.endpoint_dir) if info.endpoint_dir else new_endpoint()
        self.endpoint = endpoint
        self.sender = WeightSender(
            info.transfer, endpoint, device=device, num_receivers=info.num_workers
        )
        init = BackendInit(
            endpoint, info.transfer, t.next_bucket_s, t.receiver_exit_s, info.load_path
        )
        try:
            self.control.call("init_weight_transfer_engine", init.to_dict())
        except BaseException:
            self.sender.close()
            raise

    def send_weights(self, version: int | None = None) -> TransferStats | None:
        """One whole version (`version`, default the last one + 1) to every worker; returns the
        sender's stats on rank 0. Raises RefitBackendError: the engine keeps its previous weights
        and version (the worker's error first: it is the root cause)."""
        version = self.version + 1 if version is None else version
        if not self.is_sender:
            for _ in self.source:  # a sharded source's gathers are collectives over every rank
                pass
            self.version = version
            return None
        self.control.call("start_weight_update")
        update = self.control.start("update_weights", BackendUpdate(version).to_dict())
        reply_s = self.info.timeouts.worker_reply_s
        try:
            stats = self.sender.send(iter(self.source), version)
        except BaseException as exc:
            try:
                update.wait(reply_s)
            except BaseException as engine_exc:  # noqa: BLE001 - the root cause, reported first
                raise RefitBackendError(
                    f"update to version {version}: {engine_exc}; the sender: {exc}"
                ) from exc
            raise RefitBackendError(f"update to version {version}: sending failed: {exc}") from exc
        try:
            update.wait(reply_s)
        except (RuntimeError, TimeoutError) as exc:
            raise RefitBackendError(f"update to version {version}: {exc}") from exc
        self.control.call("finish_weight_update", str(version))
        if self.info.reset_prefix_cache:
            self.control.reset_prefix_cache()
        self.version = version
        return stats

    def shutdown(self) -> None:
        """Idempotent: the engine drops its receiver, then the sender frees its buffers (also when
        the engine cannot be told: a dead server's workers are gone with their receivers)."""
        if self.sender is None:
            return
        try:
            self.control.shutdown()
        except (RuntimeError, TimeoutError) as exc:
            logger.warning("refit backend: %s; the sender's buffers are freed anyway", exc)
        finally:
            self.sender.close()
            self.sender = None


register()  # `trainer_init` works in a trainer process that never loaded vLLM's plugins
