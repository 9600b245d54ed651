"""A refit into `vllm serve` through the `refit` backend against our in-process engine's refit.

Run from the repo root (config: benchmarks/conf/serve.yaml; schema: ServeBenchRoot below):
    python -m benchmarks.serve bench.model=qwen2_0_5b rollout.transfer.bucket_mb=256

For one locally built model (the tiny one, or Qwen2.5-0.5B's shapes with random bf16 weights, as in
benchmarks/refit.py) it measures, one engine at a time (medians over bench.num_repeats, after one
warm-up each):
  serve:  `send_weights()` of vLLM's trainer-side API into a `vllm serve` (backend refit) through
          `HTTPVLLMWeightSyncClient`: the HTTP control plane, the transfer, the worker's staged load
          (a copy of every tensor, then one reload), finish and a prefix-cache reset;
  engine: `ro.update_weights(state, v)` of our own engine (build_rollout, vLLM's LLM) on the same
          model: the transfer streamed into one reload, the cache reset.
`VllmServer` is also what tests/vllm_backend starts: vLLM's own OpenAI server with the RL and dev
routes on (VLLM_SERVER_DEV_MODE=1); the backend comes from the installed plugin (pyproject.toml's
`vllm.general_plugins` entry point), nothing else of ours runs in it.

Example:
    with VllmServer(model_path, backend="refit") as server:
        texts = server.complete(["The quick"], max_tokens=8)
        server.weight_version()                   # GET /weight_info
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import requests

from benchmarks import hydra_app, register_schema
from benchmarks.refit import RefitBenchRollout
from rollout.vllm_segments import EngineSegments
from rollout.vllm_sockets import VllmSocketDir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Completion:
    """One greedy completion over the OpenAI API."""

    token_ids: list[int]
    logprobs: list[float]


class VllmServer:
    """One `vllm serve` on the CPU (its own process group), ready once `start` returns."""

    def __init__(
        self,
        model_path: str | Path,
        backend: str | None = "refit",
        dtype: str = "float32",
        max_model_len: int = 512,
        start_timeout_s: float = 300.0,
        request_timeout_s: float = 60.0,
        log_path: str | Path | None = None,
    ) -> None:
        self.model_path, self.backend, self.dtype = str(model_path), backend, dtype
        self.max_model_len = max_model_len
        self.start_timeout_s, self.request_timeout_s = start_timeout_s, request_timeout_s
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.seconds_to_start = 0.0
        self.segments = EngineSegments("vllm serve")
        self.sockets: VllmSocketDir | None = None

    def start(self) -> VllmServer:
        args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model"]
        args += [self.model_path, "--port", str(self.port), "--host", "127.0.0.1"]
        args += [
            "--dtype",
            self.dtype,
            "--max-model-len",
            str(self.max_model_len),
            "--enforce-eager",
        ]
        args += ["--gpu-memory-utilization", "0.1", "--seed", "0"]
        if self.backend is not None:
            args += ["--weight-transfer-config", json.dumps({"backend": self.backend})]
        self.sockets = VllmSocketDir()  # vLLM's IPC socket files, removed by close()
        env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", **self.sockets.env}
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        start = time.perf_counter()
        self.proc = subprocess.Popen(
            args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"vllm serve exited with {self.proc.returncode} while starting (log: "
                    f"{self.log_path or 'not kept: pass log_path'})"
                )
            try:
                if requests.get(f"{self.url}/health", timeout=2).ok:
                    self.seconds_to_start = time.perf_counter() - start
                    # vLLM's own shared memory, which a SIGKILLed server leaves (close removes it)
                    self.segments = EngineSegments("vllm serve", self.pids(), tracked=False)
                    self.segments.record()
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.close()
        raise TimeoutError(f"vllm serve was not ready within {self.start_timeout_s} s")

    def pids(self) -> set[int]:
        """The server's process and all of its children (engine core, worker)."""
        if self.proc is None:
            return set()
        try:
            parent = psutil.Process(self.proc.pid)
            return {parent.pid} | {p.pid for p in parent.children(recursive=True)}
        except psutil.NoSuchProcess:
            return set()

    def kill(self) -> None:
        """SIGKILL the whole process group (a crash, for the tests); vLLM's segments stay until
        close()."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def close(self, timeout_s: float = 60.0) -> None:
        """SIGTERM, then SIGKILL after `timeout_s`, then remove what vLLM's exited processes left
        in /dev/shm; idempotent."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        self.segments.release()
        if self.sockets is not None:
            self.sockets.remove()

    def __enter__(self) -> VllmServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def post(self, route: str, body: dict[str, Any] | None = None) -> Any:
        r = requests.post(f"{self.url}/{route}", json=body, timeout=self.request_timeout_s)
        r.raise_for_status()
        return r.json()

    def weight_version(self) -> str | None:
        r = requests.get(f"{self.url}/weight_info", timeout=self.request_timeout_s)
        r.raise_for_status()
        return r.json()["weight_version"]

    def complete(self, prompts: list[str], max_tokens: int = 12) -> list[Completion]:
        """Greedy completions with the chosen tokens' log-probs, one per prompt."""
        body = {"model": self.model_path, "prompt": prompts, "max_tokens": max_tokens}
        body |= {"temperature": 0.0, "logprobs": 0, "return_token_ids": True}
        choices = sorted(self.post("v1/completions", body)["choices"], key=lambda c: c["index"])
        return [Completion(c["token_ids"], c["logprobs"]["token_logprobs"]) for c in choices]


