"""`model.lora`: the policy as a PEFT LoRA adapter on a frozen base; what a LoRA refit sends.

The trainer wraps the policy with PEFT (`peft.get_peft_model`), trains only the adapter, takes the
reference log-probs from the base itself (the adapter disabled: no second copy of the model), and each
refit sends the adapter's tensors alone, by PEFT's names (`get_peft_model_state_dict`: the live
tensors, no copy), which the engine installs as a new adapter version (rollout.config.AdapterConfig).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterable, Iterator

from torch import Tensor, nn


def wrap_policy(policy: nn.Module, rank: int, alpha: float, dropout: float, modules: list) -> Any:
    """`policy` (a transformers causal LM) with a fresh LoRA adapter; only the adapter trains."""
    from peft import LoraConfig, get_peft_model

    missing = sorted(set(modules) - {name.rsplit(".", 1)[-1] for name, _ in policy.named_modules()})
    if missing:
        raise ValueError(
            f"model.lora.target_modules: {missing} name no module of {type(policy).__name__}"
        )
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(modules))
    return get_peft_model(policy, cfg)


def adapter_tensors(policy: Any) -> Iterable[tuple[str, Tensor]]:
    """The adapter's tensors by PEFT's saved names (`...q_proj.lora_A.weight`), as vLLM loads them."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(policy).items()


class BaseModel(nn.Module):
    """The base model under a PEFT policy (its adapter disabled), as the frozen KL reference. It holds
    no parameters of its own: it is the policy's base weights, which never train."""

    def __init__(self, policy: Any) -> None:
        super().__init__()
        self.__dict__["_policy"] = policy  # not a submodule: no state_dict, no second copy

    def forward(self, **inputs: Any) -> Any:
        with self._policy.disable_adapter():
            return self._policy(**inputs)


@contextlib.contextmanager
def warm_start_params(policy: Any, lora: bool) -> Iterator[list[nn.Parameter]]:
    """The parameters the supervised warm-start trains: the whole model, or under LoRA the base's,
    with the adapter disabled (it stays as PEFT made it: B = 0, no effect)."""
    if not lora:
        yield [p for p in policy.parameters() if p.requires_grad]
        return
    base = [p for name, p in policy.named_parameters() if "lora_" not in name]
    for p in base:
        p.requires_grad_(True)
    try:
        with policy.disable_adapter():
            yield base
    finally:
        for p in base:
            p.requires_grad_(False)


def base_state(policy: Any) -> dict[str, Tensor]:
    """The base model's tensors under a PEFT policy, by the plain model's names (no adapter tensors)."""
    return {
        name.replace(".base_layer.", "."): t
        for name, t in policy.get_base_model().state_dict().items()
        if "lora_" not in name
    }


def export_base(policy: Any, model_path: str, out_dir: Path) -> str:
    """Save the base model under a PEFT policy (no adapter tensors) as a Hugging Face directory the
    engine can start on, with `model_path`'s tokenizer; returns its path."""
    from transformers import AutoTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    policy.get_base_model().save_pretrained(
        out_dir, state_dict=base_state(policy), safe_serialization=True
    )
    AutoTokenizer.from_pretrained(model_path).save_pretrained(out_dir)
    return str(out_dir)
