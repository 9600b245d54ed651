"""The worker drops only vLLM's benign per-refit warning about RotaryEmbedding's computed cache."""

from __future__ import annotations

import logging

from rollout.worker_extension import _DropRotaryNoWeights


def _record(layer: str) -> logging.LogRecord:
    return logging.LogRecord("vllm.model_executor.model_loader.reload.layerwise", logging.WARNING, __file__, 1,
                             "%s: Failed to load weights", (layer,), None)


def test_only_the_rotary_warning_is_dropped():
    keep = _DropRotaryNoWeights().filter
    assert not keep(_record("RotaryEmbedding"))
    assert keep(_record("QKVParallelLinear"))  # a real missing weight still warns
    other = logging.LogRecord("x", logging.WARNING, __file__, 1, "%s: something else", ("RotaryEmbedding",), None)
    assert keep(other)
