"""Test markers follow the hardware: `gpu` tests skip themselves where CUDA is absent."""

from __future__ import annotations

import pytest
from helpers import ASYNC_TEST_ENGINE_CFG, child_pids, wait_gone
from vllm_shm import vllm_segments_held_by, vllm_segments_left


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


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
    yield ro
    ro.close()
    alive = wait_gone(spawned)
    assert not alive, f"async engine processes survived close(): {alive}"
    assert not vllm_segments_left(segments), (
        f"the async engine's vLLM shared memory survived close(): {vllm_segments_left(segments)}"
    )
