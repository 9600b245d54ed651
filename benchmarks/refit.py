"""End-to-end refit time into a live vLLM engine, against the two-copy floor and the save-to-disk-and-reload path.

Run from the repo root (config: benchmarks/conf/refit.yaml; schema: RefitBenchRoot below):
    python -m benchmarks.refit                                     # the tiny model
    python -m benchmarks.refit bench.model=qwen2_0_5b rollout.transfer.bucket_mb=256 bench.num_repeats=5
    # GPU (vLLM's CUDA build, bf16, transport auto -> cuda_ipc, trainer-side state on cuda:0):
    python -m benchmarks.refit bench.backend=vllm_gpu bench.model=qwen2_0_5b rollout.transfer.bucket_mb=1024
    python -m benchmarks.refit bench.backend=vllm_gpu bench.model=qwen2_7b rollout.transfer.bucket_mb=1024 \
        bench.num_repeats=3 bench.disk=false

For one locally built model (the embedded tiny model, a random Qwen2-0.5B-shaped bf16 model, or on a GPU
a Qwen2.5-7B-shaped one: 15.2 GB bf16, built config-only and started with load_format="dummy", the
trainer-side state made random directly on the GPU) and one engine, it measures (medians over
bench.num_repeats, after one warm-up of each):
  floor:  the two unavoidable copies in this process, tensor by tensor with torch copy_ (pack each
          bucket of the same layout and size, then copy its views into destination tensors) — the
          same definition as `python -m benchmarks.transfer`. On a GPU everything is on cuda:0, the timing
          is fenced by torch.cuda.synchronize, and tensors of one shape share one destination (a
          second 15 GB copy does not fit beside the engine; the write bandwidth is the same);
  refit:  `ro.update_weights(state, version)`: transfer + in-place reload + cache reset, end to end;
  disk:   what users otherwise do without restarting: save the state as safetensors, then reload it
          in the live engine (`reload_weights(weights_path=...)` on the worker) + prefix-cache reset
          (skipped with bench.disk=false, always for 7B);
  reload: vLLM's in-place reload alone, from tensors already in the worker's (device) memory (timed
          inside the worker): what a refit costs even with a free transfer;
  start:  a fresh engine (once; the restart alternative).
They are interleaved per repeat (floor, refit, disk, reload, floor, ...) so that load from other jobs
on a shared machine hits them alike.
With `rollout.transfer.mode=direct` the floor is ONE copy (each tensor copy_'d once into a destination).
`bench.compare_modes=true` also times direct against bucketed fenced on the same engine, end to end
(`update_weights`): alternating blocks of bench.num_repeats refits per mode, twice, each block after one
untimed refit (a switch opens a new connection), the one-copy floor timed beside each refit, and the
trainer process's resident anonymous + shared memory after each block minus before it:
    python -m benchmarks.refit bench.model=qwen2_0_5b bench.compare_modes=true bench.disk=false
It also checks the refit against a reference outside vLLM's reload: after a refit to scaled weights, the
engine's greedy tokens and log-probs must equal those of a FRESH engine started from the same weights on
disk (the live engine is closed first, so a 7B pair fits; bench.fresh_check=false skips it). Comparing with
the disk reload instead would go through the same in-place reload and could not catch its faults (issue 10).
`one_copy_floor_s` (each tensor copied once, timed beside every refit) is the measure of a load straight
into the engine's parameters (`refit_over_one_copy`; `load_path` says which load path ran).
Prints the JSON and writes it to `bench.out` in Hydra's output directory.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import torch

from benchmarks import hydra_app, register_schema
from rollout.config import Backend, BackendConfig, Mode, RefitTimeouts, RolloutConfig
from rollout.load_path import LoadPath
from rollout.transfer import Sync, TransferConfig, TransferMode
from rollout.transfer.config import coerce_enum


class BenchModel(str, Enum):
    tiny = "tiny"  # the embedded tiny model (fp32 on the CPU, bf16 on a GPU)
    qwen2_0_5b = "qwen2_0_5b"  # Qwen2.5-0.5B's shapes, random bf16 weights
    qwen2_7b = "qwen2_7b"  # Qwen2.5-7B's shapes, 15.2 GB bf16, dummy engine start (GPU only)


@dataclass
class RefitBenchConfig:
    """The `bench` node of `python -m benchmarks.refit`."""

    backend: Backend = Backend.vllm_cpu  # vllm_cpu | vllm_gpu
    model: BenchModel = BenchModel.tiny
    num_repeats: int = 5
    num_threads: int = 1  # torch threads in this (trainer) process
    max_model_len: int = 512
    # The engine's share of device memory; null: 0.4 on a GPU (7B = 15.2 GB trainer state + 15.2 GB engine
    # weights + KV cache + the reload measurement's 15.2 GB on an 80 GB card), BackendConfig's on the CPU.
    gpu_memory_utilization: Optional[float] = None
    disk: bool = (
        True  # also time the save-to-disk-and-reload path (never for 7B: no room for a copy)
    )
    compare_modes: bool = False  # also time mode=direct against bucketed fenced on the same engine
    # Compare the refitted engine with a fresh one on the same weights (7B: writes 15 GB to a temp dir).
    fresh_check: bool = True
    out: str = "refit.json"  # in Hydra's output directory

    def __post_init__(self) -> None:
        self.backend = coerce_enum(Backend, self.backend, "bench.backend")
        self.model = coerce_enum(BenchModel, self.model, "bench.model")
        if self.backend is Backend.vllm_ascend:
            raise ValueError("bench.backend=vllm_ascend is not supported: vllm_cpu or vllm_gpu")
        if self.model is BenchModel.qwen2_7b and self.backend is not Backend.vllm_gpu:
            raise ValueError(
                "bench.model=qwen2_7b needs bench.backend=vllm_gpu (15 GB of bf16 weights on each side)"
            )
        if self.num_repeats < 1:
            raise ValueError(f"bench.num_repeats must be >= 1, got {self.num_repeats!r}")


@dataclass
class RefitBenchRollout:
    """The parts of `rollout` this benchmark lets you set; the backend node is built from `bench`."""

    mode: Mode = Mode.colocate
    load_path: LoadPath = LoadPath.auto  # as rollout.load_path: auto | layerwise | direct
    # transport auto: shm on the CPU, cuda_ipc on a GPU; long waits: a 15 GB refit on a busy host
    transfer: TransferConfig = field(default_factory=lambda: TransferConfig(timeout_s=300.0))
    timeouts: RefitTimeouts = field(
        default_factory=lambda: RefitTimeouts(
            next_bucket_s=600.0, receiver_exit_s=600.0, worker_reply_s=900.0
        )
    )

    def __post_init__(self) -> None:
        self.mode = coerce_enum(Mode, self.mode, "rollout.mode")
        self.load_path = coerce_enum(LoadPath, self.load_path, "rollout.load_path")


@dataclass
class RefitBenchRoot:
    rollout: RefitBenchRollout = field(default_factory=RefitBenchRollout)
    bench: RefitBenchConfig = field(default_factory=RefitBenchConfig)


@dataclass
class Subject:
    """The model under test: where it lives and the trainer-side state that refits send."""

    spec: Any  # rollout.tiny_model.TinyModelSpec
    path: Path
    state: dict[str, torch.Tensor]
    specs: Optional[list]  # (name, shape, dtype) for a dummy start (7B), else None
    weights_file: Optional[str]  # its safetensors file, else None

    @property
    def dummy(self) -> bool:
        return self.weights_file is None

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state.values())


def one_copy_floor(state: dict, dests: dict) -> float:
    """The least a refit's transfer can cost: each tensor copied once into its destination."""
    device = next(iter(state.values())).device
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for name, t in state.items():
        dests[name].copy_(t)
    if cuda:
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def trainer_memory_bytes() -> int:
    """This process's resident anonymous + shared memory (shared pages whole: the engine maps some of them)."""
    with open("/proc/self/status") as f:
        kb = {
            k: int(v.split()[0])
            for k, v in (
                line.split(":", 1) for line in f if line.startswith(("RssAnon", "RssShmem"))
            )
        }
    return (kb["RssAnon"] + kb["RssShmem"]) << 10


