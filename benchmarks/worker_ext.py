"""The refit worker extension plus RPCs only benchmarks and tests call: timed reloads, worker facts, a race switch.

Start an engine with it by name: `build_rollout(cfg, path, worker_extension=BENCH_WORKER_EXTENSION)`.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from rollout.load_path import LoadPath
from rollout.vllm_compat import detach_layerwise_pending
from rollout.worker.extension import RefitWorkerExtension

BENCH_WORKER_EXTENSION = "benchmarks.worker_ext.BenchWorkerExtension"


class BenchWorkerExtension(RefitWorkerExtension):
    """RefitWorkerExtension with `refit_bench_*`, `refit_worker_info` and the `refit_debug_*` switches, each
    working through the extension's one WorkerRefit (rollout/worker/refit.py), which holds all the state.

    Example:
        ro = build_rollout(cfg, path, worker_extension=BENCH_WORKER_EXTENSION)
        seconds = ro.llm.collective_rpc("refit_bench_reload_from_disk", args=(weights_dir,))[0]
    """

    def refit_worker_info(self) -> dict[str, Any]:
        """Plain facts about the worker process, for benchmarks, logs and the kill tests (pid, rank in its engine)."""
        device = self._refit_component().target.device
        return {
            "torch_threads": torch.get_num_threads(),
            "device": str(device),
            "pid": os.getpid(),
            "rank": self.rank,
        }

    def refit_bench_reload_from_memory(
        self,
        safetensors_path: str | None = None,
        specs: list[tuple[str, list[int], str]] | None = None,
        seed: int = 0,
        load_path: str = "auto",
    ) -> float:
        """Seconds of the load into the model alone (through the path a refit asking for `load_path` takes),
        fed from tensors already in this worker's device memory: the part of a refit that no transfer can
        remove. The tensors are read from `safetensors_path`, or
        made random from `specs` [(name, shape, dtype name)] (no file for a 7B model), onto the worker's
        device first, untimed."""
        refit = self._refit_component()
        device = refit.target.device
        if safetensors_path is not None:
            from safetensors.torch import load_file

            state = load_file(safetensors_path, device=str(device))
        else:
            gen = torch.Generator(device=device).manual_seed(seed)
            state = {
                name: random_weight(name, shape, getattr(torch, dtype), device, gen)
                for name, shape, dtype in specs or []
            }
        path = refit.prepare(LoadPath(load_path))
        refit.sync()
        start = time.perf_counter()
        refit.reload(path, weights_iterator=iter(state.items()))
        refit.sync()
        seconds = time.perf_counter() - start
        del state
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the bench's extra copy must not stay reserved in this process
        return seconds

    def refit_bench_reload_from_disk(self, weights_dir: str) -> float:
        """Seconds of vLLM's reload from a checkpoint directory (device work included)."""
        refit = self._refit_component()
        refit.prepare(LoadPath.layerwise)
        start = time.perf_counter()
        refit.reload(LoadPath.layerwise, weights_path=weights_dir)
        refit.sync()
        return time.perf_counter() - start

    def refit_debug_reallocate(self, name: str) -> int:
        """Give parameter `name` a fresh storage with the same values: what a refit must never do
        under CUDA graphs (they keep reading the old one). The graph-audit test shows the audit
        names it."""
        param = dict(self.model_runner.get_model().named_parameters())[name]
        param.data = param.data.clone()
        return param.data_ptr()

    def refit_debug_skip_detach(self, skip: bool) -> None:
        """`True` stops copying the reload's buffered tensors out of a bucket before its release: the race
        this project exists to prevent. The engine tests use it to show that the copy keeps refits exact."""
        self._refit_component().detach_pending = _no_detach if skip else detach_layerwise_pending


def _no_detach(bucket: Any) -> int:
    return 0


def random_weight(
    name: str, shape: list[int], dtype: torch.dtype, device: torch.device, gen: torch.Generator
) -> torch.Tensor:
    """A plausible random weight: norms 1, biases 0, the rest N(0, 0.02) (finite activations in bf16)."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype, device=device)
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=dtype, device=device)
    return torch.randn(shape, generator=gen, device=device, dtype=dtype).mul_(
        0.02
    )  # no fp32 temporary
