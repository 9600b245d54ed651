"""rollout.num_engines=2: two vLLM engines behind the one-engine API, fed by one refit. Seed for seed they
sample what the session's single engine samples, before and after a refit; a failed refit stops both."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_engine_vllm import PROMPTS, assert_matches_reference, greedy, perturbed

from rollout import EngineGroup, RefitError
from rollout.engine_group import split

BATCH = [*PROMPTS, "a", "Once upon a time"]  # 5 prompts: engine 0 gets 2, engine 1 gets 3


@pytest.fixture(scope="module")
def group(module_rollout, engine, tiny_path):
    """The session engine's settings, twice."""
    return module_rollout(dataclasses.replace(engine.cfg, num_engines=2), tiny_path)


def test_split_is_contiguous_and_even():
    assert split(5, 2) == [(0, 2), (2, 5)]
    assert split(1, 2) == [(0, 0), (0, 1)]
    assert split(0, 3) == [(0, 0)] * 3


def _same_samples(got, expected):
    assert [(s.prompt_index, s.prompt_token_ids, s.token_ids) for s in got] == [
        (s.prompt_index, s.prompt_token_ids, s.token_ids) for s in expected
    ]
    for g, e in zip(got, expected):
        torch.testing.assert_close(
            torch.tensor(g.logprobs), torch.tensor(e.logprobs), atol=1e-5, rtol=0
        )


def test_two_engines_sample_what_one_engine_samples_before_and_after_a_refit(
    group, engine, hf_model, base_state
):
    assert isinstance(group, EngineGroup) and len(group.engines) == 2
    for version, state in [(1, base_state), (2, perturbed(base_state, seed=8))]:
        stats = group.update_weights(state.items(), version=version)
        assert len(stats.worker_load_s) == 2 and stats.version == version  # one receiver per engine
        engine.update_weights(state.items(), version=version)
        expected = engine.generate(BATCH, n=3, max_tokens=8, temperature=1.0, seed=11)
        got = group.generate(BATCH, n=3, max_tokens=8, temperature=1.0, seed=11)
        _same_samples(got, expected)
        assert {s.version for s in got} == {version}
        assert_matches_reference(hf_model, state, greedy(group))
    assert (
        len(group.generate(["12+7="], n=2, max_tokens=4, seed=1)) == 2
    )  # fewer prompts than engines


def _failing_midway(named, after: int):
    for i, item in enumerate(named):
        if i == after:
            raise RuntimeError("the trainer died mid-refit")
        yield item


def test_a_failed_refit_stops_every_engine_until_a_good_one(group, hf_model, base_state):
    state = perturbed(base_state, seed=12)
    with pytest.raises(RefitError, match="version 12"):
        group.update_weights(
            _failing_midway(list(state.items()), after=len(state) // 2), version=12
        )
    for engine in group.engines:  # every engine refuses, not only the one that was mid-load
        with pytest.raises(RefitError, match="version 12 failed midway"):
            engine.generate(["x"], max_tokens=2)
    with pytest.raises(RefitError, match="version 12 failed midway"):
        group.generate(BATCH, max_tokens=2)
    group.update_weights(state.items(), version=13)
    assert {s.version for s in greedy(group)} == {13}
    assert_matches_reference(hf_model, state, greedy(group))


def test_sleep_and_wake_apply_to_every_engine(group, base_state):
    group.update_weights(base_state.items(), version=14)
    group.sleep()
    assert all(e.state.asleep for e in group.engines)
    with pytest.raises(RuntimeError, match="asleep"):
        group.generate(BATCH, max_tokens=2)
    group.wake_up()
    assert greedy(group)[0].version == 14
    group.sleep()
    group.update_weights(base_state.items(), version=15)  # wakes them all
    assert not any(e.state.asleep for e in group.engines) and greedy(group)[0].version == 15


def test_bad_num_engines_is_rejected():
    from rollout import RolloutConfig

    with pytest.raises(ValueError, match="rollout.num_engines must be an integer >= 1, got 0"):
        RolloutConfig(num_engines=0)
