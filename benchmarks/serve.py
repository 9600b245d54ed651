"""A `vllm serve` process for the backend tests and benchmark: started, waited for, asked, stopped.

The server is vLLM's own OpenAI server (`python -m vllm.entrypoints.openai.api_server`) with the RL
and dev routes on (VLLM_SERVER_DEV_MODE=1); the `refit` backend comes from the installed plugin
(pyproject.toml's `vllm.general_plugins` entry point), nothing else of ours runs in it.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import requests


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
        max_model_len: int = 512,
        start_timeout_s: float = 300.0,
        request_timeout_s: float = 60.0,
        log_path: str | Path | None = None,
    ) -> None:
        self.model_path, self.backend = str(model_path), backend
        self.max_model_len = max_model_len
        self.start_timeout_s, self.request_timeout_s = start_timeout_s, request_timeout_s
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.seconds_to_start = 0.0

    def start(self) -> VllmServer:
        args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model"]
        args += [self.model_path, "--port", str(self.port), "--host", "127.0.0.1"]
        args += [
            "--dtype",
            "float32",
            "--max-model-len",
            str(self.max_model_len),
            "--enforce-eager",
        ]
        args += ["--gpu-memory-utilization", "0.1", "--seed", "0"]
        if self.backend is not None:
            args += ["--weight-transfer-config", json.dumps({"backend": self.backend})]
        env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1"}
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
        """SIGKILL the whole process group (a crash, for the tests)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def close(self, timeout_s: float = 60.0) -> None:
        """SIGTERM, then SIGKILL after `timeout_s`; idempotent."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()

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
