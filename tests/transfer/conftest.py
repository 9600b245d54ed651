"""Fixtures of the transfer tests; `gpu`-marked tests are skipped where CUDA is absent."""

from __future__ import annotations

import pytest
import torch
from transfer_procs import SenderServer


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and "tests/transfer" in str(item.fspath):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def sender_server():
    """One spawned sender process shared by the tests (a spawn with torch costs seconds here)."""
    server = SenderServer()
    yield server
    server.stop()