@dataclass
class ServeBenchConfig:
    """The `bench` node of `python -m benchmarks.serve` (vLLM on the CPU)."""

    model: str = "tiny"  # benchmarks.refit.BenchModel: tiny | qwen2_0_5b
    num_repeats: int = 3
    num_threads: int = 1  # torch threads in this (trainer) process
    max_model_len: int = 512
    out: str = "serve.json"  # in Hydra's output directory

    def __post_init__(self) -> None:
        if self.model not in ("tiny", "qwen2_0_5b"):
            raise ValueError(f"bench.model={self.model!r}: tiny or qwen2_0_5b (vLLM on the CPU)")
        if self.num_repeats < 1:
            raise ValueError(f"bench.num_repeats must be >= 1, got {self.num_repeats!r}")


@dataclass
class ServeBenchRoot:
    rollout: RefitBenchRollout = field(default_factory=RefitBenchRollout)  # transfer, timeouts
    bench: ServeBenchConfig = field(default_factory=ServeBenchConfig)


def _state_source(state: dict[str, Any]) -> Any:
    """vLLM's WeightSource over a plain state dict (the benchmark has no nn.Module)."""
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

    class StateSource(WeightSource):
        def metadata(self) -> list:
            return [ParamMeta(n, t.dtype, tuple(t.shape)) for n, t in state.items()]

        def __iter__(self):
            return iter(state.items())

    return StateSource()


def _timed(fn: Any, repeats: int) -> list[float]:
    fn(0)  # warm-up: the first connection, buffers, the load path's decisions
    times = []
    for k in range(1, repeats + 1):
        start = time.perf_counter()
        fn(k)
        times.append(time.perf_counter() - start)
    return times


def run(root: ServeBenchRoot) -> dict:
    """Serve first (then stopped), then our engine: returns the result dict (also the JSON)."""
    import statistics

    import torch
    from vllm.distributed.weight_transfer.clients import HTTPVLLMWeightSyncClient
    from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

    from benchmarks.refit import RefitBenchConfig, RefitBenchRoot, build_subject, rollout_config
    from rollout import RefitTrainerInitInfo, build_rollout

    bench, r = root.bench, root.rollout
    torch.set_num_threads(bench.num_threads)
    refit_bench = RefitBenchConfig(model=bench.model, max_model_len=bench.max_model_len)
    subject = build_subject(refit_bench, torch.device("cpu"))
    load = [os.getloadavg()[0]]
    info = RefitTrainerInitInfo(transfer=r.transfer, timeouts=r.timeouts, rank=0)
    with VllmServer(subject.path, "refit", subject.spec.dtype, bench.max_model_len) as server:
        client = HTTPVLLMWeightSyncClient(server.url, timeout=r.timeouts.worker_reply_s)
        source = _state_source(subject.state)
        engine = WeightTransferTrainerFactory.trainer_init(info, client=client, source=source)
        try:
            serve = _timed(lambda k: engine.send_weights(k + 1), bench.num_repeats)
            version = server.weight_version()
        finally:
            engine.shutdown()
    load.append(os.getloadavg()[0])
    cfg = rollout_config(RefitBenchRoot(rollout=r, bench=refit_bench), subject)
    with build_rollout(cfg, subject.path) as ro:
        own = _timed(lambda k: ro.update_weights(subject.state.items(), k + 1), bench.num_repeats)
    load.append(os.getloadavg()[0])
    gb = subject.num_bytes / 1e9
    serve_s, own_s = statistics.median(serve), statistics.median(own)
    return {
        "model": bench.model,
        "gb": round(gb, 3),
        "bucket_mb": r.transfer.bucket_mb,
        "transport": r.transfer.transport.value,
        "serve_refit_s": round(serve_s, 3),
        "engine_refit_s": round(own_s, 3),
        "serve_over_engine": round(serve_s / own_s, 2),
        "all_serve_s": [round(t, 3) for t in serve],
        "all_engine_s": [round(t, 3) for t in own],
        "weight_info_after": version,
        "server_start_s": round(server.seconds_to_start, 1),
        "torch_threads": bench.num_threads,
        "load_average_1m": load,  # before, between, after: other jobs on the machine
        "cpus": os.cpu_count(),
    }


def _register() -> None:
    register_schema("serve", ServeBenchRoot)


_hydra_main = hydra_app("serve", ServeBenchRoot, run)

if __name__ == "__main__":
    _hydra_main()
