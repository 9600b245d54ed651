"""refit as a vLLM weight-transfer backend: `weight_transfer_config={"backend": "refit"}`.

vLLM runs `register` in each of its processes (entry point group `vllm.general_plugins`, declared
in pyproject.toml), so after `pip install` an `LLM(...)` or `vllm serve` with backend "refit" needs
no other code. The worker side (worker.py) owns the same WorkerRefit as our own engines' worker
extension; the trainer side (trainer.py) drives our WeightSender through vLLM's control plane.
Modules are registered by name: nothing of ours is imported until a backend "refit" is built.
"""

from __future__ import annotations

BACKEND = "refit"
_registered = False


def register() -> None:
    """Register the worker and trainer engines under "refit"; once per process (vLLM's plugin
    loader and an import of the trainer side may both call it). A vLLM without the trainer-side
    API (before 0.32; the GPU build 0.24 has only the worker registry) gets nothing: its own
    engines are untouched, and backend "refit" is refused there as unknown."""
    global _registered
    if _registered:
        return
    _registered = True
    try:
        from vllm.distributed.weight_transfer.factory import (
            WeightTransferEngineFactory,
            WeightTransferTrainerFactory,
        )
    except ImportError:
        return
    WeightTransferEngineFactory.register_engine(
        BACKEND, "rollout.vllm_backend.worker", "RefitWeightTransferEngine"
    )
    WeightTransferTrainerFactory.register_engine(
        BACKEND, "rollout.vllm_backend.trainer", "RefitTrainerEngine"
    )
