"""The async engine's version gates (rollout/vllm_compat.py), on both sides of each boundary, and the
installed AsyncLLM's signatures checked against the calls the engine makes (no engine started)."""

from __future__ import annotations

import inspect

import pytest

from rollout.cache_reset import ASYNC_LLM_CALLS, Cache, caches_to_reset
from rollout.vllm_compat import (
    fully_awake,
    has_weight_versions,
    installed_vllm_version,
    pause_generation_kwargs,
    renders_in_one_call,
    token_versions,
)


@pytest.mark.parametrize(
    ("version", "expected"), [("0.24.0", False), ("0.31.9", False), ("0.32.0+cpu", True)]
)
def test_weight_versions_gate(version, expected):
    assert has_weight_versions(version) is expected


@pytest.mark.parametrize(("version", "expected"), [("0.24.0", False), ("0.32.0+cpu", True)])
def test_batch_render_gate(version, expected):
    assert renders_in_one_call(version) is expected


@pytest.mark.parametrize(
    ("result", "version", "expected"),
    [(None, "0.24.0", None), (True, "0.32.0", True), (False, "0.32.0", False)],
)
def test_async_wake_up_gate(result, version, expected):
    """AsyncLLM.wake_up returns None on 0.24 (it does not say) and "fully awake" on 0.32, like the LLM's."""
    assert fully_awake(result, version) is expected


def _completion(num_tokens, spans):
    from vllm.outputs import CompletionOutput, WeightVersionSpan

    return CompletionOutput(
        index=0,
        text="",
        token_ids=list(range(num_tokens)),
        cumulative_logprob=None,
        logprobs=None,
        weight_versions=[WeightVersionSpan(str(v), s, e) for v, s, e in spans],
    )


def test_token_versions_from_vllm_spans():
    completion = _completion(
        5, [(3, 0, 2), (4, 2, 5)]
    )  # a request kept running across the refit to 4
    assert token_versions(completion, "0.32.0") == [3, 3, 4, 4, 4]
    assert (
        token_versions(completion, "0.24.0") is None
    )  # 0.24 has no spans: the engine labels the sample
    assert token_versions(_completion(0, []), "0.32.0") is None


@pytest.mark.parametrize("mode", ["abort", "wait", "keep"])
def test_pause_generation_kwargs_fit_the_installed_signature(mode):
    from vllm.v1.engine.async_llm import AsyncLLM

    kwargs = pause_generation_kwargs(mode)
    assert kwargs == {
        "mode": mode,
        "clear_cache": False,
    }  # the policy, not vLLM, resets caches after a refit
    inspect.signature(AsyncLLM.pause_generation).bind(
        None, **kwargs
    )  # raises TypeError if vLLM changed it


def test_pause_generation_kwargs_reject_unknown_mode():
    with pytest.raises(ValueError, match="'later'"):
        pause_generation_kwargs("later")


def test_async_llm_has_every_call_the_engine_makes():
    from vllm.v1.engine.async_llm import AsyncLLM

    calls = [
        "generate",
        "pause_generation",
        "resume_generation",
        "sleep",
        "wake_up",
        "collective_rpc",
        "shutdown",
        *ASYNC_LLM_CALLS.values(),
    ]
    if has_weight_versions(installed_vllm_version()):
        calls.append("update_weight_version")
    assert [c for c in calls if not callable(getattr(AsyncLLM, c, None))] == []
    inspect.signature(AsyncLLM.reset_prefix_cache).bind(None, reset_running_requests=True)
    inspect.signature(AsyncLLM.sleep).bind(None, 1, mode="keep")


def test_encoder_reset_after_sleep_reaches_the_async_llm_calls():
    """colocate, after a sleep: the encoder cache is reset on the AsyncLLM itself (it has no llm_engine),
    each coroutine awaited by `run`; a vLLM before 0.17 keeps its encoder cache, logged."""

    class AsyncStandIn:  # the three AsyncLLM coroutines, recording their calls
        def __init__(self):
            self.calls = []

        async def reset_prefix_cache(self, reset_running_requests=False):
            self.calls.append(("prefix", reset_running_requests))
            return True

        async def reset_encoder_cache(self):
            self.calls.append(("encoder",))

        async def reset_mm_cache(self):
            self.calls.append(("mm",))

    import asyncio

    wanted = caches_to_reset("auto", "colocate", "0.24.0", multimodal=False, after_sleep=True)
    assert wanted == (Cache.prefix, Cache.encoder)
    engine = AsyncStandIn()
    from types import SimpleNamespace

    from rollout.async_engine import AsyncVllmRollout

    rollout = SimpleNamespace(
        engine=engine, vllm_version="0.24.0"
    )  # what the engine's reset reads of itself
    done = asyncio.run(AsyncVllmRollout._reset_caches_async(rollout, wanted))
    assert done == wanted and engine.calls == [("prefix", True), ("encoder",)]


def test_pause_shortcut_fits_the_installed_engine_core_client():
    """The refit pauses through AsyncLLM's engine-core client where vLLM tags weight versions (0.32:
    pause_generation less its closing sleep): the call and its arguments are there."""
    if not has_weight_versions(installed_vllm_version()):
        pytest.skip("vLLM before weight versions: the refit calls AsyncLLM.pause_generation")
    from vllm.v1.engine.core_client import AsyncMPClient

    for mode in ("abort", "wait", "keep"):
        inspect.signature(AsyncMPClient.pause_scheduler_async).bind(
            None, **pause_generation_kwargs(mode)
        )