def compare_modes(ro, subject: "Subject", bench: "RefitBenchConfig", device, version: int) -> dict:
    """Direct against bucketed fenced on this engine, end to end; see the module docstring."""
    state = subject.state
    dests = (
        shared_dests(state)
        if device.type == "cuda"
        else {k: torch.empty_like(v).fill_(0) for k, v in state.items()}
    )
    modes = {
        "direct": dataclasses.replace(ro.refitter.transfer, mode=TransferMode.direct),
        "bucketed_fenced": dataclasses.replace(
            ro.refitter.transfer, mode=TransferMode.bucketed, sync=Sync.fenced
        ),
    }
    stats: dict[str, list] = {name: [] for name in modes}
    memory: dict[str, list[float]] = {name: [] for name in modes}
    floor: list[float] = []
    versions, original = itertools.count(version), ro.refitter.transfer
    try:
        for _ in range(2):
            for name, transfer in modes.items():
                ro.refitter.transfer = transfer
                before = trainer_memory_bytes()
                ro.update_weights(
                    state.items(), version=next(versions)
                )  # untimed: the new connection
                for _ in range(bench.num_repeats):
                    floor.append(one_copy_floor(state, dests))
                    stats[name].append(ro.update_weights(state.items(), version=next(versions)))
                memory[name].append((trainer_memory_bytes() - before) / 2**20)
    finally:
        ro.refitter.transfer = original
    med = statistics.median
    out = {"one_copy_floor_s": med(floor), "all_one_copy_floor_s": floor}
    for name, runs in stats.items():
        out[name] = {
            "refit_s": med(r.seconds for r in runs),
            "send_s": med(r.send_s for r in runs),
            "worker_load_s": med(r.load_s for r in runs),
            "num_buckets": runs[-1].num_buckets,
            "refit_over_one_copy_floor": med(r.seconds for r in runs) / med(floor),
            "trainer_memory_mb_per_block": memory[name],
            "all_refit_s": [r.seconds for r in runs],
        }
    out["direct_over_bucketed_fenced"] = (
        out["direct"]["refit_s"] / out["bucketed_fenced"]["refit_s"]
    )
    return out


