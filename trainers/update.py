"""One minibatch's gradients, accumulated micro-batch by micro-batch so that big models fit.

The loss is a token-mean over the whole minibatch: each micro-batch's token-mean is weighted by its
share of the minibatch's response tokens, so any `micro_batch_size` gives the same gradient.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from trainers.algorithms import clipped_policy_loss, clipped_value_loss, kl_estimate, masked_mean
from trainers.config import AlgorithmConfig
from trainers.policy import TokenBatch, token_logprobs


def micro_batches(n: int, size: int, device: torch.device) -> list[Tensor]:
    """Index chunks of at most `size` rows (0 = one chunk)."""
    return list(torch.arange(n, device=device).split(size if size > 0 else max(n, 1)))


@torch.no_grad()
def logprobs_no_grad(model: nn.Module, batch: TokenBatch, temperature: float, micro_batch_size: int) -> Tensor:
    chunks = micro_batches(batch.tokens.shape[0], micro_batch_size, batch.tokens.device)
    return torch.cat([token_logprobs(model, batch.select(i), temperature)[0] for i in chunks])


@torch.no_grad()
def values_no_grad(critic: nn.Module, batch: TokenBatch, micro_batch_size: int) -> Tensor:
    chunks = micro_batches(batch.tokens.shape[0], micro_batch_size, batch.tokens.device)
    return torch.cat([critic(batch.select(i)) for i in chunks]) * batch.mask


def policy_backward(
    policy: nn.Module,
    mb: TokenBatch,
    old_logp: Tensor,
    advantages: Tensor,
    ref_logp: Optional[Tensor],
    alg: AlgorithmConfig,
    micro_batch_size: int,
    is_weights: Optional[Tensor] = None,
    total_tokens: Optional[Tensor] = None,
) -> dict[str, float]:
    """Backward of clipped PG - entropy bonus + KL penalty for minibatch `mb`; returns its metrics.
    `is_weights`: per-token importance weights of the PG term (algorithm.tis_cap), None = all 1.
    `total_tokens`: the response tokens of the whole minibatch when `mb` is one rank's share of it
    (the loss and metrics are then that share; summed over the ranks they are the minibatch's)."""
    total = (mb.mask.sum() if total_tokens is None else total_tokens).clamp_min(1.0)
    out = {"loss": 0.0, "clip_frac": 0.0, "ppo_kl": 0.0, "entropy": 0.0, "kl": 0.0}
    for idx in micro_batches(mb.tokens.shape[0], micro_batch_size, mb.tokens.device):
        m = mb.select(idx)
        weight = m.mask.sum() / total
        logp, entropy = token_logprobs(policy, m, alg.temperature, with_entropy=True)
        weights = is_weights[idx] if is_weights is not None else None
        pg_loss, clip_frac, ppo_kl = clipped_policy_loss(logp, old_logp[idx], advantages[idx], m.mask, alg.clip_eps, weights)
        ent = masked_mean(entropy, m.mask)
        loss = pg_loss - alg.entropy_coef * ent
        kl = torch.zeros(())
        if ref_logp is not None:
            kl = masked_mean(kl_estimate(logp, ref_logp[idx], alg.kl_estimator.value), m.mask)
            loss = loss + alg.kl_coef * kl
        (loss * weight).backward()
        w = weight.item()
        for key, value in (("loss", loss), ("clip_frac", clip_frac), ("ppo_kl", ppo_kl), ("entropy", ent), ("kl", kl)):
            out[key] += value.item() * w
    return out


def value_backward(
    critic: nn.Module, mb: TokenBatch, old_values: Tensor, returns: Tensor, value_clip: float, micro_batch_size: int,
    total_tokens: Optional[Tensor] = None,
) -> float:
    """Backward of the clipped value loss for minibatch `mb`; returns the loss (`total_tokens` as above)."""
    total = (mb.mask.sum() if total_tokens is None else total_tokens).clamp_min(1.0)
    out = 0.0
    for idx in micro_batches(mb.tokens.shape[0], micro_batch_size, mb.tokens.device):
        m = mb.select(idx)
        weight = m.mask.sum() / total
        loss = clipped_value_loss(critic(m), old_values[idx], returns[idx], m.mask, value_clip)
        (loss * weight).backward()
        out += loss.item() * weight.item()
    return out
