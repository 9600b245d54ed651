"""The worker drops only vLLM's benign per-refit warnings: RotaryEmbedding's computed cache, and a tied
output head (only on a model that has one)."""

from __future__ import annotations

import logging

from rollout.worker.logs import DropBenignNoWeights


def _record(layer: str) -> logging.LogRecord:
    return logging.LogRecord(
        "vllm.model_executor.model_loader.reload.layerwise",
        logging.WARNING,
        __file__,
        1,
        "%s: Failed to load weights",
        (layer,),
        None,
    )


def test_only_the_rotary_warning_is_dropped():
    keep = DropBenignNoWeights(frozenset({"RotaryEmbedding"})).filter
    assert not keep(_record("RotaryEmbedding"))
    assert keep(_record("QKVParallelLinear"))  # a real missing weight still warns
    assert keep(
        _record("ParallelLMHead")
    )  # an untied model's head that received nothing still warns
    other = logging.LogRecord(
        "x", logging.WARNING, __file__, 1, "%s: something else", ("RotaryEmbedding",), None
    )
    assert keep(other)


def test_a_tied_head_is_benign():
    keep = DropBenignNoWeights(frozenset({"RotaryEmbedding", "ParallelLMHead"})).filter
    assert not keep(_record("ParallelLMHead")) and not keep(_record("RotaryEmbedding"))
    assert keep(_record("VocabParallelEmbedding"))
