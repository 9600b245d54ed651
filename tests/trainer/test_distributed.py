"""Sharded trainer ranks on Ray (FSDP2 over gloo): a refit from the shards, checkpoints, a killed rank."""

from __future__ import annotations

import dataclasses
import time

import psutil
import pytest
import torch

from trainers.config import AlgorithmConfig, TrainerConfig
from trainers.distributed.learner import ShardedLearner
from trainers.policy import collate

ALG = AlgorithmConfig(num_minibatches=2)
TRAINER = TrainerConfig(micro_batch_size=2)
PROMPTS = ["1+2=", "3+4=", "0+5=", "2+2=", "4+1=", "3+3="]


def sampled_batch(ro, seed: int, n: int = 2):
    samples = ro.generate(PROMPTS, n=n, max_tokens=4, temperature=1.0, seed=seed)
    batch = collate([s.prompt_token_ids for s in samples], [s.token_ids for s in samples], pad_id=0,
                    sampler_logprobs=[s.logprobs for s in samples])
    return batch, samples


def one_update(learner, batch, seed: int) -> dict:
    logp, _, ref, values = learner.scores(batch)
    advantages = torch.linspace(-1, 1, batch.tokens.shape[0])[:, None] * batch.mask
    return learner.update(batch, logp, ref, values, advantages, None, seed=seed)


def mean_gap(logp, batch) -> float:
    return float(((logp - batch.sampler_logprobs).abs() * batch.mask).sum() / batch.mask.sum())


def test_refit_from_two_sharded_ranks_gives_the_engine_the_gathered_weights(trainer_engine, ray_session, tiny_path):
    ro = trainer_engine
    transfer = ro.transfer
    ro.transfer = dataclasses.replace(transfer, bucket_mb=1)  # smaller than the model: several buckets
    try:
        with ShardedLearner(str(tiny_path), ALG, TRAINER, ray_session, num_workers=2) as learner:
            learner.freeze_reference()
            batch, _ = sampled_batch(ro, seed=1)
            one_update(learner, batch, seed=1)
            stats = learner.refit(ro, version=101)
            after, samples = sampled_batch(ro, seed=2)
            assert {s.version for s in samples} == {101}
            _, raw_logp, _, _ = learner.scores(after)
            gap = mean_gap(raw_logp, after)
            stale_gap = mean_gap(learner.scores(batch)[1], batch)  # the pre-update engine's samples
            peak, largest = learner.last_refit["gather_peak_bytes"], learner.last_refit["largest_tensor_bytes"]
    finally:
        ro.transfer = transfer
    assert stats.num_buckets >= 2 and stats.num_tensors == 27
    assert gap < 1e-5, f"engine and sharded trainer disagree after the refit: mean |dlogp| {gap}"
    assert stale_gap > 100 * gap, "the update did not change the weights: the refit test proves nothing"
    # Never a full model copy: what the gather held at once is a bucket's tensors plus one look-ahead tensor.
    assert peak <= (1 << 20) + largest < stats.num_bytes, (peak, largest, stats.num_bytes)


def test_resume_from_a_two_rank_checkpoint_on_three_ranks_reproduces_the_next_step(trainer_engine, ray_session,
                                                                                   tiny_path, tmp_path):
    first, _ = sampled_batch(trainer_engine, seed=3)
    second, _ = sampled_batch(trainer_engine, seed=4)
    with ShardedLearner(str(tiny_path), ALG, TRAINER, ray_session, num_workers=2) as learner:
        learner.freeze_reference()
        one_update(learner, first, seed=1)
        learner.save(str(tmp_path / "step_1"))
        expected = one_update(learner, second, seed=2)
        expected_logp = learner.scores(second)[0]
    with ShardedLearner(str(tiny_path), ALG, TRAINER, ray_session, num_workers=3) as learner:
        learner.load(str(tmp_path / "step_1"))  # DCP reshards the 2-rank shards to 3 ranks
        resumed = one_update(learner, second, seed=2)
        resumed_logp = learner.scores(second)[0]
    for key in ("loss", "entropy", "kl", "grad_norm", "clip_frac"):
        assert resumed[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key
    assert (resumed_logp - expected_logp).abs().max() < 1e-5


def rank_processes() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"]) if (p.info["cmdline"] or [""])[0].startswith("ray::TrainerRank")]


def test_a_killed_rank_stops_the_step_with_a_clear_error_and_close_leaves_no_rank(trainer_engine, ray_session, tiny_path):
    import ray

    batch, _ = sampled_batch(trainer_engine, seed=5)
    before = {p.pid for p in rank_processes()}
    with pytest.raises(RuntimeError, match="a trainer rank died") as failure:
        with ShardedLearner(str(tiny_path), ALG, TRAINER, ray_session, num_workers=2) as learner:
            ranks = {p.pid for p in rank_processes()} - before
            assert len(ranks) == 2
            ray.kill(learner.ranks[1], no_restart=True)
            start = time.monotonic()
            one_update(learner, batch, seed=1)
    assert time.monotonic() - start < ray_session.timeout_s
    assert "score" in str(failure.value)  # names the call that found the rank dead
    deadline = time.monotonic() + 30
    while {p.pid for p in rank_processes()} & ranks and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not {p.pid for p in rank_processes()} & ranks, "a trainer rank outlived the learner"
    assert ray.util.placement_group_table() and all(
        pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values()), "the placement group stayed"
