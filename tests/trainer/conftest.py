"""Trainer tests: one vLLM (CPU) engine on the tiny model shared by every run in this folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from trainer_helpers import compose_typed

from rollout.tiny_model import ensure_tiny_model


@pytest.fixture(scope="session")
def tiny_path() -> Path:
    return ensure_tiny_model()


@pytest.fixture(scope="session")
def trainer_engine(tiny_path):
    from rollout import build_rollout

    cfg = compose_typed().rollout  # the default run's engine settings
    ro = build_rollout(cfg, tiny_path)
    yield ro
    ro.close()
