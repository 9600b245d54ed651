"""mode=direct into the live vLLM (CPU) engine: one in-place reload fed from views of the trainer's own tensors.

The trainer-side tensors persist across refits and change in place between them, as a trainer's do. After a
refit the engine must own its weights: writing the trainer's tensors without a refit changes nothing."""

from __future__ import annotations

import dataclasses

import torch
from test_engine_vllm import PROMPTS, assert_matches_reference, greedy, perturbed

from rollout.transfer import TransferMode


def test_direct_refits_track_in_place_updates_and_reallocations(engine, hf_model, base_state):
    original = engine.refitter.transfer
    state = {
        k: v.clone() for k, v in perturbed(base_state, seed=7).items()
    }  # the "trainer's" tensors
    try:
        engine.refitter.transfer = dataclasses.replace(original, mode=TransferMode.direct)
        for version in range(300, 306):
            if version == 303:  # a re-allocated parameter: a new storage under the same name
                name = "model.layers.0.mlp.down_proj.weight"
                state[name] = state[name].clone()
            stats = engine.update_weights(state.items(), version=version)
            assert stats.version == version and stats.num_buckets == 0 and stats.detached_bytes == 0
            assert stats.num_tensors == len(state)
            assert all(
                t.untyped_storage().is_shared() for t in state.values()
            )  # moved in place, once
            samples = greedy(engine, PROMPTS[:2], max_tokens=10)
            assert_matches_reference(hf_model, state, samples)
            before = [s.token_ids for s in greedy(engine, PROMPTS, max_tokens=16)]
            expected = {k: v.clone() for k, v in state.items()}
            with torch.no_grad():  # the next "optimizer step", in place, with no refit yet
                for t in state.values():
                    t.mul_(1.5).add_(0.01)
            assert [
                s.token_ids for s in greedy(engine, PROMPTS, max_tokens=16)
            ] == before  # no aliasing
            assert_matches_reference(hf_model, expected, greedy(engine, PROMPTS[:1], max_tokens=6))
            with (
                torch.no_grad()
            ):  # back near the model, so the next refit's output stays meaningful
                for k, t in state.items():
                    t.copy_(perturbed({k: base_state[k]}, seed=version)[k])
        # the bucketed mode still works on the same engine afterwards
        engine.refitter.transfer = original
        assert engine.update_weights(state.items(), version=310).num_buckets >= 2
        assert_matches_reference(hf_model, state, greedy(engine, PROMPTS[:2], max_tokens=10))
    finally:
        engine.refitter.transfer = original
