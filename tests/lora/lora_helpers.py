"""What the LoRA tests share: the adapter's shape, a PEFT model, adapters that change, the reference."""

from __future__ import annotations

import torch

from rollout import AdapterConfig

LORA_CFG = AdapterConfig(rank=8, alpha=16.0)
REF_ATOL = 1e-4  # float32 engine vs float64 transformers (helpers.assert_matches_transformers)


def lora_model(path, cfg: AdapterConfig = LORA_CFG, dtype: torch.dtype = torch.float64):
    """transformers' model at `path` with a PEFT LoRA adapter of `cfg`'s shape (eval mode)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    peft_cfg = LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.target_modules), lora_dropout=0.0
    )
    return get_peft_model(base, peft_cfg).eval()


@torch.no_grad()
def perturb_adapter(model, seed: int, scale: float = 0.05) -> None:
    """New random A and B for every LoRA layer (PEFT starts B at zero: an adapter that changes nothing)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.copy_(scale * torch.randn(p.shape, generator=gen, dtype=torch.float64))


def adapter_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())
