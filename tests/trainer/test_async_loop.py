"""trainer.max_staleness: the stale-group filter (pure), and short GRPO runs on the session's async
engine (real vLLM AsyncLLM on the CPU) where generation runs ahead of training."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
from trainer_helpers import compose_typed, small_run_config

from rollout import PauseMode
from rollout.api import Sample
from trainers.async_rollouts import drop_stale_groups
from trainers.ppo import run
from trainers.tasks import Example


def _samples(versions_per_prompt: list[list[int]]) -> list[Sample]:
    return [
        Sample(i, [1], [2], [-0.5], "x", v)
        for i, versions in enumerate(versions_per_prompt)
        for v in versions
    ]


def test_groups_with_a_too_stale_sample_are_dropped_and_counted():
    examples = [Example(f"p{i}", str(i), "") for i in range(3)]
    samples = _samples([[4, 4], [3, 4], [4, 5]])  # step 6: the policy has had 5 updates
    kept_examples, kept, dropped = drop_stale_groups(
        examples, samples, step=6, max_staleness=1, group_size=2
    )
    assert [e.prompt for e in kept_examples] == ["p0", "p2"] and dropped == 2
    assert [(s.prompt_index, s.version) for s in kept] == [
        (0, 4),
        (0, 4),
        (1, 4),
        (1, 5),
    ]  # re-indexed
    assert all((6 - 1) - s.version <= 1 for s in kept)


def test_a_batch_with_nothing_fresh_enough_raises():
    with pytest.raises(RuntimeError, match="more than 1 versions old"):
        drop_stale_groups(
            [Example("p", "1", "")], _samples([[1, 1]]), step=6, max_staleness=1, group_size=2
        )


def test_max_staleness_needs_the_async_engine_and_a_refit_every_step():
    with pytest.raises(ValueError, match="rollout.engine=async"):
        compose_typed(["trainer.max_staleness=1"])
    with pytest.raises(ValueError, match="trainer.refit_every=1"):
        compose_typed(["rollout.engine=async", "trainer.max_staleness=1", "trainer.refit_every=2"])
    with pytest.raises(ValueError, match="trainer.max_staleness"):
        compose_typed(["rollout.engine=async", "trainer.max_staleness=-1"])


@pytest.mark.parametrize("pause_mode", [PauseMode.keep, PauseMode.abort])
def test_every_trained_sample_is_within_max_staleness(async_engine, tmp_path, pause_mode):
    """k=1: from step 2 on, each batch was generated while the previous step trained (lag exactly 1 for
    its oldest tokens, overlap > 0); nothing older than one version is trained on; logs carry it all."""
    cfg = small_run_config(
        tmp_path,
        "rollout.engine=async",
        "trainer.max_staleness=1",
        "trainer.total_steps=4",
        f"rollout.pause_mode={pause_mode.value}",
        "logger=[console,jsonl,tensorboard]",
    )
    original = async_engine.cfg
    async_engine.cfg = dataclasses.replace(original, pause_mode=pause_mode)
    cores = os.sched_getaffinity(0)
    try:
        summary = run(cfg, rollout=async_engine)
    finally:
        async_engine.cfg = original
    assert os.sched_getaffinity(0) == cores, (
        "the trainer's thread stayed on the trainer's cores after the run"
    )
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["version_lag"] == 0  # the first batch waits for nothing older than the start
    assert all(
        r["version_lag"] <= 1 and 0 <= r["version_lag/mean"] <= r["version_lag"] for r in rows
    )
    assert all(r["rollout/dropped"] == 0 for r in rows)
    if (
        pause_mode is PauseMode.keep
    ):  # each batch's first tokens come from the weights before the last refit
        assert all(r["version_lag"] == 1 for r in rows[1:]), (
            "a batch was not generated ahead of its step"
        )
    assert any(r["timing/overlap_s"] > 0 for r in rows[1:]), "generation never overlapped training"
    assert summary["max_version_lag"] <= 1 and summary["dropped_samples"] == 0
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def _rows(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_async_engines_train_within_max_staleness(tmp_path):
    """rollout.engine=async with rollout.num_engines=2: an EngineGroup of two AsyncLLMs behind the same API,
    each batch split between them and generated ahead of its step; one refit feeds both."""
    cfg = small_run_config(
        tmp_path,
        "rollout.engine=async",
        "rollout.num_engines=2",
        "trainer.max_staleness=1",
        "trainer.total_steps=3",
    )
    summary = run(cfg)
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["version_lag"] <= 1 for r in rows) and rows[-1]["version_lag"] == 1, rows
    assert summary["dropped_samples"] == 0 and all(r["logprob_gap"] is not None for r in rows)
