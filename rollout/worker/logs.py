"""Keeps vLLM's benign per-refit warnings out of the worker's log, so the trainer's lines show."""

from __future__ import annotations

import logging


class DropBenignNoWeights(logging.Filter):
    """vLLM's layerwise reload warns "<layer>: Failed to load weights" for every layer with loadable
    tensors that no checkpoint carries, then puts the layer's tensors back as they were. Two are
    benign and would fire on every refit: RotaryEmbedding (its cos/sin cache is computed, never
    saved) and, on a model with tied embeddings, ParallelLMHead (it shares the embedding's
    Parameter, which does get the new values; the refit re-derives the rest,
    rollout/tied_heads.py). Any other layer's warning still shows."""

    def __init__(self, layer_classes: frozenset[str]) -> None:
        super().__init__()
        self.layer_classes = layer_classes

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        return not (
            isinstance(args, tuple)
            and args
            and args[0] in self.layer_classes
            and "Failed to load weights" in str(record.msg)
        )


def quiet_benign_reload_logs(tied_head: bool) -> None:
    benign = {"RotaryEmbedding", "ParallelLMHead"} if tied_head else {"RotaryEmbedding"}
    layerwise = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    layerwise.addFilter(DropBenignNoWeights(frozenset(benign)))
    # "Reloading and processing weights took ..." at every refit: RefitStats.load_s has it already.
    logging.getLogger("vllm.model_executor.model_loader.reload.inplace").setLevel(logging.WARNING)