def floor_once(state: dict, dests: dict, bucket: torch.Tensor, bucket_bytes: int) -> float:
    from rollout.transfer import layout

    cuda = bucket.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(bucket.device)
    start = time.perf_counter()
    for planned in layout.plan_buckets(state.items(), bucket_bytes):
        layout.pack(planned, bucket, bucket_bytes)
        layout.unpack_into(planned, bucket, dests, bucket_bytes)
    if cuda:
        torch.cuda.synchronize(bucket.device)
    return time.perf_counter() - start


def shared_dests(state: dict) -> dict:
    """One zeroed destination per (shape, dtype), shared by the tensors of that shape (GPU floor)."""
    by_shape: dict = {}
    for t in state.values():
        key = (tuple(t.shape), t.dtype)
        if key not in by_shape:
            by_shape[key] = torch.zeros_like(t)
    return {name: by_shape[(tuple(t.shape), t.dtype)] for name, t in state.items()}


def checkpoint_specs(model_dir: str) -> list[tuple[str, list[int], str]]:
    """(name, shape, dtype) of every tensor of the model's Hugging Face checkpoint, from its config alone
    (built on the meta device: no memory), in state-dict order; a tied lm_head is left out as on disk."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    dtype = config.__dict__.get("dtype") or config.__dict__.get("torch_dtype") or torch.bfloat16
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    specs = [
        (name, list(t.shape), str(dtype).removeprefix("torch."))
        for name, t in model.state_dict().items()
    ]
    if getattr(config, "tie_word_embeddings", False):
        specs = [s for s in specs if s[0] != "lm_head.weight"]
    return specs


def random_state(
    specs: list[tuple[str, list[int], str]], device: torch.device, seed: int = 0
) -> dict:
    """The same tensors, by the same rule and seed, as the worker's `refit_bench_reload_from_memory(specs=...)`."""
    from benchmarks.worker_ext import random_weight

    gen = torch.Generator(device=device).manual_seed(seed)
    return {
        name: random_weight(name, shape, getattr(torch, dtype), device, gen)
        for name, shape, dtype in specs
    }


