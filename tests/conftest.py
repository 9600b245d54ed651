"""Test markers follow the hardware: `gpu` tests skip themselves where CUDA is absent."""

from __future__ import annotations

import pytest

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
    import psutil

    from rollout import BackendConfig, RolloutConfig, build_rollout
    from rollout.tiny_model import ensure_tiny_model
    from rollout.transfer import TransferConfig

    cfg = RolloutConfig(
        backend=BackendConfig(dtype="float32", max_model_len=512, max_num_seqs=32),
        transfer=TransferConfig(bucket_mb=1, timeout_s=30.0),
        engine="async",
        generate_timeout_s=120.0,
    )
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    ro = build_rollout(cfg, ensure_tiny_model())
    spawned = [p for p in me.children(recursive=True)  # Python's resource tracker lives until exit
               if p.pid not in before and not any("resource_tracker" in part for part in p.cmdline())]
    segments = vllm_segments_held_by([p.pid for p in spawned])
    yield ro
    ro.close()
    _, alive = psutil.wait_procs(spawned, timeout=30)
    assert not alive, f"async engine processes survived close(): {alive}"
    assert not vllm_segments_left(segments), f"the async engine's vLLM shared memory survived close(): " \
                                             f"{vllm_segments_left(segments)}"
