"""LoRA refits are exact (issue 26): only the adapter travels, into vLLM's LoRA manager in memory.

For the tiny Qwen2 and Llama models, untied and tied, one fp32 engine each starts on the base weights
with LoRA enabled. It takes NUM_REFITS refits of a changing rank-8 adapter (PEFT's own tensors, by
`get_peft_model_state_dict`: no file written). After every one, its greedy tokens and log-probs equal
  (a) the same adapter loaded by vLLM itself from a PEFT directory (`save_pretrained`), the way a fresh
      engine loads an adapter (a LoRARequest naming the directory, another LoRA id), and
  (b) transformers with the adapter applied (PEFT, float64),
and the refit moved exactly the adapter's bytes. The base weights in the engine are never touched:
a request without a LoRA gives the base model's output after every refit.
"""

from __future__ import annotations

import dataclasses

import helpers
import pytest
import torch
from lora_helpers import LORA_CFG, REF_ATOL, adapter_bytes, lora_model, perturb_adapter

from rollout import build_rollout
from rollout.engine import lora_request
from rollout.refit import adapter_id
from rollout.tiny_model import TinyModelSpec, ensure_tiny_model

NUM_REFITS = 3
MAX_TOKENS = 12
VARIANTS = [(arch, tied) for arch in ("qwen2", "llama") for tied in (False, True)]


def sample(ro, lora):
    """One greedy sample per prompt with `lora` (a LoRARequest; None: the base model), bypassing the
    engine's own choice of its newest adapter."""
    from rollout.engine import prompt_inputs, sampling_params, to_samples

    outs = ro.llm.generate(
        prompt_inputs(helpers.PROMPTS),
        sampling_params(len(helpers.PROMPTS), 1, MAX_TOKENS, 0.0, None, 1.0),
        use_tqdm=False,
        lora_request=lora,
    )
    return [s for i, out in enumerate(outs) for s in to_samples(i, out, -1)]


def assert_same(a, b, what: str, atol: float = 1e-5) -> None:
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids, f"prompt {x.prompt_index}: {what}"
        torch.testing.assert_close(
            torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=atol, rtol=0
        )


@pytest.mark.parametrize(
    ("arch", "tied"), VARIANTS, ids=[f"{a}-{'tied' if t else 'untied'}" for a, t in VARIANTS]
)
def test_adapter_refits_match_vllms_own_adapter_load_and_transformers(arch, tied, tmp_path):
    path = ensure_tiny_model(
        TinyModelSpec(architecture=arch, tie_word_embeddings=tied, num_key_value_heads=1)
    )
    peft_model = lora_model(path, LORA_CFG, dtype=torch.float64)
    before = helpers.child_pids()
    # max_versions=2 plus one slot for the directory-loaded adapter of (a)
    cfg = dataclasses.replace(
        helpers.TEST_ENGINE_CFG,
        adapter=LORA_CFG,
        backend=dataclasses.replace(helpers.TEST_ENGINE_CFG.backend, max_loras=3),
    )
    ro = build_rollout(cfg, path)
    spawned = helpers.child_pids() - before
    try:
        base = helpers.greedy(ro, max_tokens=MAX_TOKENS)  # no refit yet: the base model
        previous = base
        for k in range(1, NUM_REFITS + 1):
            perturb_adapter(peft_model, seed=100 * k + len(arch))
            from peft import get_peft_model_state_dict

            tensors = {
                name: t.to(torch.float32)
                for name, t in get_peft_model_state_dict(peft_model).items()
            }
            stats = ro.update_weights(tensors.items(), version=k)
            assert stats.load_path == "adapter" and stats.num_bytes == adapter_bytes(tensors)
            assert stats.num_tensors == len(tensors) and ro.version == k
            refit = helpers.greedy(ro, max_tokens=MAX_TOKENS)
            assert [s.token_ids for s in refit] != [s.token_ids for s in previous], (
                f"refit {k} changed nothing"
            )
            assert all(s.version == k for s in refit)
            # (a) vLLM's own load of the same adapter from a PEFT directory
            adapter_dir = tmp_path / f"adapter-{k}"
            peft_model.save_pretrained(adapter_dir)
            from vllm.lora.request import LoRARequest

            from_dir = sample(ro, LoRARequest(f"dir-{k}", 1000 + k, str(adapter_dir)))
            assert_same(refit, from_dir, "in-memory refit vs vLLM's load from the directory")
            # (b) transformers with the adapter applied
            helpers.assert_matches_transformers(peft_model, refit, MAX_TOKENS, REF_ATOL)
            if k > 1:  # the version before stays registered (max_versions=2) and serves as it did
                assert_same(sample(ro, lora_request(adapter_id(k - 1), str(path))), previous, "v-1")
            # the workers keep the newest two refit versions and the directory-loaded adapters
            # vLLM's cache holds; the older refit versions are gone
            ids = set(ro.llm.collective_rpc("refit_lora_ids")[0])
            refit_ids = {adapter_id(v) for v in range(NUM_REFITS + 1)}
            assert ids & refit_ids == {adapter_id(k), adapter_id(max(k - 1, 1))}
            previous = refit
        # the base weights were never touched
        assert_same(sample(ro, None), base, "base model after adapter refits")
    finally:
        ro.close()
    assert not helpers.wait_gone(spawned), "the LoRA engine's processes survived close()"
