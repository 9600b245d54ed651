"""End-to-end refit time into a live vLLM engine, against the two-copy floor and the save-to-disk-and-reload path.

Run:
    python -m rollout.refit_bench --model tiny
    python -m rollout.refit_bench --model qwen2_0_5b --bucket-mb 256 --sync fenced --repeats 5

For one locally built model (the embedded tiny fp32 model, or a random Qwen2-0.5B-shaped bf16 model)
and one engine, it measures (medians over --repeats, after one warm-up of each):
  floor:  the two unavoidable copies in this process, tensor by tensor with torch copy_ (pack each
          bucket of the same layout and size, then copy its views into destination tensors) — the
          same definition as `python -m rollout.bench`;
  refit:  `ro.update_weights(state, version)`: transfer + in-place reload + cache reset, end to end;
  disk:   what users otherwise do without restarting: save the state as safetensors, then reload it
          in the live engine (`reload_weights(weights_path=...)` on the worker) + prefix-cache reset;
  reload: vLLM's in-place reload alone, from tensors already in the worker's memory (timed inside the
          worker): what a refit costs even with a free transfer;
  start:  a fresh engine from disk (once; the restart alternative).
The three are interleaved per repeat (floor, refit, disk, floor, ...) so that load from other jobs on
a shared machine hits them alike.
It also checks that the refit and the disk reload give the same greedy tokens. Prints JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time

import torch


def floor_once(state: dict, dests: dict, bucket: torch.Tensor, bucket_bytes: int) -> float:
    from rollout.transfer import layout

    start = time.perf_counter()
    for planned in layout.plan_buckets(state.items(), bucket_bytes):
        layout.pack(planned, bucket, bucket_bytes)
        for p in planned.placements:
            e = p.entry
            region = bucket[e.offset : e.offset + e.nbytes]
            if e.num_chunks == 1:
                dests[e.name].copy_(layout.typed_view(region, dests[e.name].dtype, e.shape))
            else:
                first = e.chunk_index * bucket_bytes
                dests[e.name].view(-1).view(torch.uint8)[first : first + e.nbytes].copy_(region)
    return time.perf_counter() - start


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
    parser.add_argument("--model", choices=["tiny", "qwen2_0_5b"], default="tiny")
    parser.add_argument("--bucket-mb", type=int, default=256)
    parser.add_argument("--sync", default="fenced", choices=["fenced", "double_buffer", "clone"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in this (trainer) process")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()

    from safetensors.torch import load_file, save_file

    from rollout import BackendConfig, RolloutConfig, build_rollout
    from rollout.tiny_model import TinyModelSpec, ensure_tiny_model
    from rollout.transfer import TransferConfig

    torch.set_num_threads(args.threads)
    spec = TinyModelSpec() if args.model == "tiny" else TinyModelSpec.qwen2_0_5b()
    path = ensure_tiny_model(spec)
    state = load_file(os.path.join(path, "model.safetensors"))
    num_bytes = sum(t.numel() * t.element_size() for t in state.values())
    cfg = RolloutConfig(
        backend=BackendConfig(dtype=spec.dtype, max_model_len=args.max_model_len, max_num_seqs=16),
        transfer=TransferConfig(bucket_mb=args.bucket_mb, sync=args.sync, timeout_s=300.0),
    )
    bucket_bytes = cfg.transfer.bucket_bytes

    dests = {k: torch.empty_like(v).fill_(0) for k, v in state.items()}
    bucket = torch.zeros(bucket_bytes, dtype=torch.uint8)

    start = time.perf_counter()
    ro = build_rollout(cfg, path)
    start_s = time.perf_counter() - start
    prompts = ["The quick brown fox", "12+7="]
    try:
        worker_threads = ro.llm.collective_rpc("refit_worker_info")[0]["torch_threads"]
        version = iter(range(1, 10_000))
        stats = []
        with tempfile.TemporaryDirectory(prefix="refit-bench-") as tmp:

            def disk_reload() -> None:
                save_file(state, os.path.join(tmp, "model.safetensors"))
                ro.llm.collective_rpc("reload_weights", kwargs={"weights_path": tmp, "is_checkpoint_format": True})
                ro.llm.reset_prefix_cache()

            reload_only: list[float] = []

            def vllm_reload() -> None:
                file = os.path.join(path, "model.safetensors")
                reload_only.append(ro.llm.collective_rpc("refit_bench_reload_from_memory", args=(file,))[0])

            times = interleaved(
                {
                    "floor": lambda: floor_once(state, dests, bucket, bucket_bytes),
                    "refit": lambda: stats.append(ro.update_weights(state.items(), version=next(version))),
                    "disk": disk_reload,
                    "reload": vllm_reload,
                },
                args.repeats,
            )
            # Same greedy tokens through both paths, for weights that differ from those on disk.
            scaled = {k: v * 1.25 for k, v in state.items()}
            greedy = lambda: [s.token_ids for s in ro.generate(prompts, max_tokens=16, temperature=0.0)]  # noqa: E731
            original = greedy()
            save_file(scaled, os.path.join(tmp, "model.safetensors"))
            ro.llm.collective_rpc("reload_weights", kwargs={"weights_path": tmp, "is_checkpoint_format": True})
            ro.llm.reset_prefix_cache()
            after_disk = greedy()
        ro.update_weights(state.items(), version=next(version))
        assert greedy() == original
        ro.update_weights(scaled.items(), version=next(version))
        after_refit = greedy()
    finally:
        ro.close()
    floor, refit, disk = times["floor"], times["refit"], times["disk"]

    timed_stats = stats[1 : args.repeats + 1]
    last = timed_stats[-1]
    med = statistics.median
    result = {
        "model": args.model,
        "dtype": spec.dtype,
        "num_bytes": num_bytes,
        "num_tensors": len(state),
        "bucket_mb": args.bucket_mb,
        "sync": args.sync,
        "trainer_torch_threads": args.threads,
        "worker_torch_threads": worker_threads,
        "floor_s": med(floor),
        "refit_s": med(refit),
        "refit_first_s": stats[0].seconds,
        "refit_send_s": med(s.send_s for s in timed_stats),
        "refit_worker_load_s": med(s.load_s for s in timed_stats),
        "num_buckets": last.num_buckets,
        "detached_bytes": last.detached_bytes,
        "disk_reload_s": med(disk),
        "vllm_reload_from_memory_s": med(reload_only[1:]),
        "engine_start_s": start_s,
        "refit_over_floor": med(refit) / med(floor),
        "disk_over_refit": med(disk) / med(refit),
        "refit_over_vllm_reload": med(refit) / med(reload_only[1:]),
        "refit_gbps": num_bytes / med(refit) / 1e9,
        "same_greedy_tokens_refit_vs_disk": after_refit == after_disk,
        "scaled_weights_changed_tokens": after_refit != original,
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
