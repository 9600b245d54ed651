"""Truncated importance sampling (algorithm.tis_cap): the weights against hand-computed values, and
their effect on the policy loss and its gradient."""

from __future__ import annotations

import math

import pytest
import torch

from trainers.algorithms import clipped_policy_loss, masked_mean, truncated_is_weights
from trainers.config import AlgorithmConfig
from trainers.policy import collate, load_policy
from trainers.update import logprobs_no_grad, policy_backward


def test_weights_are_the_capped_ratio_and_one_off_the_mask():
    trainer = torch.tensor([[-1.0, -2.0, -0.5, -3.0]])
    sampler = torch.tensor([[-1.5, -1.0, -0.5, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    weights = truncated_is_weights(trainer, sampler, cap=1.2, mask=mask)
    torch.testing.assert_close(
        weights, torch.tensor([[1.2, math.exp(-1.0), 1.0, 1.0]])
    )  # e^0.5 > 1.2: capped
    assert not weights.requires_grad


def test_weights_carry_no_gradient():
    trainer = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    weights = truncated_is_weights(
        trainer, torch.tensor([[-1.2, -2.0]]), cap=2.0, mask=torch.ones(1, 2)
    )
    assert weights.grad_fn is None


def test_weighted_loss_is_the_token_mean_of_weighted_terms():
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(3, 5, generator=g).requires_grad_()
    old = (logp + 0.05 * torch.randn(3, 5, generator=g)).detach()
    adv, mask = torch.randn(3, 5, generator=g), (torch.rand(3, 5, generator=g) > 0.3).float()
    weights = torch.rand(3, 5, generator=g) * 2
    plain, _, _ = clipped_policy_loss(logp, old, adv, mask, 0.2)
    ones, _, _ = clipped_policy_loss(logp, old, adv, mask, 0.2, torch.ones(3, 5))
    weighted, _, _ = clipped_policy_loss(logp, old, adv, mask, 0.2, weights)
    ratio = torch.exp(logp - old)
    terms = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
    torch.testing.assert_close(ones, plain)
    torch.testing.assert_close(weighted, masked_mean(terms * weights, mask))
    (grad_plain,) = torch.autograd.grad(plain, logp)
    (grad_weighted,) = torch.autograd.grad(weighted, logp)
    torch.testing.assert_close(
        grad_weighted, grad_plain * weights
    )  # each token's gradient scaled by its weight


def test_policy_backward_scales_the_pg_gradient(tiny_path):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 99, (n,), generator=g).tolist() for n in (4, 6, 3)]
    responses = [torch.randint(3, 99, (n,), generator=g).tolist() for n in (3, 5, 2)]
    batch = collate(prompts, responses, pad_id=0)
    alg = AlgorithmConfig(kl_coef=0.0, entropy_coef=0.0, tis_cap=2.0)
    policy = load_policy(str(tiny_path))
    old = logprobs_no_grad(policy, batch, 1.0, 0)
    adv = torch.randn(batch.mask.shape, generator=g) * batch.mask

    def grads(weights):
        policy.zero_grad(set_to_none=True)
        policy_backward(policy, batch, old, adv, None, alg, 0, weights)
        return [p.grad.clone() for p in policy.parameters() if p.grad is not None]

    for none, ones, doubled in zip(
        grads(None), grads(torch.ones_like(old)), grads(2 * torch.ones_like(old))
    ):
        torch.testing.assert_close(ones, none)
        torch.testing.assert_close(doubled, 2 * none)


@pytest.mark.parametrize("cap", [0.0, -1.0])
def test_tis_cap_must_be_positive(cap):
    with pytest.raises(ValueError, match="algorithm.tis_cap"):
        AlgorithmConfig(tis_cap=cap)
    with pytest.raises(ValueError, match="tis_cap"):
        truncated_is_weights(torch.zeros(1, 1), torch.zeros(1, 1), cap, torch.ones(1, 1))


def test_tis_is_off_by_default():
    assert AlgorithmConfig().tis_cap is None
