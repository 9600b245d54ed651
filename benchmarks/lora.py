"""A LoRA refit (the adapter alone, into vLLM's LoRA manager) against a full refit of the same model, same run.

Run from the repo root (config: benchmarks/conf/lora.yaml; schema: LoraBenchRoot below):
    python -m benchmarks.lora                                  # the 0.5B-shaped model, ranks 8 and 64
    python -m benchmarks.lora bench.model=tiny bench.num_repeats=3

Two engines run side by side on the same base model (random Qwen2-0.5B shapes, bf16): one takes full
refits (`update_weights(model)`), the other serves LoRA adapters (rollout.adapter, max_lora_rank = the
largest rank) and takes adapter refits: PEFT-named A and B tensors for every target module of every
layer, bf16, random. Per repeat, interleaved so that load from other jobs hits them alike: the full refit,
then one adapter refit per rank. Beside each, the two-copy floor of its payload (pack every tensor into a
bucket-sized buffer, then copy it out: what any bucketed transfer copies). Reported: medians, bytes moved,
each refit over its floor, and the full refit over each LoRA refit.

Trainer memory (bench.memory): for full fine-tuning and for LoRA at each rank, the model is loaded in fp32
as the trainer holds it, one AdamW step runs on a short batch, and the bytes of the parameters, their
gradients and the optimizer's state are counted (tensors, not RSS: exact and independent of the allocator).
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from benchmarks import hydra_app
from benchmarks.refit import BenchModel, build_subject
from rollout.config import DEFAULT_LORA_MODULES, AdapterConfig, BackendConfig, RolloutConfig
from rollout.transfer import TransferConfig
from rollout.transfer.config import coerce_enum


@dataclass
class LoraBenchConfig:
    """The `bench` node of `python -m benchmarks.lora`."""

    model: BenchModel = BenchModel.qwen2_0_5b  # tiny | qwen2_0_5b (CPU)
    ranks: list[int] = field(default_factory=lambda: [8, 64])
    num_repeats: int = 5
    num_threads: int = 1  # torch threads in this (trainer) process
    bucket_mb: int = 256
    memory: bool = True  # also count the trainer's memory, full fine-tuning vs LoRA
    out: str = "lora.json"  # in Hydra's output directory

    def __post_init__(self) -> None:
        self.model = coerce_enum(BenchModel, self.model, "bench.model")
        if self.model is BenchModel.qwen2_7b:
            raise ValueError("bench.model=qwen2_7b is not supported here: tiny or qwen2_0_5b")
        if not self.ranks or min(self.ranks) < 1 or self.num_repeats < 1:
            raise ValueError("bench.ranks must be ranks >= 1 and bench.num_repeats >= 1")


@dataclass
class LoraBenchRoot:
    bench: LoraBenchConfig = field(default_factory=LoraBenchConfig)


def adapter_state(full: dict[str, torch.Tensor], rank: int, seed: int) -> dict[str, torch.Tensor]:
    """PEFT-named A [rank, in] and B [out, rank] for every target module of `full`'s layers."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, w in full.items():
        module = name.rsplit(".", 2)
        if len(module) < 3 or module[-2] not in DEFAULT_LORA_MODULES or module[-1] != "weight":
            continue
        prefix = f"base_model.model.{name[: -len('.weight')]}"
        rows, cols = w.shape
        for part, shape in (("lora_A", (rank, cols)), ("lora_B", (rows, rank))):
            t = torch.randn(shape, generator=gen, dtype=torch.float32) * 0.01
            out[f"{prefix}.{part}.weight"] = t.to(w.dtype)
    return out


def two_copy_floor(state: dict[str, torch.Tensor], bucket_bytes: int) -> float:
    """Pack each tensor into a bucket-sized buffer and copy it out again, bucket by bucket."""
    bucket = torch.empty(bucket_bytes, dtype=torch.uint8)
    dests = {k: torch.empty_like(v) for k, v in state.items()}
    start, offset, pending = time.perf_counter(), 0, []
    for name, t in state.items():
        n = t.numel() * t.element_size()
        if offset + n > bucket_bytes and pending:
            for k, o, m in pending:
                dests[k].view(-1).view(torch.uint8).copy_(bucket[o : o + m])
            offset, pending = 0, []
        if n > bucket_bytes:  # a tensor larger than the bucket: copied through it whole here
            dests[name].copy_(t)
            continue
        bucket[offset : offset + n].copy_(t.reshape(-1).view(torch.uint8))
        pending.append((name, offset, n))
        offset += n
    for k, o, m in pending:
        dests[k].view(-1).view(torch.uint8).copy_(bucket[o : o + m])
    return time.perf_counter() - start


def nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def trainer_memory(path: str, rank: int | None) -> dict[str, Any]:
    """Bytes of parameters, gradients and AdamW state after one step (fp32, as the trainer holds them)."""
    from trainers.learner import trainable
    from trainers.lora import wrap_policy
    from trainers.policy import load_policy

    model = load_policy(path)
    if rank is not None:
        model = wrap_policy(model, rank, 2.0 * rank, 0.0, list(DEFAULT_LORA_MODULES))
    params = trainable(model)
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(3, 90, (1, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    every = list(model.parameters())
    result = {
        "params_mb": sum(p.numel() * p.element_size() for p in every) / 2**20,
        "trainable_mb": sum(p.numel() * p.element_size() for p in params) / 2**20,
        "grads_mb": sum(p.grad.numel() * p.grad.element_size() for p in every if p.grad is not None)
        / 2**20,
        "optimizer_mb": sum(
            v.numel() * v.element_size()
            for s in opt.state.values()
            for v in s.values()
            if torch.is_tensor(v)
        )
        / 2**20,
    }
    result["total_mb"] = result["params_mb"] + result["grads_mb"] + result["optimizer_mb"]
    del model, opt, params, every
    gc.collect()
    return result


def run(root: LoraBenchRoot) -> dict[str, Any]:
    from rollout import build_rollout

    bench = root.bench
    torch.set_num_threads(bench.num_threads)
    subject = build_subject(_RefitBench(bench.model), torch.device("cpu"))
    full = subject.state
    backend = BackendConfig(dtype=subject.spec.dtype, max_model_len=512, max_num_seqs=8)
    transfer = TransferConfig(bucket_mb=bench.bucket_mb, timeout_s=60.0)
    top = max(bench.ranks)
    adapters = {r: adapter_state(full, r, seed=r) for r in bench.ranks}
    times: dict[str, list[float]] = {"full": [], **{f"lora_r{r}": [] for r in bench.ranks}}
    floors: dict[str, list[float]] = {k: [] for k in times}
    bucket_bytes = bench.bucket_mb << 20
    with (
        build_rollout(RolloutConfig(backend=backend, transfer=transfer), subject.path) as full_ro,
        build_rollout(
            RolloutConfig(
                backend=BackendConfig(**{**vars(backend), "max_lora_rank": top}),
                transfer=transfer,
                adapter=AdapterConfig(rank=top, alpha=2.0 * top),
            ),
            subject.path,
        ) as lora_ro,
    ):
        version = 0
        for repeat in range(bench.num_repeats + 1):  # the first round warms up, untimed
            version += 1
            stats = full_ro.update_weights(full.items(), version=version)
            if repeat:
                times["full"].append(stats.seconds)
                floors["full"].append(two_copy_floor(full, bucket_bytes))
            for r, state in adapters.items():
                lora_ro.refitter.adapter = AdapterConfig(rank=r, alpha=2.0 * r)
                stats = lora_ro.update_weights(state.items(), version=version * 100 + r)
                assert stats.load_path == "adapter" and stats.num_bytes == nbytes(state)
                if repeat:
                    times[f"lora_r{r}"].append(stats.seconds)
                    floors[f"lora_r{r}"].append(two_copy_floor(state, bucket_bytes))
        lora_ro.generate(["1+2="], max_tokens=4, temperature=0.0)  # the last adapter serves
    median = {k: statistics.median(v) for k, v in times.items()}
    floor = {k: statistics.median(v) for k, v in floors.items()}
    sizes = {"full": nbytes(full), **{f"lora_r{r}": nbytes(s) for r, s in adapters.items()}}
    result: dict[str, Any] = {
        "model": bench.model.value,
        "dtype": subject.spec.dtype,
        "num_repeats": bench.num_repeats,
        "torch_threads": bench.num_threads,
        "bucket_mb": bench.bucket_mb,
        "refits": {
            k: {
                "mb": sizes[k] / 2**20,
                "refit_s": median[k],
                "two_copy_floor_s": floor[k],
                "refit_over_floor": median[k] / floor[k],
                "full_over_this": median["full"] / median[k],
                "all_refit_s": times[k],
            }
            for k in times
        },
    }
    if bench.memory:
        path = str(subject.path)
        result["trainer_memory"] = {
            "full": trainer_memory(path, None),
            **{f"lora_r{r}": trainer_memory(path, r) for r in bench.ranks},
        }
    return result


@dataclass
class _RefitBench:
    """What benchmarks.refit.build_subject reads of its own config: the model, on the CPU."""

    model: BenchModel
    backend: Any = "vllm_cpu"

    def __post_init__(self) -> None:
        from rollout.config import Backend

        self.backend = Backend.vllm_cpu


_hydra_main = hydra_app("lora", LoraBenchRoot, run)

if __name__ == "__main__":
    _hydra_main()