def interleaved(fns: dict, repeats: int) -> dict[str, list[float]]:
    """One warm-up of each (first-touch page faults, shm allocation, handshake), then `repeats` rounds
    that run each once in turn, so a burst of load on this shared machine hits all of them alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def build_subject(bench: RefitBenchConfig, device: torch.device) -> Subject:
    from safetensors.torch import load_file

    from rollout.tiny_model import TinyModelSpec, ensure_tiny_model

    gpu = bench.backend is Backend.vllm_gpu
    # FlashAttention 3 (vLLM's GPU attention on Hopper) has no fp32 path: the tiny model runs in bf16 there.
    spec = {
        BenchModel.tiny: TinyModelSpec(dtype="bfloat16") if gpu else TinyModelSpec(),
        BenchModel.qwen2_0_5b: TinyModelSpec.qwen2_0_5b(),
        BenchModel.qwen2_7b: TinyModelSpec.qwen2_7b(),
    }[bench.model]
    dummy = (
        bench.model is BenchModel.qwen2_7b
    )  # random engine weights; the real (random) ones come by refit
    path = ensure_tiny_model(spec, with_weights=not dummy)
    if dummy:
        specs = checkpoint_specs(str(path))
        return Subject(spec, path, random_state(specs, device), specs, None)
    weights_file = os.path.join(path, "model.safetensors")
    return Subject(
        spec,
        path,
        {k: v.to(device) for k, v in load_file(weights_file).items()},
        None,
        weights_file,
    )


def rollout_config(root: RefitBenchRoot, subject: Subject) -> RolloutConfig:
    bench = root.bench
    backend = dict(
        name=bench.backend,
        dtype=subject.spec.dtype,
        max_model_len=bench.max_model_len,
        max_num_seqs=16,
        load_format="dummy" if subject.dummy else "auto",
    )
    utilization = bench.gpu_memory_utilization or (
        0.4 if bench.backend is Backend.vllm_gpu else None
    )
    if utilization is not None:
        backend["gpu_memory_utilization"] = utilization
    r = root.rollout
    return RolloutConfig(
        backend=BackendConfig(**backend),
        mode=r.mode,
        transfer=r.transfer,
        timeouts=r.timeouts,
        load_path=r.load_path,
    )


def measure(
    ro, subject: Subject, cfg: RolloutConfig, bench: RefitBenchConfig, tmp: str, device
) -> dict:
    """The interleaved timings (floor, refit, disk, reload) and the refits' stats."""
    from safetensors.torch import save_file

    state, bucket_bytes = subject.state, cfg.transfer.bucket_bytes
    gpu = device.type == "cuda"
    dests = (
        shared_dests(state) if gpu else {k: torch.empty_like(v).fill_(0) for k, v in state.items()}
    )
    bucket = torch.zeros(bucket_bytes, dtype=torch.uint8, device=device)
    version = iter(range(1, 10_000))
    stats: list = []
    reload_only: list[float] = []
    reload_error: list[str] = []

    def disk_reload() -> None:
        save_file(state, os.path.join(tmp, "model.safetensors"))
        ro.llm.collective_rpc("refit_bench_reload_from_disk", args=(tmp,))
        ro.llm.reset_prefix_cache()

    def vllm_reload() -> None:
        if reload_error:
            return
        try:
            kwargs = (
                {"safetensors_path": subject.weights_file}
                if subject.weights_file
                else {"specs": subject.specs}
            )
            reload_only.append(
                ro.llm.collective_rpc("refit_bench_reload_from_memory", kwargs=kwargs)[0]
            )
        except (
            Exception
        ) as exc:  # e.g. no room for a second copy in the worker: the rest still counts
            reload_error.append(f"{type(exc).__name__}: {exc}")

    fns = {
        "floor": (lambda: one_copy_floor(state, dests))
        if cfg.transfer.mode is TransferMode.direct
        else (lambda: floor_once(state, dests, bucket, bucket_bytes)),
        "one_copy": lambda: one_copy_floor(state, dests),
        "refit": lambda: stats.append(ro.update_weights(state.items(), version=next(version))),
        "disk": disk_reload,
        "reload": vllm_reload,
    }
    if not bench.disk or subject.dummy:
        del fns["disk"]
    times = interleaved(fns, bench.num_repeats)
    return {
        "times": times,
        "stats": stats,
        "reload_only": reload_only,
        "reload_error": reload_error,
        "next_version": next(version),
    }


