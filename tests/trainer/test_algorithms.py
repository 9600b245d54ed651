"""Advantages, losses and the token alignment of batches, checked against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from trainers.algorithms import (
    clipped_policy_loss,
    clipped_value_loss,
    gae,
    grpo_advantages,
    kl_estimate,
    masked_mean,
    terminal_rewards,
)
from trainers.policy import collate, token_logprobs


def test_grpo_advantages_are_group_relative():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5])
    adv = grpo_advantages(rewards, group_size=4)
    # group 0: mean 0.25, std sqrt(3)/4
    std = math.sqrt(3) / 4
    torch.testing.assert_close(adv[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]) / (std + 1e-6))
    assert torch.equal(adv[4:], torch.zeros(4)), "a group with equal rewards carries no signal"
    unscaled = grpo_advantages(rewards, group_size=4, scale_by_std=False)
    torch.testing.assert_close(unscaled[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]))


def test_grpo_advantages_reject_ragged_groups():
    with pytest.raises(ValueError, match="groups of 4"):
        grpo_advantages(torch.zeros(6), group_size=4)


def test_gae_matches_hand_recursion_and_skips_masked_positions():
    # one row: prompt position (masked), 3 response tokens, one pad
    values = torch.tensor([[9.0, 0.5, 0.25, 0.75, 9.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0]])
    rewards = terminal_rewards(torch.tensor([1.0]), mask)
    assert rewards.tolist() == [[0.0, 0.0, 0.0, 1.0, 0.0]]
    gamma, lam = 0.9, 0.8
    adv, ret = gae(rewards, values, mask, gamma, lam)
    d3 = 1.0 - 0.75
    d2 = 0.0 + gamma * 0.75 - 0.25
    d1 = 0.0 + gamma * 0.25 - 0.5
    a3 = d3
    a2 = d2 + gamma * lam * a3
    a1 = d1 + gamma * lam * a2
    torch.testing.assert_close(adv, torch.tensor([[0.0, a1, a2, a3, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.0, a1 + 0.5, a2 + 0.25, a3 + 0.75, 0.0]]))


def test_gae_with_gamma_lam_one_is_reward_minus_value():
    values = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    rewards = terminal_rewards(torch.tensor([1.0, 0.5]), mask)
    adv, ret = gae(rewards, values, mask, 1.0, 1.0)
    torch.testing.assert_close(adv, torch.tensor([[0.9, 0.8, 0.7], [0.1, 0.0, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[1.0, 1.0, 1.0], [0.5, 0.0, 0.0]]))


def test_clipped_policy_loss_clips_and_stops_the_gradient():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.0, 1.5, 0.5, 1.1]])).requires_grad_(True)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    mask = torch.ones(1, 4)
    loss, clip_frac, approx_kl = clipped_policy_loss(logp, old, adv, mask, clip_eps=0.2)
    # ratios 1, 1.5 (clipped at 1.2 for A>0), 0.5 (clipped at 0.8 for A<0), 1.1 (inside)
    expected = (-1.0 - 1.2 + 0.8 + 1.1) / 4
    assert loss.item() == pytest.approx(expected)
    assert clip_frac.item() == pytest.approx(0.5)
    assert approx_kl.item() > 0
    loss.backward()
    assert logp.grad[0, 1] == 0 and logp.grad[0, 2] == 0, "clipped tokens must not push further"
    assert logp.grad[0, 0] != 0 and logp.grad[0, 3] != 0


def test_kl_estimators():
    logp = torch.log(torch.tensor([0.5, 0.2, 0.9]))
    ref = torch.log(torch.tensor([0.25, 0.4, 0.9]))
    k1 = kl_estimate(logp, ref, "k1")
    k3 = kl_estimate(logp, ref, "k3")
    torch.testing.assert_close(k1, logp - ref)
    r = torch.exp(ref - logp)
    torch.testing.assert_close(k3, r - torch.log(r) - 1)
    assert (k3 >= 0).all() and k3[2] == 0 and (k1 < 0).any()
    with pytest.raises(ValueError, match="k1 or k3"):
        kl_estimate(logp, ref, "k2")


def test_clipped_value_loss_takes_the_worse_of_clipped_and_unclipped():
    values = torch.tensor([[1.0]])
    old = torch.tensor([[0.0]])
    returns = torch.tensor([[1.0]])
    # unclipped error 0; clipped value 0.2 -> error 0.64: the max keeps the critic from jumping
    assert clipped_value_loss(
        values, old, returns, torch.ones(1, 1), clip=0.2
    ).item() == pytest.approx(0.32)


def test_masked_mean_ignores_masked_entries():
    assert masked_mean(torch.tensor([1.0, 100.0, 3.0]), torch.tensor([1.0, 0.0, 1.0])).item() == 2.0


def test_collate_aligns_response_tokens_with_targets(tiny_path):
    from trainers.policy import load_policy

    batch = collate(
        [[5, 6, 7], [8]],
        [[9, 1], [10, 11, 1]],
        pad_id=0,
        sampler_logprobs=[[-1.0, -2.0], [-3.0, -4.0, -5.0]],
    )
    assert batch.tokens.tolist() == [[5, 6, 7, 9, 1], [8, 10, 11, 1, 0]]
    assert batch.mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 0]]
    assert batch.sampler_logprobs.tolist() == [[0, 0, -1, -2], [-3, -4, -5, 0]]
    model = load_policy(str(tiny_path))
    with torch.no_grad():
        logp, entropy = token_logprobs(model, batch, with_entropy=True)
        logits = model(input_ids=torch.tensor([[8, 10, 11, 1]])).logits[0].log_softmax(-1)
    # row 1: position 0 predicts token 10, position 1 token 11, position 2 the eos
    torch.testing.assert_close(
        logp[1, :3], torch.stack([logits[0, 10], logits[1, 11], logits[2, 1]])
    )
    assert (entropy[batch.mask > 0] > 0).all()
    with pytest.raises(ValueError, match="2 log-probs for 3 response tokens"):
        collate([[5]], [[1, 2, 3]], 0, sampler_logprobs=[[0.0, 0.0]])
