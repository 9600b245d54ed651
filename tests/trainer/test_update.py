"""Micro-batching changes memory, not math: the same gradients and metrics for any micro_batch_size."""

from __future__ import annotations

import pytest
import torch

from trainers.config import AlgorithmConfig
from trainers.policy import ValueModel, collate, load_policy
from trainers.update import logprobs_no_grad, policy_backward, value_backward, values_no_grad


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 99, (n,), generator=g).tolist() for n in (4, 6, 3, 5, 4)]
    responses = [torch.randint(3, 99, (n,), generator=g).tolist() + [1] for n in (1, 5, 2, 7, 3)]
    return collate(prompts, responses, pad_id=0)


def grads(module):
    return [p.grad.clone() for p in module.parameters() if p.grad is not None]


def test_policy_gradients_do_not_depend_on_the_micro_batch_size(tiny_path, batch):
    alg = AlgorithmConfig(kl_coef=0.1, entropy_coef=0.01, clip_eps=0.2)
    policy, reference = load_policy(str(tiny_path)), load_policy(str(tiny_path))
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.01 * torch.randn_like(p))
    old = (
        logprobs_no_grad(policy, batch, 1.0, 0) - 0.3
    )  # ratio e^0.3 > 1 + clip_eps: clipping shows
    assert torch.allclose(old + 0.3, logprobs_no_grad(policy, batch, 1.0, 2), atol=1e-6)
    ref = logprobs_no_grad(reference, batch, 1.0, 0)
    adv = torch.randn(batch.mask.shape, generator=torch.Generator().manual_seed(1)) * batch.mask
    results = {}
    for micro in (0, 2, 1):
        policy.zero_grad(set_to_none=True)
        metrics = policy_backward(policy, batch, old, adv, ref, alg, micro)
        results[micro] = (metrics, grads(policy))
    for micro in (2, 1):
        for key in results[0][0]:
            assert results[micro][0][key] == pytest.approx(
                results[0][0][key], rel=1e-5, abs=1e-7
            ), key
        for a, b in zip(results[micro][1], results[0][1]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert results[0][0]["clip_frac"] > 0 and results[0][0]["kl"] > 0


def test_value_gradients_do_not_depend_on_the_micro_batch_size(tiny_path, batch):
    critic = ValueModel(str(tiny_path))
    torch.nn.init.normal_(critic.head.weight, std=0.1)
    old = values_no_grad(critic, batch, 0)
    torch.testing.assert_close(old, values_no_grad(critic, batch, 3))
    returns = torch.rand(batch.mask.shape, generator=torch.Generator().manual_seed(2)) * batch.mask
    out = {}
    for micro in (0, 3):
        critic.zero_grad(set_to_none=True)
        out[micro] = (
            value_backward(critic, batch, old.detach() + 0.05, returns, 0.2, micro),
            grads(critic),
        )
    assert out[3][0] == pytest.approx(out[0][0], rel=1e-5)
    for a, b in zip(out[3][1], out[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
