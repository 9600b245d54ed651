"""Fan-out refit time: one sender feeding a TP=2 engine, and two engines, against one single-worker engine.

Run from the repo root (config: benchmarks/conf/fanout.yaml; schema: FanoutBenchRoot below):
    python -m benchmarks.fanout                                    # Qwen2.5-0.5B-shaped, shm, 256 MB buckets
    python -m benchmarks.fanout bench.model=tiny bench.num_repeats=3
    # GPU: python -m benchmarks.fanout bench.backend=vllm_gpu rollout.transfer.bucket_mb=1024

Each bucket is packed once whatever the number of workers, so a fan-out refit should cost about what a
single-worker refit costs: the workers load their copies at the same time. The single-worker engine stays up
for the whole run; each fan-out layout is started beside it in turn (memory: on 2 cores a 0.5B model in
three engines at once does not fit beside the trainer's copy) and their refits are interleaved with its
refits, one warm-up each, so a burst of load from other jobs hits both alike. Reports medians, the ratio to
the single-worker refit, each worker's load time, and whether every layout greedily decodes the same tokens
after the last refit. Prints the JSON and writes it to `bench.out` in Hydra's output directory.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from benchmarks import hydra_app
from rollout.config import Backend, BackendConfig, RefitTimeouts, RolloutConfig
from rollout.transfer import TransferConfig
from rollout.transfer.config import coerce_enum

LAYOUTS = {"tp2": (1, 2), "engines2": (2, 1)}  # name -> (num_engines, tensor_parallel_size)
PROMPTS = ["The quick brown fox", "12+7="]


@dataclass
class FanoutBenchConfig:
    """The `bench` node of `python -m benchmarks.fanout`."""

    backend: Backend = Backend.vllm_cpu
    model: str = "qwen2_0_5b"  # tiny | qwen2_0_5b
    layouts: list[str] = field(default_factory=lambda: ["tp2", "engines2"])
    num_repeats: int = 5
    num_threads: int = 1  # torch threads in this (trainer) process
    out: str = "fanout.json"  # in Hydra's output directory

    def __post_init__(self) -> None:
        self.backend = coerce_enum(Backend, self.backend, "bench.backend")
        if self.model not in ("tiny", "qwen2_0_5b"):
            raise ValueError(f"bench.model must be tiny or qwen2_0_5b, got {self.model!r}")
        unknown = [name for name in self.layouts if name not in LAYOUTS]
        if unknown:
            raise ValueError(f"bench.layouts: unknown {unknown}; allowed: {', '.join(LAYOUTS)}")
        if self.num_repeats < 1:
            raise ValueError(f"bench.num_repeats must be >= 1, got {self.num_repeats!r}")


@dataclass
class FanoutBenchRollout:
    """The part of `rollout` this benchmark lets you set (auto: shm on the CPU, cuda_ipc on a GPU)."""

    transfer: TransferConfig = field(default_factory=lambda: TransferConfig(timeout_s=300.0))
    # the engine's own waits must outlast the transfer's (RolloutConfig checks it): a 0.5B refit on a busy host
    timeouts: RefitTimeouts = field(
        default_factory=lambda: RefitTimeouts(
            next_bucket_s=600.0, receiver_exit_s=600.0, worker_reply_s=900.0
        )
    )


@dataclass
class FanoutBenchRoot:
    rollout: FanoutBenchRollout = field(default_factory=FanoutBenchRollout)
    bench: FanoutBenchConfig = field(default_factory=FanoutBenchConfig)


def _rollout_cfg(root: FanoutBenchRoot, dtype: str, num_engines: int, tp: int) -> RolloutConfig:
    backend = BackendConfig(
        name=root.bench.backend,
        dtype=dtype,
        max_model_len=512,
        max_num_seqs=16,
        tensor_parallel_size=tp,
    )
    return RolloutConfig(
        backend=backend,
        transfer=root.rollout.transfer,
        timeouts=root.rollout.timeouts,
        num_engines=num_engines,
    )


def _greedy(ro) -> list[list[int]]:
    return [s.token_ids for s in ro.generate(PROMPTS, max_tokens=16, temperature=0.0)]


def _compare(one, other, state: dict, repeats: int, version) -> dict[str, list]:
    """One warm-up each, then `repeats` rounds of (one, other) refits of the same state."""
    stats: dict[str, list] = {"one": [], "other": []}
    for i in range(repeats + 1):
        for name, ro in (("one", one), ("other", other)):
            s = ro.update_weights(state.items(), version=next(version))
            if i:
                stats[name].append(s)
    return stats


def _summary(stats: list, start_s: float | None = None) -> dict[str, Any]:
    med = statistics.median
    out = {
        "refit_s": med(s.seconds for s in stats),
        "send_s": med(s.send_s for s in stats),
        "worker_load_s": [
            med(s.worker_load_s[w] for s in stats) for w in range(len(stats[0].worker_load_s))
        ],
        "all_refit_s": [s.seconds for s in stats],
    }
    if start_s is not None:
        out["engine_start_s"] = start_s
    return out


def run(root: FanoutBenchRoot) -> dict[str, Any]:
    from safetensors.torch import load_file

    from rollout import build_rollout
    from rollout.tiny_model import TinyModelSpec, ensure_tiny_model

    torch.set_num_threads(root.bench.num_threads)
    spec = TinyModelSpec.qwen2_0_5b() if root.bench.model == "qwen2_0_5b" else TinyModelSpec()
    path = ensure_tiny_model(spec)
    state = load_file(os.path.join(path, "model.safetensors"))
    version = iter(range(1, 100_000))
    result: dict[str, Any] = {
        "model": root.bench.model,
        "dtype": spec.dtype,
        "backend": root.bench.backend.value,
        "num_bytes": sum(t.numel() * t.element_size() for t in state.values()),
        "bucket_mb": root.rollout.transfer.bucket_mb,
        "sync": root.rollout.transfer.sync.value,
        "trainer_torch_threads": root.bench.num_threads,
        "layouts": {},
    }
    with build_rollout(_rollout_cfg(root, spec.dtype, 1, 1), path) as one:
        result["transport"] = one.transfer.transport.value
        for name in root.bench.layouts:
            num_engines, tp = LAYOUTS[name]
            start = time.perf_counter()
            with build_rollout(_rollout_cfg(root, spec.dtype, num_engines, tp), path) as other:
                start_s = time.perf_counter() - start
                stats = _compare(one, other, state, root.bench.num_repeats, version)
                same_tokens = _greedy(other) == _greedy(one)
            layout = {
                "num_engines": num_engines,
                "tensor_parallel_size": tp,
                **_summary(stats["other"], start_s),
                "one_worker": _summary(stats["one"]),
                "same_greedy_tokens": same_tokens,
            }
            layout["over_one_worker"] = layout["refit_s"] / layout["one_worker"]["refit_s"]
            result["layouts"][name] = layout
    return result


_hydra_main = hydra_app("fanout", FanoutBenchRoot, run)

if __name__ == "__main__":
    _hydra_main()
