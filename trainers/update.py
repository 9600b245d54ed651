"""The update math, written once for the one-process learner and the sharded ranks: the old scores of a
batch, and one minibatch's step, its gradients accumulated micro-batch by micro-batch so that big models fit.

The loss is a token-mean over the whole minibatch: each micro-batch's token-mean is weighted by its
share of the minibatch's response tokens, so any `micro_batch_size` gives the same gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from trainers.algorithms import (
    clipped_policy_loss,
    clipped_value_loss,
    kl_estimate,
    masked_mean,
    truncated_is_weights,
)
from trainers.config import AlgorithmConfig
from trainers.policy import TokenBatch, token_logprobs


def micro_batches(n: int, size: int, device: torch.device) -> list[Tensor]:
    """Index chunks of at most `size` rows (0 = one chunk)."""
    return list(torch.arange(n, device=device).split(size if size > 0 else max(n, 1)))


@torch.no_grad()
def logprobs_no_grad(
    model: nn.Module, batch: TokenBatch, temperature: float, micro_batch_size: int
) -> Tensor:
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
        pg_loss, clip_frac, ppo_kl = clipped_policy_loss(
            logp, old_logp[idx], advantages[idx], m.mask, alg.clip_eps, weights
        )
        ent = masked_mean(entropy, m.mask)
        loss = pg_loss - alg.entropy_coef * ent
        kl = torch.zeros(())
        if ref_logp is not None:
            kl = masked_mean(kl_estimate(logp, ref_logp[idx], alg.kl_estimator.value), m.mask)
            loss = loss + alg.kl_coef * kl
        (loss * weight).backward()
        w = weight.item()
        for key, value in (
            ("loss", loss),
            ("clip_frac", clip_frac),
            ("ppo_kl", ppo_kl),
            ("entropy", ent),
            ("kl", kl),
        ):
            out[key] += value.item() * w
    return out


def value_backward(
    critic: nn.Module,
    mb: TokenBatch,
    old_values: Tensor,
    returns: Tensor,
    value_clip: float,
    micro_batch_size: int,
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


@dataclass
class OldScores:
    """What the trainer's models say about the sampled tokens before the update ([B, L-1] each)."""

    logp: Tensor  # the policy's, at the sampling temperature: the ratio's denominator
    raw_logp: Optional[
        Tensor
    ]  # the policy's at temperature 1: what vLLM reports, for `logprob_gap`
    ref_logp: Optional[Tensor]  # the frozen reference's (None without a KL penalty)
    values: Optional[Tensor]  # the critic's (None for GRPO)
    # min(pi_policy / pi_sampler, algorithm.tis_cap) per token, at temperature 1 on both sides (what
    # vLLM reports); None with tis_cap off
    is_weights: Optional[Tensor] = None

    def select(self, idx: Tensor) -> "OldScores":
        return OldScores(*(None if t is None else t[idx] for t in self.tensors()))

    def tensors(self) -> tuple[Optional[Tensor], ...]:
        return tuple(getattr(self, f.name) for f in fields(self))


@dataclass
class Models:
    """The models one process (or one rank, its shards) trains: the policy, its optimizer, and as the
    algorithm asks a frozen reference and a critic with its optimizer."""

    policy: nn.Module
    optimizer: torch.optim.Optimizer
    reference: Optional[nn.Module] = None
    critic: Optional[nn.Module] = None
    critic_opt: Optional[torch.optim.Optimizer] = None


@torch.no_grad()
def score(m: Models, batch: TokenBatch, alg: AlgorithmConfig, micro_batch_size: int) -> OldScores:
    """The old log-probs (at the sampling temperature and at 1), the reference's, the critic's values and
    the truncated importance weights of `batch`'s rows."""
    temperature = alg.temperature
    logp = logprobs_no_grad(m.policy, batch, temperature, micro_batch_size)
    raw = logp if temperature == 1.0 else logprobs_no_grad(m.policy, batch, 1.0, micro_batch_size)
    ref = (
        logprobs_no_grad(m.reference, batch, temperature, micro_batch_size)
        if m.reference is not None
        else None
    )
    values = values_no_grad(m.critic, batch, micro_batch_size) if m.critic is not None else None
    weights = None
    if alg.tis_cap is not None:
        weights = truncated_is_weights(raw, batch.sampler_logprobs, alg.tis_cap, batch.mask)
    return OldScores(logp, raw, ref, values, weights)


def minibatch_order(num_rows: int, alg: AlgorithmConfig, seed: int) -> list[Tensor]:
    """The row indices of every minibatch of an update: `num_epochs` shuffles (by `seed`), each cut into
    `num_minibatches`."""
    shuffle = torch.Generator().manual_seed(seed)
    return [
        idx
        for _ in range(alg.num_epochs)
        for idx in torch.randperm(num_rows, generator=shuffle).chunk(alg.num_minibatches)
    ]


def minibatch_step(
    m: Models,
    mb: TokenBatch,
    old: OldScores,
    advantages: Tensor,
    returns: Optional[Tensor],
    alg: AlgorithmConfig,
    micro_batch_size: int,
    total_tokens: Optional[Tensor] = None,
    grad_norm: Callable[[Tensor], float] = float,
) -> dict[str, float]:
    """One clipped policy step (and a critic step) on minibatch `mb`, whose rows `old`, `advantages` and
    `returns` are; returns its metrics. `total_tokens`, `grad_norm`: a rank's share of a minibatch (see
    policy_backward; the whole model's gradient norm of sharded gradients)."""
    m.optimizer.zero_grad(set_to_none=True)
    metrics = policy_backward(
        m.policy,
        mb,
        old.logp,
        advantages,
        old.ref_logp,
        alg,
        micro_batch_size,
        old.is_weights,
        total_tokens,
    )
    metrics["grad_norm"] = grad_norm(
        torch.nn.utils.clip_grad_norm_(m.policy.parameters(), alg.max_grad_norm)
    )
    m.optimizer.step()
    if m.critic is not None:
        m.critic_opt.zero_grad(set_to_none=True)
        metrics["value_loss"] = value_backward(
            m.critic, mb, old.values, returns, alg.value_clip, micro_batch_size, total_tokens
        )
        torch.nn.utils.clip_grad_norm_(m.critic.parameters(), alg.max_grad_norm)
        m.critic_opt.step()
    return metrics
