"""The backend tests' trainer: the tiny model in transformers (fp32), its start-up weights, a
perturbed copy saved where a fresh engine can start from it, and that fresh engine's completions."""

from __future__ import annotations

import pytest
import torch
from backend_helpers import PROMPTS, load, refit_segments_mapped

from benchmarks.serve import VllmServer
from rollout.tiny_model import ensure_tiny_model


@pytest.fixture
def mapped_before() -> set[str]:
    """The transfer segments this process maps as the test starts: other modules' session-scoped
    engines keep theirs mapped until the session ends, so a test checks what it made itself."""
    return set(refit_segments_mapped())


@pytest.fixture(scope="session")
def tiny_path():
    return ensure_tiny_model()


@pytest.fixture(scope="session")
def trainer(tiny_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_path, torch_dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def base_state(trainer):
    return {k: v.detach().clone() for k, v in trainer.state_dict().items()}


@pytest.fixture(scope="session")
def new_state(base_state):
    gen = torch.Generator().manual_seed(1)
    return {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in base_state.items()}


@pytest.fixture(scope="session")
def new_path(trainer, base_state, new_state, tiny_path, tmp_path_factory):
    """`new_state` on disk, for a fresh engine (the trainer is put back to `base_state`)."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("new_weights")
    load(trainer, new_state)
    trainer.save_pretrained(path, safe_serialization=True)
    load(trainer, base_state)
    AutoTokenizer.from_pretrained(tiny_path).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def fresh_new(new_path, tmp_path_factory):
    """A fresh `vllm serve` (no backend) on `new_state`: its greedy completions, then it is stopped.
    Both modules compare with it (the offline LLM samples with the same engine code and dtype), so
    the suite starts one reference engine, not two."""
    log = tmp_path_factory.mktemp("fresh") / "server.log"
    with VllmServer(new_path, backend=None, log_path=log) as fresh:
        return fresh.complete(PROMPTS)
