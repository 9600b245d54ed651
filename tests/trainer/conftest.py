"""Trainer tests: one vLLM (CPU) engine on the tiny model shared by every run in this folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import child_pids
from trainer_helpers import LORA_OVERRIDES, compose_typed
from vllm_shm import vllm_segments_held_by, vllm_segments_left

from rollout.tiny_model import ensure_tiny_model


@pytest.fixture(scope="session")
def tiny_path() -> Path:
    return ensure_tiny_model()


def shared_engine(overrides: list[str], model_path: Path, what: str):
    """A session's engine with the engine settings of a run composed with `overrides`; at the end it is
    closed and vLLM's shared memory it made must be gone."""
    from rollout import build_rollout

    cfg = compose_typed(overrides).rollout
    before = child_pids()
    ro = build_rollout(cfg, model_path)
    segments = vllm_segments_held_by(child_pids() - before)
    yield ro
    ro.close()
    assert not vllm_segments_left(segments), (
        f"the {what}'s vLLM shared memory survived close(): {vllm_segments_left(segments)}"
    )


@pytest.fixture(scope="session")
def trainer_engine(tiny_path):
    yield from shared_engine([], tiny_path, "trainer engine")  # the default run's engine settings


@pytest.fixture(autouse=True)
def _shared_engine_awake(request):
    """Each test that uses the shared engine gets it awake: a run that failed mid-step (the canary's strict
    run raises after its generate put the engine to sleep) must not fail the next test's generate()."""
    for name in ("trainer_engine", "lora_engine"):
        if name in request.fixturenames:
            request.getfixturevalue(name).wake_up()
    yield


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for every Ray test of the session; runs join it through `ray.address=auto`."""
    import ray

    from trainers.distributed.cluster import RayConfig

    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=256 << 20)
    yield RayConfig(address="auto", cpus_per_worker=0.5, timeout_s=120.0)
    ray.shutdown()


@pytest.fixture(scope="session")
def lora_engine(tiny_path):
    """ONE engine serving LoRA adapters on the tiny base (the default run's settings with
    model.lora.rank=8) for the LoRA runs; they warm-start nothing, so that its base is theirs."""
    yield from shared_engine(LORA_OVERRIDES, tiny_path, "LoRA engine")
