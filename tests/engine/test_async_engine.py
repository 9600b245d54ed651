"""The async engine (vLLM's AsyncLLM on a background loop) against real vLLM (CPU build) on the tiny
model: the sync engine's samples for the same seeds, the three pause modes around a refit, equality
with a fresh engine after refits (stale prefix blocks included), close() with requests in flight.

One async engine serves the session (`async_engine`, tests/conftest.py); the fresh engine of the
equality test is started once more from disk and is the one closed with requests in flight.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

import helpers
import psutil
import pytest
import torch
from helpers import ASYNC_TEST_ENGINE_CFG, child_pids
from test_engine_vllm import LONG_PROMPT, PROMPTS, perturbed

from rollout import CacheReset, PauseMode, build_rollout

# Long enough that a batch is still running when the refit comes (~0.3 s in), short enough to stay fast.
SPAN = dict(n=4, max_tokens=300, temperature=1.0)
SPAN_PROMPTS = ["12+7="] * 8


@contextlib.contextmanager
def configured(ro, **changes):
    original = ro.cfg
    ro.cfg = dataclasses.replace(original, **changes)
    try:
        yield ro
    finally:
        ro.cfg = original


def refit_mid_batch(ro, state, version, seed):
    """Submit a long batch, refit while it runs, return its samples."""
    handle = ro.submit(SPAN_PROMPTS, seed=seed, **SPAN)
    time.sleep(0.3)
    assert not handle.done(), "the batch finished before the refit: nothing was in flight"
    ro.update_weights(state.items(), version=version)
    return handle.result()


greedy = helpers.greedy


def test_same_samples_as_the_sync_engine_for_the_same_seeds(engine, async_engine, base_state):
    engine.update_weights(base_state.items(), version=1)
    async_engine.update_weights(base_state.items(), version=1)
    prompts = ["The quick", "12+7=", engine.tokenizer.encode("def f(x):")]
    want = engine.generate(prompts, n=4, max_tokens=12, temperature=1.0, seed=3)
    got = async_engine.generate(prompts, n=4, max_tokens=12, temperature=1.0, seed=3)
    assert [(s.prompt_index, s.prompt_token_ids, s.token_ids, s.text) for s in got] == [
        (s.prompt_index, s.prompt_token_ids, s.token_ids, s.text) for s in want
    ]
    for g, w in zip(got, want):
        torch.testing.assert_close(
            torch.tensor(g.logprobs), torch.tensor(w.logprobs), atol=1e-5, rtol=0
        )
    assert {s.version for s in got} == {1} and all(
        s.token_versions == [1] * len(s.token_ids) for s in got
    )


def test_keep_tags_requests_spanning_a_refit_with_both_versions(async_engine, base_state):
    async_engine.update_weights(base_state.items(), version=10)
    with configured(async_engine, pause_mode=PauseMode.keep):
        samples = refit_mid_batch(async_engine, perturbed(base_state, seed=11), version=11, seed=1)
    spanning = [s for s in samples if set(s.token_versions) == {10, 11}]
    assert spanning, "no request ran across the refit"
    for s in samples:
        assert s.token_versions == sorted(s.token_versions) and len(s.token_versions) == len(
            s.token_ids
        )
        assert s.version == s.token_versions[0]  # a sample is as old as its oldest token


def test_abort_resubmits_so_no_request_spans_a_refit(async_engine, base_state):
    async_engine.update_weights(base_state.items(), version=20)
    with configured(async_engine, pause_mode=PauseMode.abort):
        samples = refit_mid_batch(async_engine, perturbed(base_state, seed=21), version=21, seed=2)
    assert len(samples) == len(SPAN_PROMPTS) * SPAN["n"]
    assert all(
        len(set(s.token_versions)) == 1 and s.token_versions[0] == s.version for s in samples
    )
    assert 21 in {s.version for s in samples}, (
        "nothing was aborted and resubmitted on the new weights"
    )


def test_wait_lets_requests_finish_on_the_old_weights(async_engine, base_state):
    async_engine.update_weights(base_state.items(), version=30)
    with configured(async_engine, pause_mode=PauseMode.wait):
        samples = refit_mid_batch(async_engine, perturbed(base_state, seed=31), version=31, seed=3)
    assert {v for s in samples for v in s.token_versions} == {30}
    assert async_engine.version == 31 and {s.version for s in greedy(async_engine)} == {31}


@pytest.fixture(scope="module")
def fresh_async(tiny_path, base_state, tmp_path_factory):
    """An async engine started from disk on the target weights (seed 41): the reference of the equality
    test, then closed with requests in flight by the close test."""
    from transformers import AutoModelForCausalLM

    target = perturbed(base_state, seed=41)
    model = AutoModelForCausalLM.from_pretrained(tiny_path, torch_dtype=torch.float32)
    model.load_state_dict(target)
    out = tmp_path_factory.mktemp("target")
    model.save_pretrained(out, safe_serialization=True)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny_path).save_pretrained(out)
    before = child_pids()
    ro = build_rollout(ASYNC_TEST_ENGINE_CFG, out)
    ro.spawned = [psutil.Process(p) for p in child_pids() - before]
    yield target, ro
    ro.close()  # idempotent: the close test has closed it already


@pytest.mark.parametrize("cache_reset", [CacheReset.auto, CacheReset.none])
def test_after_refits_equals_a_fresh_engine(async_engine, fresh_async, base_state, cache_reset):
    """Several refits (with a long prompt's blocks cached on the way) and then the target weights: greedy
    tokens and log-probs equal a fresh engine's. Without the prefix-cache reset the long prompt reuses
    blocks computed with older weights and differs: the reset is what makes it equal."""
    target, fresh = fresh_async
    prompts = PROMPTS + [LONG_PROMPT]
    expected = greedy(fresh, prompts, max_tokens=12)
    async_engine.update_weights(
        base_state.items(), version=41
    )  # (auto) no block of an earlier test stays
    with configured(async_engine, cache_reset=cache_reset):
        for version in range(42, 46):
            async_engine.update_weights(
                perturbed(base_state, seed=version).items(), version=version
            )
            greedy(
                async_engine, prompts, max_tokens=4
            )  # caches the long prompt's blocks with these weights
        async_engine.update_weights(target.items(), version=46)
        got = greedy(async_engine, prompts, max_tokens=12)
    same = [
        (
            g.token_ids == e.token_ids
            and torch.allclose(torch.tensor(g.logprobs), torch.tensor(e.logprobs), atol=1e-5)
        )
        for g, e in zip(got, expected)
    ]
    if cache_reset is CacheReset.auto:
        assert all(same), same
        assert {s.version for s in got} == {46}
    else:
        assert same[:-1] == [True] * len(PROMPTS) and not same[-1], (
            "stale prefix blocks changed nothing"
        )


def test_split_cores(monkeypatch):
    from rollout.async_engine import split_cores

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert split_cores(None) == ({0, 1}, {2, 3})  # half each
    assert split_cores(1) == ({0, 1, 2}, {3})
    assert split_cores(0) is None  # no split: vLLM's own binding
    with pytest.raises(ValueError, match="leaves the trainer no core"):
        split_cores(4)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {5})
    assert split_cores(None) is None and split_cores(1) is None  # one core: nothing to split


def test_engine_and_trainer_run_on_their_own_cores(async_engine):
    """rollout.engine_cores (default: half): vLLM's processes on the last cores, the loop and a thread inside
    off_engine_cores() on the rest; the worker sleeps after rollout.worker_idle_spin_s without work."""
    ro = async_engine
    if ro.trainer_cores is None:
        pytest.skip("one core: nothing to split")
    import os

    cores = (
        ro.engine.engine_core.resources.engine_manager.processes
    )  # the engine core; its worker below
    procs = [psutil.Process(p.pid) for p in cores]
    procs += [
        c
        for p in procs
        for c in p.children(recursive=True)
        if "resource_tracker" not in " ".join(c.cmdline())
    ]
    engine_cores = {c for p in procs for c in p.cpu_affinity()}
    assert len(procs) >= 2, procs
    assert engine_cores and not engine_cores & ro.trainer_cores, (engine_cores, ro.trainer_cores)
    assert os.sched_getaffinity(ro._thread.native_id) == ro.trainer_cores
    before = os.sched_getaffinity(0)
    with ro.off_engine_cores():
        assert os.sched_getaffinity(0) == ro.trainer_cores
    assert os.sched_getaffinity(0) == before
    readers = ro._call(
        ro.engine.collective_rpc("refit_set_idle_spin", args=(ro.cfg.worker_idle_spin_s,)), "spin"
    )
    assert all(n >= 1 for n in readers), readers


def test_close_with_requests_in_flight_returns_within_the_timeout(fresh_async):
    _, ro = fresh_async
    handle = ro.submit(["12+7="] * 16, n=8, max_tokens=400, seed=0)
    time.sleep(0.3)
    assert not handle.done()
    start = time.monotonic()
    ro.close()
    took = time.monotonic() - start
    assert took < ro.cfg.backend.shutdown_timeout_s, took
    with pytest.raises(RuntimeError, match="closed with the request in flight"):
        handle.result(timeout_s=1.0)
    _, alive = psutil.wait_procs(ro.spawned, timeout=30)
    assert not alive, f"processes survived close(): {alive}"
    assert not ro._thread.is_alive(), "the event loop thread survived close()"
    with pytest.raises(RuntimeError, match="closed"):
        ro.submit(["1+1="])
