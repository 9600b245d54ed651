"""Shared fixtures for the engine tests: ONE vLLM (CPU) engine per session on the tiny model, the
trainer-side Hugging Face copy of the model, and a float64 reference for logprobs."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import TEST_ENGINE_CFG, child_pids, vllm_socket_dir, wait_gone
from vllm_shm import vllm_segments_held_by, vllm_segments_left

from benchmarks.worker_ext import BENCH_WORKER_EXTENSION
from rollout import build_rollout
from rollout.tiny_model import ensure_tiny_model

ENGINE_CFG = TEST_ENGINE_CFG


@pytest.fixture(scope="session")
def tiny_path():
    return ensure_tiny_model()


@pytest.fixture(scope="session")
def hf_model(tiny_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_path, torch_dtype=torch.float64).eval()


@pytest.fixture(scope="session")
def base_state(hf_model):
    return {k: v.detach().to(torch.float32).clone() for k, v in hf_model.state_dict().items()}


@pytest.fixture(scope="session")
def engine(tiny_path):
    """The shared engine. Its workers run the benchmarks' extension (RefitWorkerExtension plus test-only RPCs,
    e.g. the race switch `refit_debug_skip_detach`), so one engine serves every test."""
    before = child_pids()
    ro = build_rollout(ENGINE_CFG, tiny_path, worker_extension=BENCH_WORKER_EXTENSION)
    spawned = child_pids() - before
    segments = vllm_segments_held_by(spawned)
    sockets = vllm_socket_dir(ro)
    yield ro
    endpoint = ro.refitter.endpoint
    ro.close()
    assert not wait_gone(spawned), "vLLM processes survived close()"
    assert not os.path.exists(sockets), f"vLLM's socket files survived close(): {sockets}"
    assert not vllm_segments_left(segments), (
        f"vLLM's shared memory survived close(): {vllm_segments_left(segments)}"
    )
    if endpoint is not None:
        assert not os.path.exists(endpoint.removeprefix("ipc://")), (
            "the transfer socket survived close()"
        )
    # Other jobs on the host may own refit-* segments: check that none stays mapped in this process.
    with open("/proc/self/maps") as maps:
        assert "/dev/shm/refit-" not in maps.read(), "a transfer buffer stayed mapped after close()"


@pytest.fixture
def extra_engine():
    """Start another engine (same settings as the shared one) on a given model directory, optionally with
    another worker extension; at the end of the test it is closed and its processes must be gone."""
    started = []

    def start(model_path, worker_extension=None):
        before = child_pids()
        ro = build_rollout(ENGINE_CFG, model_path, worker_extension=worker_extension)
        pids = child_pids() - before
        started.append((ro, pids, vllm_segments_held_by(pids)))
        return ro

    yield start
    for ro, pids, segments in started:
        ro.close()
        assert not wait_gone(pids), "an extra engine's processes survived close()"
        assert not vllm_segments_left(segments), (
            f"an extra engine's vLLM shared memory survived close(): {vllm_segments_left(segments)}"
        )


@pytest.fixture(scope="module")
def module_rollout():
    """Start a rollout with its own config (a TP=2 engine, an engine group) that lives for one test module;
    at the end it is closed (again: close() is idempotent) and its processes must be gone."""
    started = []

    def start(cfg, model_path):
        before = child_pids()
        ro = build_rollout(
            cfg, model_path, worker_extension=BENCH_WORKER_EXTENSION
        )  # as the shared engine
        pids = child_pids() - before
        started.append((ro, pids, vllm_segments_held_by(pids)))
        return ro

    yield start
    for ro, pids, segments in started:
        ro.close()
        assert not wait_gone(pids), "a module rollout's processes survived close()"
        assert not vllm_segments_left(segments), (
            f"a module rollout's vLLM shared memory survived close(): "
            f"{vllm_segments_left(segments)}"
        )