PROMPTS = ["The quick brown fox", "12+7="]


def greedy(ro) -> list:
    return ro.generate(PROMPTS, max_tokens=16, temperature=0.0)


def refit_to_scaled(ro, subject: Subject, version: int) -> tuple[list, list]:
    """Greedy samples at the subject's weights, then after a refit to them scaled by 1.25 (in place: no
    room for a second copy of a 7B state beside the engine)."""
    ro.update_weights(subject.state.items(), version=version)
    original = greedy(ro)
    for v in subject.state.values():
        v.mul_(1.25)
    ro.update_weights(subject.state.items(), version=version + 1)
    return original, greedy(ro)


def fresh_engine_samples(subject: Subject, cfg: RolloutConfig, tmp: str) -> list:
    """Greedy samples of a fresh engine started from the subject's current weights saved to disk."""
    from safetensors.torch import save_file

    from rollout import build_rollout

    fresh_dir = Path(tmp) / "fresh"
    fresh_dir.mkdir()
    for f in subject.path.iterdir():  # config and tokenizer; the weights come from subject.state
        if f.is_file() and not f.name.startswith("model.safetensors"):
            shutil.copy(f, fresh_dir / f.name)
    save_file(
        {k: v.contiguous().cpu() for k, v in subject.state.items()},
        str(fresh_dir / "model.safetensors"),
    )
    fresh_cfg = dataclasses.replace(
        cfg, backend=dataclasses.replace(cfg.backend, load_format="auto")
    )
    with build_rollout(fresh_cfg, fresh_dir) as fresh:
        return greedy(fresh)


def compare(refitted: list, fresh: Optional[list], original: list) -> dict:
    tokens = [s.token_ids for s in refitted]
    out: dict[str, Any] = {
        "scaled_weights_changed_tokens": tokens != [s.token_ids for s in original]
    }
    if fresh is None:
        return {
            **out,
            "same_greedy_tokens_refit_vs_fresh": None,
            "max_logprob_diff_refit_vs_fresh": None,
        }
    same = tokens == [s.token_ids for s in fresh]
    diff = max(
        (abs(a - b) for x, y in zip(refitted, fresh) for a, b in zip(x.logprobs, y.logprobs)),
        default=0.0,
    )
    return {
        **out,
        "same_greedy_tokens_refit_vs_fresh": same,
        "max_logprob_diff_refit_vs_fresh": diff if same else None,
    }


