"""Generation tokens/s on vllm_gpu with CUDA graphs (`enforce_eager=false`) against eager, same
model, one run.

    python -m benchmarks.generation [--model qwen2_0_5b] [--batches 1,32] [--max-tokens 256] [--out
    gen.json]

For each setting one engine (sync, bf16, random weights of the model's shapes), one warm-up batch,
then three timed batches of each size: every prompt samples `--max-tokens` tokens at temperature 1
(random weights almost never sample EOS). Reports generated tokens / wall seconds, the median of the
three, and the engine start time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def measure(path, enforce_eager: bool, batches: list[int], max_tokens: int) -> dict:
    from rollout import BackendConfig, Mode, RolloutConfig, build_rollout

    cfg = RolloutConfig(
        backend=BackendConfig(
            name="vllm_gpu",
            dtype="bfloat16",
            gpu_memory_utilization=0.3,
            max_model_len=1024,
            max_num_seqs=max(batches),
            enforce_eager=enforce_eager,
        ),
        mode=Mode.standalone,
    )
    start = time.perf_counter()
    with build_rollout(cfg, path) as ro:
        start_s = time.perf_counter() - start
        ro.generate(["warm up"] * max(batches), max_tokens=max_tokens, seed=0)
        rates = {}
        for batch in batches:
            runs = []
            for seed in range(3):
                t = time.perf_counter()
                samples = ro.generate(
                    [f"{i}+{seed}=" for i in range(batch)], max_tokens=max_tokens, seed=seed
                )
                runs.append(sum(len(s.token_ids) for s in samples) / (time.perf_counter() - t))
            rates[str(batch)] = statistics.median(runs)
    return {"enforce_eager": enforce_eager, "engine_start_s": start_s, "tokens_per_s": rates}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2_0_5b", choices=["tiny", "qwen2_0_5b"])
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--out", default="generation.json")
    args = parser.parse_args()
    from rollout.tiny_model import TinyModelSpec, ensure_tiny_model

    spec = (
        TinyModelSpec.qwen2_0_5b()
        if args.model == "qwen2_0_5b"
        else TinyModelSpec(dtype="bfloat16")
    )
    path = ensure_tiny_model(spec)
    batches = [int(b) for b in args.batches.split(",")]
    runs = [measure(path, eager, batches, args.max_tokens) for eager in (True, False)]
    result = {
        "device": torch.cuda.get_device_name(0),
        "model": args.model,
        "max_tokens": args.max_tokens,
        "runs": runs,
        "graphs_over_eager": {
            b: runs[1]["tokens_per_s"][b] / runs[0]["tokens_per_s"][b]
            for b in runs[0]["tokens_per_s"]
        },
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    for r in runs:
        rates = ", ".join(f"batch {b}: {v:.0f} tok/s" for b, v in r["tokens_per_s"].items())
        name = "eager" if r["enforce_eager"] else "graphs"
        print(f"{name}: start {r['engine_start_s']:.1f} s; {rates}")
    print("graphs / eager:", {b: round(v, 2) for b, v in result["graphs_over_eager"].items()})


if __name__ == "__main__":
    main()
