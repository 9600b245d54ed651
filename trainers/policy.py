"""The trainer's side of the model: padded batches of (prompt, response) tokens, log-probs, the critic.

Per-token tensors are aligned with target tokens: column t scores token t+1 of the sequence, so a
batch of length L gives [B, L-1] log-probs, and `mask` marks the response tokens among them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class TokenBatch:
    tokens: Tensor  # [B, L] prompt + response, right-padded
    attention_mask: Tensor  # [B, L]
    mask: Tensor  # [B, L-1] float, 1 on response tokens (as targets)
    sampler_logprobs: Optional[Tensor] = (
        None  # [B, L-1] the engine's log-probs of the response tokens
    )

    def to(self, device: torch.device | str) -> "TokenBatch":
        sampler = None if self.sampler_logprobs is None else self.sampler_logprobs.to(device)
        return TokenBatch(
            self.tokens.to(device), self.attention_mask.to(device), self.mask.to(device), sampler
        )

    def select(self, idx: Tensor) -> "TokenBatch":
        sampler = None if self.sampler_logprobs is None else self.sampler_logprobs[idx]
        return TokenBatch(self.tokens[idx], self.attention_mask[idx], self.mask[idx], sampler)


def collate(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_id: int,
    sampler_logprobs: Optional[Sequence[Sequence[float]]] = None,
) -> TokenBatch:
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    B, L = len(prompts), max(lengths)
    tokens = torch.full((B, L), pad_id, dtype=torch.long)
    attention = torch.zeros((B, L), dtype=torch.long)
    mask = torch.zeros((B, L - 1))
    sampler = torch.zeros((B, L - 1)) if sampler_logprobs is not None else None
    for i, (p, r) in enumerate(zip(prompts, responses)):
        if not p:
            raise ValueError(f"sequence {i} has an empty prompt")
        n = len(p) + len(r)
        tokens[i, :n] = torch.tensor(list(p) + list(r), dtype=torch.long)
        attention[i, :n] = 1
        mask[i, len(p) - 1 : n - 1] = 1.0
        if sampler is not None:
            if len(sampler_logprobs[i]) != len(r):
                raise ValueError(
                    f"sequence {i}: {len(sampler_logprobs[i])} log-probs for {len(r)} response tokens"
                )
            sampler[i, len(p) - 1 : n - 1] = torch.tensor(sampler_logprobs[i], dtype=torch.float32)
    return TokenBatch(tokens, attention, mask, sampler)


def token_logprobs(
    model: nn.Module, batch: TokenBatch, temperature: float = 1.0, with_entropy: bool = False
) -> tuple[Tensor, Optional[Tensor]]:
    """Log-probs [B, L-1] of each target token under softmax(logits / temperature) (fp32), and optionally
    the entropy."""
    logits = (
        model(input_ids=batch.tokens, attention_mask=batch.attention_mask).logits[:, :-1].float()
    )
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = F.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, batch.tokens[:, 1:].unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1) if with_entropy else None
    return logp, entropy


class ValueModel(nn.Module):
    """PPO's critic: the policy's transformer body (its own copy) and a zero-initialised scalar head."""

    def __init__(self, model_path: str):
        super().__init__()
        from transformers import AutoModel

        self.body = AutoModel.from_pretrained(model_path, dtype=torch.float32)
        self.head = nn.Linear(self.body.config.hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, batch: TokenBatch) -> Tensor:
        """V(state before each target token): [B, L-1]."""
        hidden = self.body(
            input_ids=batch.tokens, attention_mask=batch.attention_mask
        ).last_hidden_state
        return self.head(hidden[:, :-1].float()).squeeze(-1)


def resolve_model_path(path: Optional[str], cache_dir: str) -> str:
    """`model.path`, or with none the tiny model (built once under `model.cache_dir`)."""
    if path is not None:
        return path
    from rollout.tiny_model import ensure_tiny_model

    return str(ensure_tiny_model(cache_dir=cache_dir))


def load_policy(model_path: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.config.use_cache = False
    return model