def run(root: RefitBenchRoot) -> dict:
    """Start an engine, measure, check tokens, close; returns the result dict (also the JSON)."""
    from benchmarks.worker_ext import BENCH_WORKER_EXTENSION
    from rollout import build_rollout

    bench = root.bench
    torch.set_num_threads(bench.num_threads)
    gpu = bench.backend is Backend.vllm_gpu
    if gpu:
        torch.cuda.set_device(0)
    device = torch.device("cuda:0" if gpu else "cpu")
    subject = build_subject(bench, device)
    cfg = rollout_config(root, subject)
    start = time.perf_counter()
    ro = build_rollout(cfg, subject.path, worker_extension=BENCH_WORKER_EXTENSION)
    start_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory(prefix="refit-bench-") as tmp:
        try:
            worker_info = ro.llm.collective_rpc("refit_worker_info")[0]
            measured = measure(ro, subject, cfg, bench, tmp, device)
            if bench.compare_modes:
                measured["modes"] = compare_modes(
                    ro, subject, bench, device, measured["next_version"] + 10
                )
            original, refitted = refit_to_scaled(ro, subject, measured["next_version"] + 1000)
        finally:
            ro.close()  # before the fresh engine: a 7B pair does not fit beside the trainer's state
        fresh = fresh_engine_samples(subject, cfg, tmp) if bench.fresh_check else None
    return result(
        ro,
        root,
        cfg,
        subject,
        measured,
        compare(refitted, fresh, original),
        worker_info,
        start_s,
        device,
    )


def result(
    ro,
    root: RefitBenchRoot,
    cfg: RolloutConfig,
    subject: Subject,
    measured: dict,
    checks: dict,
    worker_info: dict,
    start_s: float,
    device,
) -> dict:
    bench, med = root.bench, statistics.median
    times, stats, reload_only = measured["times"], measured["stats"], measured["reload_only"]
    floor, refit, disk = times["floor"], times["refit"], times.get("disk")
    timed_stats = stats[1 : bench.num_repeats + 1]
    last = timed_stats[-1]
    reload_s = med(reload_only[1:]) if len(reload_only) > 1 else None
    num_bytes = subject.num_bytes
    return {
        "backend": bench.backend.value,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "vllm_version": ro.vllm_version,
        "model": bench.model.value,
        "dtype": subject.spec.dtype,
        "load_format": cfg.backend.load_format,
        "mode": cfg.mode.value,
        "transport": ro.refitter.transfer.transport.value,
        "gpu_memory_utilization": cfg.backend.gpu_memory_utilization,
        "num_bytes": num_bytes,
        "num_tensors": len(subject.state),
        "bucket_mb": cfg.transfer.bucket_mb,
        "sync": cfg.transfer.sync.value,
        "trainer_torch_threads": bench.num_threads,
        "worker_torch_threads": worker_info["torch_threads"],
        "worker_device": worker_info["device"],
        "floor_s": med(floor),
        "one_copy_floor_s": med(times["one_copy"]),
        "refit_s": med(refit),
        "refit_first_s": stats[0].seconds,
        "refit_send_s": med(s.send_s for s in timed_stats),
        "refit_worker_load_s": med(s.load_s for s in timed_stats),
        "num_buckets": last.num_buckets,
        "load_path": last.load_path,
        "detached_bytes": last.detached_bytes,
        "disk_reload_s": med(disk) if disk else None,
        "vllm_reload_from_memory_s": reload_s,
        "vllm_reload_error": measured["reload_error"][0] if measured["reload_error"] else None,
        "engine_start_s": start_s,
        "floor_gbps": num_bytes / med(floor) / 1e9,
        "refit_gbps": num_bytes / med(refit) / 1e9,
        "refit_over_floor": med(refit) / med(floor),
        "refit_over_one_copy": med(refit) / med(times["one_copy"]),
        "disk_over_refit": med(disk) / med(refit) if disk else None,
        "refit_over_vllm_reload": med(refit) / reload_s if reload_s else None,
        **checks,
        "all_floor_s": floor,
        "all_refit_s": refit,
        "all_disk_s": disk,
        "transfer_mode": cfg.transfer.mode.value,
        "floor": "one-copy" if cfg.transfer.mode is TransferMode.direct else "two-copy",
        "modes": measured.get("modes"),
    }


def _register() -> None:
    register_schema("refit", RefitBenchRoot)


_hydra_main = hydra_app("refit", RefitBenchRoot, run)

if __name__ == "__main__":
    _hydra_main()
