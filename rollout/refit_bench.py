"""End-to-end refit time into a live vLLM engine, against the two-copy floor and the save-to-disk-and-reload path.

Run:
    python -m rollout.refit_bench --model tiny
    python -m rollout.refit_bench --model qwen2_0_5b --bucket-mb 256 --sync fenced --repeats 5
    # GPU (vLLM's CUDA build, bf16, transport auto -> cuda_ipc, trainer-side state on cuda:0):
    python -m rollout.refit_bench --backend vllm_gpu --model qwen2_0_5b --bucket-mb 1024 --repeats 5
    python -m rollout.refit_bench --backend vllm_gpu --model qwen2_7b --bucket-mb 1024 --repeats 3 --no-disk

For one locally built model (the embedded tiny model, a random Qwen2-0.5B-shaped bf16 model, or on a GPU
a Qwen2.5-7B-shaped one: 15.2 GB bf16, built config-only and started with load_format="dummy", the
trainer-side state made random directly on the GPU) and one engine, it measures (medians over
--repeats, after one warm-up of each):
  floor:  the two unavoidable copies in this process, tensor by tensor with torch copy_ (pack each
          bucket of the same layout and size, then copy its views into destination tensors) — the
          same definition as `python -m rollout.bench`. On a GPU everything is on cuda:0, the timing
          is fenced by torch.cuda.synchronize, and tensors of one shape share one destination (a
          second 15 GB copy does not fit beside the engine; the write bandwidth is the same);
  refit:  `ro.update_weights(state, version)`: transfer + in-place reload + cache reset, end to end;
  disk:   what users otherwise do without restarting: save the state as safetensors, then reload it
          in the live engine (`reload_weights(weights_path=...)` on the worker) + prefix-cache reset
          (skipped with --no-disk, always for 7B);
  reload: vLLM's in-place reload alone, from tensors already in the worker's (device) memory (timed
          inside the worker): what a refit costs even with a free transfer;
  start:  a fresh engine (once; the restart alternative).
They are interleaved per repeat (floor, refit, disk, reload, floor, ...) so that load from other jobs
on a shared machine hits them alike.
It also checks that the refit and the disk reload give the same greedy tokens. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch


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
    specs = [(name, list(t.shape), str(dtype).removeprefix("torch.")) for name, t in model.state_dict().items()]
    if getattr(config, "tie_word_embeddings", False):
        specs = [s for s in specs if s[0] != "lm_head.weight"]
    return specs


def random_state(specs: list[tuple[str, list[int], str]], device: torch.device, seed: int = 0) -> dict:
    """The same tensors, by the same rule and seed, as the worker's `refit_bench_reload_from_memory(specs=...)`."""
    from rollout.worker_extension import random_weight

    gen = torch.Generator(device=device).manual_seed(seed)
    return {name: random_weight(name, shape, getattr(torch, dtype), device, gen) for name, shape, dtype in specs}


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["vllm_cpu", "vllm_gpu"], default="vllm_cpu")
    parser.add_argument("--model", choices=["tiny", "qwen2_0_5b", "qwen2_7b"], default="tiny")
    parser.add_argument("--bucket-mb", type=int, default=256)
    parser.add_argument("--sync", default="fenced", choices=["fenced", "double_buffer", "clone"])
    parser.add_argument("--transport", default="auto", help="auto: shm on the CPU, cuda_ipc on a GPU")
    parser.add_argument("--mode", default="colocate", choices=["colocate", "standalone"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in this (trainer) process")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument(
        "--gpu-memory-utilization", type=float, default=None,
        help="engine's share of device memory (GPU default 0.4: 7B = 15.2 GB trainer state + 15.2 GB engine "
        "weights + KV cache + the reload measurement's 15.2 GB on an 80 GB card); CPU: BackendConfig's default",
    )
    parser.add_argument("--no-disk", action="store_true", help="skip the save-to-disk-and-reload path (always for 7B)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()

    from safetensors.torch import load_file, save_file

    from rollout import BackendConfig, RolloutConfig, build_rollout
    from rollout.tiny_model import TinyModelSpec, ensure_tiny_model
    from rollout.transfer import TransferConfig

    torch.set_num_threads(args.threads)
    gpu = args.backend == "vllm_gpu"
    if args.model == "qwen2_7b" and not gpu:
        parser.error("--model qwen2_7b needs --backend vllm_gpu (15 GB of bf16 weights on each side)")
    if gpu:
        torch.cuda.set_device(0)
    device = torch.device("cuda:0" if gpu else "cpu")
    # FlashAttention 3 (vLLM's GPU attention on Hopper) has no fp32 path: the tiny model runs in bf16 there.
    spec = {
        "tiny": TinyModelSpec(dtype="bfloat16") if gpu else TinyModelSpec(),
        "qwen2_0_5b": TinyModelSpec.qwen2_0_5b(),
        "qwen2_7b": TinyModelSpec.qwen2_7b(),
    }[args.model]
    dummy = args.model == "qwen2_7b"  # random engine weights; the real (random) ones come by refit
    no_disk = args.no_disk or dummy
    path = ensure_tiny_model(spec, with_weights=not dummy)
    if dummy:
        specs = checkpoint_specs(str(path))
        state = random_state(specs, device)
        weights_file = None
    else:
        specs = None
        weights_file = os.path.join(path, "model.safetensors")
        state = {k: v.to(device) for k, v in load_file(weights_file).items()}
    num_bytes = sum(t.numel() * t.element_size() for t in state.values())
    backend = dict(name=args.backend, dtype=spec.dtype, max_model_len=args.max_model_len, max_num_seqs=16,
                   load_format="dummy" if dummy else "auto")
    utilization = args.gpu_memory_utilization or (0.4 if gpu else None)
    if utilization is not None:
        backend["gpu_memory_utilization"] = utilization
    cfg = RolloutConfig(
        backend=BackendConfig(**backend),
        mode=args.mode,
        transfer=TransferConfig(transport=args.transport, bucket_mb=args.bucket_mb, sync=args.sync, timeout_s=300.0),
    )
    bucket_bytes = cfg.transfer.bucket_bytes

    dests = shared_dests(state) if gpu else {k: torch.empty_like(v).fill_(0) for k, v in state.items()}
    bucket = torch.zeros(bucket_bytes, dtype=torch.uint8, device=device)

    start = time.perf_counter()
    ro = build_rollout(cfg, path)
    start_s = time.perf_counter() - start
    prompts = ["The quick brown fox", "12+7="]
    reload_error: list[str] = []
    try:
        worker_info = ro.llm.collective_rpc("refit_worker_info")[0]
        version = iter(range(1, 10_000))
        stats = []
        with tempfile.TemporaryDirectory(prefix="refit-bench-") as tmp:

            def disk_reload() -> None:
                save_file(state, os.path.join(tmp, "model.safetensors"))
                ro.llm.collective_rpc("refit_bench_reload_from_disk", args=(tmp,))
                ro.llm.reset_prefix_cache()

            reload_only: list[float] = []

            def vllm_reload() -> None:
                if reload_error:
                    return
                try:
                    kwargs = {"safetensors_path": weights_file} if weights_file else {"specs": specs}
                    reload_only.append(ro.llm.collective_rpc("refit_bench_reload_from_memory", kwargs=kwargs)[0])
                except Exception as exc:  # e.g. no room for a second copy in the worker: the rest still counts
                    reload_error.append(f"{type(exc).__name__}: {exc}")

            fns = {
                "floor": lambda: floor_once(state, dests, bucket, bucket_bytes),
                "refit": lambda: stats.append(ro.update_weights(state.items(), version=next(version))),
                "disk": disk_reload,
                "reload": vllm_reload,
            }
            if no_disk:
                del fns["disk"]
            times = interleaved(fns, args.repeats)
            # Same greedy tokens through both paths, for weights that differ from the first ones.
            greedy = lambda: [s.token_ids for s in ro.generate(prompts, max_tokens=16, temperature=0.0)]  # noqa: E731
            ro.update_weights(state.items(), version=next(version))
            original = greedy()
            after_disk = None
            if no_disk:  # no room for a second copy of a 7B state: scale in place
                scaled = state
                for v in scaled.values():
                    v.mul_(1.25)
            else:
                scaled = {k: v * 1.25 for k, v in state.items()}
                save_file(scaled, os.path.join(tmp, "model.safetensors"))
                ro.llm.collective_rpc("refit_bench_reload_from_disk", args=(tmp,))
                ro.llm.reset_prefix_cache()
                after_disk = greedy()
                ro.update_weights(state.items(), version=next(version))
                assert greedy() == original
        ro.update_weights(scaled.items(), version=next(version))
        after_refit = greedy()
    finally:
        ro.close()
    floor, refit = times["floor"], times["refit"]
    disk = times.get("disk")

    timed_stats = stats[1 : args.repeats + 1]
    last = timed_stats[-1]
    med = statistics.median
    reload_s = med(reload_only[1:]) if len(reload_only) > 1 else None
    result = {
        "backend": args.backend,
        "device": torch.cuda.get_device_name(device) if gpu else "cpu",
        "vllm_version": ro.vllm_version,
        "model": args.model,
        "dtype": spec.dtype,
        "load_format": cfg.backend.load_format,
        "mode": cfg.mode.value,
        "transport": ro.transfer.transport.value,
        "gpu_memory_utilization": cfg.backend.gpu_memory_utilization,
        "num_bytes": num_bytes,
        "num_tensors": len(state),
        "bucket_mb": args.bucket_mb,
        "sync": args.sync,
        "trainer_torch_threads": args.threads,
        "worker_torch_threads": worker_info["torch_threads"],
        "worker_device": worker_info["device"],
        "floor_s": med(floor),
        "refit_s": med(refit),
        "refit_first_s": stats[0].seconds,
        "refit_send_s": med(s.send_s for s in timed_stats),
        "refit_worker_load_s": med(s.load_s for s in timed_stats),
        "num_buckets": last.num_buckets,
        "detached_bytes": last.detached_bytes,
        "disk_reload_s": med(disk) if disk else None,
        "vllm_reload_from_memory_s": reload_s,
        "vllm_reload_error": reload_error[0] if reload_error else None,
        "engine_start_s": start_s,
        "floor_gbps": num_bytes / med(floor) / 1e9,
        "refit_gbps": num_bytes / med(refit) / 1e9,
        "refit_over_floor": med(refit) / med(floor),
        "disk_over_refit": med(disk) / med(refit) if disk else None,
        "refit_over_vllm_reload": med(refit) / reload_s if reload_s else None,
        "same_greedy_tokens_refit_vs_disk": after_refit == after_disk if after_disk is not None else None,
        "scaled_weights_changed_tokens": after_refit != original,
        "all_floor_s": floor,
        "all_refit_s": refit,
        "all_disk_s": disk,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
