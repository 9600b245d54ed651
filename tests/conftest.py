"""Test markers follow the hardware: `gpu` tests skip themselves where CUDA is absent. vLLM's socket files go
to a directory of the session (pytest_configure)."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
from helpers import ASYNC_TEST_ENGINE_CFG, child_pids, vllm_socket_dir, wait_gone
from vllm_shm import vllm_segments_held_by, vllm_segments_left

_SOCKET_DIR = pytest.StashKey[str]()


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_configure(config: pytest.Config) -> None:
    """vLLM's IPC socket files of engines the tests build with vLLM's own API (LLM(...) directly,
    `vllm serve` in a subprocess) go to a directory of the session, removed at its end; the library's
    engines make and remove their own directory inside it (rollout/vllm_sockets.py)."""
    if "VLLM_RPC_BASE_PATH" not in os.environ:
        os.environ["VLLM_RPC_BASE_PATH"] = tempfile.mkdtemp(prefix="refit-tests-ipc-")
        config.stash[_SOCKET_DIR] = os.environ["VLLM_RPC_BASE_PATH"]


def pytest_unconfigure(config: pytest.Config) -> None:
    path = config.stash.get(_SOCKET_DIR, None)
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)
        os.environ.pop("VLLM_RPC_BASE_PATH", None)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def async_engine():
    """ONE async engine (vLLM's AsyncLLM on the CPU, tiny model) for every test of the session: fp32,
    1 MB buckets so a refit spans several; its pause_mode is changed per test by replacing `.cfg`."""
    from rollout import build_rollout
    from rollout.tiny_model import ensure_tiny_model

    before = child_pids()
    ro = build_rollout(ASYNC_TEST_ENGINE_CFG, ensure_tiny_model())
    spawned = child_pids() - before
    segments = vllm_segments_held_by(spawned)
    sockets = vllm_socket_dir(ro)
    yield ro
    ro.close()
    alive = wait_gone(spawned)
    assert not alive, f"async engine processes survived close(): {alive}"
    assert not os.path.exists(sockets), f"vLLM's socket files survived close(): {sockets}"
    assert not vllm_segments_left(segments), (
        f"the async engine's vLLM shared memory survived close(): {vllm_segments_left(segments)}"
    )
