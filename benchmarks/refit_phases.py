"""Where a colocated refit's time goes, sync engine against async engine on the same model, one run.

    python -m benchmarks.refit_phases [--backend vllm_gpu] [--refits 6] [--utilization 0.5] [--out
    phases.json]

Each engine is built as training builds it (colocate, `rollout.backend.gpu_memory_utilization`),
then each refit goes as in a training step: (async: a batch submitted and in flight) sleep ->
update_weights. The steps inside update_weights are timed by wrapping the engine's own calls: pause,
wake of the weights, the transfer + load (`refit`), the version tag, wake of the KV cache, the cache
reset, resume. Prints the median of each phase over the refits after the first, and writes them with
every refit's figures as JSON.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import statistics
import time
from collections import defaultdict

import torch


def _timed(fn, name: str, log: dict):
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return await fn(*args, **kwargs)
            finally:
                log[_label(name, args)].append(time.perf_counter() - start)
    else:

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                log[_label(name, args)].append(time.perf_counter() - start)

    return wrapper


def _label(name: str, args: tuple) -> str:
    if name == "wake_up" and args:
        return f"wake_up({','.join(args[0] or ['all'])})"
    return name


def instrument(ro, log: dict) -> None:
    """Wrap, on this engine instance only, the calls a refit makes."""
    engine = getattr(ro, "engine", None) or ro.llm
    for name in (
        "wake_up",
        "reset_prefix_cache",
        "reset_mm_cache",
        "reset_encoder_cache",
        "resume_generation",
        "pause_generation",
        "update_weight_version",
        "collective_rpc",
    ):
        if hasattr(engine, name):
            setattr(engine, name, _timed(getattr(engine, name), name, log))
    # the refit's three steps as the Refitter calls them on its target (rollout.refit.RefitTarget), and
    # the coroutines the async engine runs inside them
    for name in (
        "refit_prepare",
        "refit_rpc",
        "refit_finish",
        "_pause",
        "_after_refit",
        "_reset_caches_async",
    ):
        if hasattr(ro, name):
            setattr(ro, name, _timed(getattr(ro, name), name, log))


def run_engine(
    kind: str, model_path, state: dict, refits: int, backend: str, utilization: float
) -> dict:
    from rollout import BackendConfig, Mode, RolloutConfig, build_rollout
    from rollout.transfer import TransferConfig

    cfg = RolloutConfig(
        backend=BackendConfig(
            name=backend,
            dtype="bfloat16",
            gpu_memory_utilization=utilization,
            max_model_len=512,
            max_num_seqs=64,
        ),
        mode=Mode.colocate,
        transfer=TransferConfig(transport="auto", bucket_mb=64, timeout_s=60.0),
        engine=kind,
        generate_timeout_s=300.0,
    )
    rows = []
    with build_rollout(cfg, model_path) as ro:
        log: dict = defaultdict(list)
        instrument(ro, log)
        for version in range(1, refits + 1):
            weights = {
                k: t * (1 + 0.01 * (version % 2)) for k, t in state.items()
            }  # two alternating versions
            handle = (
                ro.submit(["12+7="] * 16, n=4, max_tokens=128, seed=version)
                if kind == "async"
                else None
            )
            start = time.perf_counter()
            ro.sleep()
            sleep_s = time.perf_counter() - start
            log.clear()
            start = time.perf_counter()
            stats = ro.update_weights(weights.items(), version=version)
            wall = time.perf_counter() - start
            rows.append(
                {
                    "version": version,
                    "sleep_s": sleep_s,
                    "update_weights_s": wall,
                    "stats_seconds": stats.seconds,
                    "send_s": stats.send_s,
                    "load_s": stats.load_s,
                    "phases": {k: sum(v) for k, v in log.items()},
                }
            )
            if handle is not None:
                handle.result()
            else:
                ro.generate(["12+7="] * 16, n=4, max_tokens=128, seed=version)
    timed = rows[1:] or rows
    keys = sorted({k for r in timed for k in r["phases"]})
    return {
        "engine": kind,
        "median_update_weights_s": statistics.median(r["update_weights_s"] for r in timed),
        "median_sleep_s": statistics.median(r["sleep_s"] for r in timed),
        "median_phases_s": {
            k: statistics.median(r["phases"].get(k, 0.0) for r in timed) for k in keys
        },
        "refits": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="vllm_gpu")
    parser.add_argument("--refits", type=int, default=6)
    parser.add_argument("--utilization", type=float, default=0.5)
    parser.add_argument("--out", default="phases.json")
    args = parser.parse_args()
    from safetensors.torch import load_file

    from rollout.tiny_model import TinyModelSpec, ensure_tiny_model

    path = ensure_tiny_model(TinyModelSpec(dtype="bfloat16"))
    state = load_file(
        path / "model.safetensors", device="cuda" if args.backend == "vllm_gpu" else "cpu"
    )
    result = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "utilization": args.utilization,
        "engines": [
            run_engine(k, path, state, args.refits, args.backend, args.utilization)
            for k in ("sync", "async")
        ],
    }
    sync, asy = (e["median_update_weights_s"] for e in result["engines"])
    result["async_over_sync"] = asy / sync
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    for e in result["engines"]:
        phases = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in e["median_phases_s"].items())
        print(
            f"{e['engine']}: update_weights {e['median_update_weights_s'] * 1e3:.1f} ms "
            f"(sleep before it "
            f"{e['median_sleep_s'] * 1e3:.1f} ms); phases ms: {phases}"
        )
    print(f"async / sync: {result['async_over_sync']:.2f}x")


if __name__ == "__main__":
    main()
