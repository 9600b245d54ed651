"""Advantages and losses of PPO and GRPO, as pure tensor functions over [batch, tokens] with a mask.

Conventions: every per-token tensor is aligned with the *target* tokens (position t holds the
log-prob of token t+1 of the full sequence); `mask` is 1.0 on response tokens, 0.0 elsewhere.
"""

from __future__ import annotations

import torch
from torch import Tensor


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum() / mask.sum().clamp_min(1.0)


def masked_whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def grpo_advantages(
    rewards: Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-6
) -> Tensor:
    """Group-relative advantage per sequence: reward minus its group's mean (divided by the group's std).

    `rewards` is [num_prompts * group_size], grouped in prompt order (all samples of prompt 0 first).
    A group whose samples all got the same reward gets advantage 0: it carries no signal.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    groups = rewards.view(-1, group_size)
    adv = groups - groups.mean(dim=1, keepdim=True)
    if scale_by_std:
        adv = adv / (groups.std(dim=1, keepdim=True, unbiased=False) + eps)
    return adv.reshape(-1)


def gae(
    token_rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation over each row's masked tokens; returns (advantages, returns).

    The value after a row's last response token is 0 (the episode ends there). Masked positions
    are skipped, so right padding and the prompt prefix do not leak into the recursion.
    """
    advantages = torch.zeros_like(values)
    next_value = torch.zeros(values.shape[0], dtype=values.dtype, device=values.device)
    running = torch.zeros_like(next_value)
    for t in reversed(range(values.shape[1])):
        m = mask[:, t]
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        running = torch.where(m > 0, delta + gamma * lam * running, running)
        advantages[:, t] = running * m
        next_value = torch.where(m > 0, values[:, t], next_value)
    returns = advantages + values * mask
    return advantages, returns


def terminal_rewards(rewards: Tensor, mask: Tensor) -> Tensor:
    """Place each sequence's scalar reward on its last response token (PPO's sparse reward)."""
    last = mask.shape[1] - 1 - mask.flip(1).argmax(dim=1)
    out = torch.zeros_like(mask)
    out[torch.arange(mask.shape[0]), last] = rewards.to(mask.dtype)
    return out * mask


def clipped_policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float,
    is_weights: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO's clipped surrogate, token-mean; returns (loss, clip_frac, approx_kl to the old policy).
    `is_weights` (constants, e.g. `truncated_is_weights`) scale each token's term: off-policy samples."""
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    per_token = torch.maximum(unclipped, clipped)
    loss = masked_mean(per_token if is_weights is None else per_token * is_weights, mask)
    with torch.no_grad():
        clip_frac = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean(0.5 * log_ratio**2, mask)
    return loss, clip_frac, approx_kl


def truncated_is_weights(
    trainer_logp: Tensor, sampler_logp: Tensor, cap: float, mask: Tensor
) -> Tensor:
    """Truncated importance weights min(pi_trainer / pi_sampler, cap) per token, without gradient.

    The sampler (vLLM, possibly some versions behind) drew the tokens; the trainer's log-probs before
    the update are what PPO's ratio starts from. Weighting each token's loss by their ratio corrects
    for the mismatch (stale weights, numerics); the cap bounds the variance. 1 on masked positions.
    """
    if not cap > 0:
        raise ValueError(f"algorithm.tis_cap must be > 0, got {cap!r}")
    with torch.no_grad():
        weights = torch.exp(trainer_logp - sampler_logp).clamp(max=cap)
    return torch.where(mask > 0, weights, torch.ones_like(weights))


def kl_estimate(logp: Tensor, ref_logp: Tensor, estimator: str) -> Tensor:
    """Per-token estimate of KL(policy || reference) from samples of the policy (Schulman's k1/k3)."""
    log_ratio = ref_logp - logp
    if estimator == "k1":
        return -log_ratio
    if estimator == "k3":  # unbiased and always >= 0
        return torch.exp(log_ratio) - log_ratio - 1.0
    raise ValueError(f"kl estimator must be k1 or k3, got {estimator!r}")


def clipped_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float
) -> Tensor:
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)
