"""Refits are exact across architectures, tied word embeddings or not (issue 10).

For Qwen2, Qwen3, Llama and Mistral tiny models (2 layers, 1 KV head, head_dim 64), untied and tied, one
fp32 engine each: before any refit it is a fresh engine on the model's weights; then it takes several
refits of weights perturbed by N(0, 0.05) each time (embedding included), and after every one its greedy
tokens equal transformers' own greedy decode (float64) and its log-probs transformers' to REF_ATOL; a
last refit back to the starting weights gives the fresh engine's tokens and log-probs again. The refits
send what a trainer sends: `named_parameters()`, which for a tied model has no `lm_head.weight`; one of
them sends the `state_dict()` form (with it), as a trainer sending state dicts would.

Transformers is the reference that catches stale derived state: a tied head that kept its first weights
(test_a_stale_tied_head_is_caught) matched the fresh engine after the return to the starting weights, but
not transformers after the first refit.
"""

from __future__ import annotations

import functools

import helpers
import pytest
import torch

from rollout.tiny_model import TinyModelSpec, ensure_tiny_model

REF_ATOL = 1e-4  # float32 engine vs float64 transformers
FRESH_ATOL = 1e-5  # the same float32 engine, same weights, before and after refits
PROMPTS = helpers.PROMPTS
MAX_TOKENS = 16
NUM_REFITS = 3
VARIANTS = [
    (arch, tied) for arch in ("qwen2", "qwen3", "llama", "mistral") for tied in (False, True)
]


def spec(arch: str, tied: bool) -> TinyModelSpec:
    return TinyModelSpec(architecture=arch, tie_word_embeddings=tied, num_key_value_heads=1)


def load_hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()


def trainer_weights(hf_model) -> dict[str, torch.Tensor]:
    """What a trainer's `named_parameters()` holds, in float32 (a tied model has no lm_head.weight)."""
    return {name: p.detach().to(torch.float32).clone() for name, p in hf_model.named_parameters()}


def step(state: dict[str, torch.Tensor], seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in state.items()}


greedy = functools.partial(helpers.greedy, max_tokens=MAX_TOKENS)


@torch.no_grad()
def assert_matches_transformers(hf_model, state, samples) -> None:
    """transformers' greedy decode gives the same tokens; its log-probs of them match to REF_ATOL."""
    for name, param in hf_model.named_parameters():
        param.copy_(state[name].to(torch.float64))
    helpers.assert_matches_transformers(hf_model, samples, MAX_TOKENS, REF_ATOL)


def with_tied_head(state: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """The state_dict() form of a tied model's weights: lm_head.weight named too, aliasing the embedding."""
    return list(state.items()) + [("lm_head.weight", state["model.embed_tokens.weight"])]


@pytest.mark.parametrize(
    ("arch", "tied"), VARIANTS, ids=[f"{a}-{'tied' if t else 'untied'}" for a, t in VARIANTS]
)
def test_refits_match_transformers_and_a_fresh_engine(arch, tied, extra_engine):
    path = ensure_tiny_model(spec(arch, tied))
    hf_model = load_hf(path)
    assert (hf_model.lm_head.weight is hf_model.model.embed_tokens.weight) == tied
    base = trainer_weights(hf_model)
    assert ("lm_head.weight" in base) == (not tied)

    ro = extra_engine(path)
    fresh = greedy(ro)
    assert_matches_transformers(hf_model, base, fresh)
    state, previous = base, fresh
    for k in range(1, NUM_REFITS + 1):
        state = step(state, seed=1000 * k + len(arch))
        named = with_tied_head(state) if tied and k == 2 else list(state.items())
        stats = ro.update_weights(named, version=k)
        assert stats.num_buckets >= 2  # 1 MB buckets: layers straddle bucket boundaries
        samples = greedy(ro)
        assert [s.token_ids for s in samples] != [s.token_ids for s in previous], (
            f"refit {k} changed nothing"
        )
        assert_matches_transformers(hf_model, state, samples)
        previous = samples
    ro.update_weights(base.items(), version=NUM_REFITS + 1)
    back = greedy(ro)
    for b, f in zip(back, fresh):
        assert b.token_ids == f.token_ids, (
            f"prompt {b.prompt_index}: refitted back {b.token_ids} vs fresh {f.token_ids}"
        )
        torch.testing.assert_close(
            torch.tensor(b.logprobs), torch.tensor(f.logprobs), atol=FRESH_ATOL, rtol=0
        )


def test_a_stale_tied_head_is_caught(extra_engine, tmp_path):
    """The bug put back (tests/engine/stale_head_extension.py: the reload alone). A fresh engine on
    perturbed tied-Llama weights agrees with transformers; after one refit that changes the embedding
    the engine embeds with the new weights and un-embeds with the old: transformers disagrees."""
    path = ensure_tiny_model(spec("llama", True))
    hf_model = load_hf(path)
    w1 = step(trainer_weights(hf_model), seed=1)
    with torch.no_grad():
        for name, param in hf_model.named_parameters():
            param.copy_(w1[name].to(torch.float64))
    hf_model.to(torch.float32).save_pretrained(tmp_path, safe_serialization=True)
    hf_model.to(torch.float64)
    ro_path = tmp_path
    from rollout.tiny_model import build_tokenizer

    build_tokenizer().save_pretrained(ro_path)
    ro = extra_engine(ro_path, worker_extension="stale_head_extension.KeepStaleTiedHead")
    assert_matches_transformers(hf_model, w1, greedy(ro))  # fresh engine == transformers
    w2 = step(w1, seed=2)
    ro.update_weights(w2.items(), version=1)
    with pytest.raises(AssertionError):
        assert_matches_transformers(hf_model, w2, greedy(ro))
