"""Sharded trainer ranks on Ray (FSDP2 over gloo): a refit from the shards, checkpoints, a killed rank."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import psutil
import pytest
import torch
from trainer_helpers import small_run_config
from vllm_shm import vllm_segments_held_by, vllm_segments_left

from trainers.checkpoint import load_checkpoint
from trainers.config import AlgorithmConfig, TrainerConfig
from trainers.distributed.learner import ShardedLearner
from trainers.policy import collate
from trainers.ppo import run

ALG = AlgorithmConfig(num_minibatches=2)
TRAINER = TrainerConfig(micro_batch_size=2)
PROMPTS = ["1+2=", "3+4=", "0+5=", "2+2=", "4+1=", "3+3="]


def sampled_batch(ro, seed: int, n: int = 2):
    samples = ro.generate(PROMPTS, n=n, max_tokens=4, temperature=1.0, seed=seed)
    batch = collate(
        [s.prompt_token_ids for s in samples],
        [s.token_ids for s in samples],
        pad_id=0,
        sampler_logprobs=[s.logprobs for s in samples],
    )
    return batch, samples


def one_update(learner, batch, seed: int) -> dict:
    advantages = torch.linspace(-1, 1, batch.tokens.shape[0])[:, None] * batch.mask
    return learner.update(batch, learner.logprobs(batch), advantages, None, seed=seed)


def ray_overrides(ray_cfg) -> list[str]:
    return [
        f"ray.address={ray_cfg.address}",
        f"ray.cpus_per_worker={ray_cfg.cpus_per_worker}",
        f"ray.timeout_s={ray_cfg.timeout_s}",
    ]


def mean_gap(logp, batch) -> float:
    return float(((logp - batch.sampler_logprobs).abs() * batch.mask).sum() / batch.mask.sum())


def test_refit_from_two_sharded_ranks_gives_the_engine_the_gathered_weights(
    trainer_engine, ray_session, tiny_path
):
    ro = trainer_engine
    transfer = ro.refitter.transfer
    ro.refitter.transfer = dataclasses.replace(
        transfer, bucket_mb=1
    )  # smaller than the model: several buckets
    try:
        with ShardedLearner(str(tiny_path), ALG, TRAINER, ray_session, num_workers=2) as learner:
            learner.freeze_reference()
            batch, _ = sampled_batch(ro, seed=1)
            one_update(learner, batch, seed=1)
            stats = ro.refit(101, learner.send)
            after, samples = sampled_batch(ro, seed=2)
            assert {s.version for s in samples} == {101}
            gap = mean_gap(learner.logprobs(after).raw_logp, after)
            stale_gap = mean_gap(
                learner.logprobs(batch).raw_logp, batch
            )  # the pre-update engine's samples
            peak, largest = (
                learner.last_refit["gather_peak_bytes"],
                learner.last_refit["largest_tensor_bytes"],
            )
    finally:
        ro.refitter.transfer = transfer
    assert stats.num_buckets >= 2 and stats.num_tensors == 27
    assert gap < 1e-5, f"engine and sharded trainer disagree after the refit: mean |dlogp| {gap}"
    assert stale_gap > 100 * gap, (
        "the update did not change the weights: the refit test proves nothing"
    )
    # Never a full model copy: what the gather held at once is a bucket's tensors plus one look-ahead tensor.
    assert peak <= (1 << 20) + largest < stats.num_bytes, (peak, largest, stats.num_bytes)


def step_records(out_dir):
    return load_checkpoint(out_dir / "checkpoints")["history"]


def test_two_workers_train_their_first_step_like_one(trainer_engine, ray_session, tmp_path):
    one = small_run_config(tmp_path / "one", "trainer.total_steps=1")
    two = small_run_config(
        tmp_path / "two",
        "trainer.total_steps=1",
        "trainer.num_workers=2",
        *ray_overrides(ray_session),
    )
    run(one, rollout=trainer_engine)
    run(two, rollout=trainer_engine)
    (a,), (b,) = step_records(tmp_path / "one"), step_records(tmp_path / "two")
    assert (
        b["reward/mean"] == a["reward/mean"]
    )  # the same samples: the warm-started weights agree to fp noise
    for key in ("loss", "entropy", "kl", "grad_norm", "clip_frac", "ppo_kl"):
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    assert a["logprob_gap"] < 1e-5 and b["logprob_gap"] < 1e-5, (a["logprob_gap"], b["logprob_gap"])
    # the sharded refit reports its gather's peak (here the model fits one bucket: all of it; with smaller
    # buckets, far less: test_refit_from_two_sharded_ranks...)
    model_mb = b["refit/gbps"] * 1e9 * b["timing/refit_s"] / 2**20  # the bytes this refit sent
    assert (
        a.get("refit/gather_peak_mb") is None and 0 < b["refit/gather_peak_mb"] <= model_mb * 1.001
    ), b


RESUME_SHAPE = [
    "trainer.prompts_per_step=3",
    "trainer.warmup_batch_size=6",
    "trainer.checkpoint_every=1",
]
# 12 samples, minibatches of 6: a multiple of 2 and of 3 ranks


@pytest.fixture(scope="module")
def two_worker_run(trainer_engine, ray_session, tmp_path_factory):
    """One 2-step, 2-worker run with a checkpoint after each step, shared by the resume tests."""
    out = tmp_path_factory.mktemp("two_workers")
    run(
        small_run_config(
            out,
            "trainer.total_steps=2",
            "trainer.num_workers=2",
            *RESUME_SHAPE,
            *ray_overrides(ray_session),
        ),
        rollout=trainer_engine,
    )
    assert (out / "checkpoints" / "step_000001" / "shards" / ".metadata").is_file()
    return out


@pytest.mark.parametrize("num_workers", [3, 1])
def test_a_two_worker_checkpoint_resumes_on_another_count_and_reproduces_the_next_step(
    trainer_engine, ray_session, two_worker_run, tmp_path, num_workers
):
    cfg = small_run_config(
        tmp_path,
        "trainer.total_steps=2",
        f"trainer.num_workers={num_workers}",
        *RESUME_SHAPE,
        *ray_overrides(ray_session),
        f"trainer.resume={two_worker_run / 'checkpoints' / 'step_000001'}",
    )
    run(
        cfg, rollout=trainer_engine
    )  # DCP reshards the 2 ranks' shards onto 3 ranks, or into one process
    expected, got = step_records(two_worker_run)[1], step_records(tmp_path)[1]
    assert got["step"] == expected["step"] == 2
    assert got["reward/mean"] == expected["reward/mean"]
    for key in ("loss", "entropy", "kl", "grad_norm"):
        assert got[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key


def rank_processes(actor: str = "TrainerRank") -> list[psutil.Process]:
    return [
        p
        for p in psutil.process_iter(["cmdline"])
        if (p.info["cmdline"] or [""])[0].startswith(f"ray::{actor}")
    ]


def vllm_processes() -> set[int]:
    return {
        p.pid
        for p in psutil.process_iter(["name", "cmdline"])
        if (p.info["name"] or "").startswith("VLLM::")
        or (p.info["cmdline"] or [""])[0].startswith("VLLM::")
    }


def test_a_killed_rank_stops_the_step_with_a_clear_error_and_close_leaves_no_rank(
    trainer_engine, ray_session, tiny_path
):
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
        pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values()
    ), "the placement group stayed"


def ray_processes() -> set[int]:
    """Every Ray process on the host: its daemons (gcs_server, raylet, monitors) and its workers (ray::...)."""
    found = set()
    for p in psutil.process_iter(["name", "cmdline"]):
        cmd = p.info["cmdline"] or [""]
        if (
            p.info["name"] in ("raylet", "gcs_server")
            or cmd[0].startswith("ray::")
            or any("site-packages/ray/" in part for part in cmd)
        ):
            found.add(p.pid)
    return found


@pytest.mark.parametrize(
    ("victim", "message"),
    [("TrainerRank", "a trainer rank died"), ("EngineHost", "the rollout engine actor died")],
)
def test_a_killed_rank_ends_a_run_with_a_clear_error_and_no_ray_process_outlives_it(
    tmp_path, tiny_path, victim, message
):
    """A real run (its own local Ray; the engine a Ray actor on rank 0's bundle; in a subprocess): SIGKILL a
    trainer rank, or the engine's actor, after step 1."""
    import os
    import signal
    import subprocess
    import sys

    from trainer_helpers import ROOT

    before, segments = (
        ray_processes(),
        set(Path("/dev/shm").glob("refit-*")),
    )  # other jobs may own some
    vllm_before = vllm_processes()
    out = tmp_path / "run"
    overrides = [
        "trainer.num_workers=2",
        "trainer.total_steps=200",
        "trainer.prompts_per_step=4",
        "trainer.warmup_steps=0",
        "algorithm.num_samples=4",
        "algorithm.num_minibatches=2",
        "trainer.eval_samples=1",
        "task.num_eval_prompts=4",
        "ray.timeout_s=60",
        "logger=[jsonl]",
        f"trainer.out_dir={out}",
        f"hydra.run.dir={out}",
    ]
    log = open(tmp_path / "run.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainers.ppo", *overrides],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        deadline = time.monotonic() + 400
        while not (
            (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().strip()
        ):
            assert proc.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the run did not finish a step in time"
            time.sleep(0.5)
        ranks = [p for p in rank_processes() if p.pid not in before]
        engines = [p for p in rank_processes("EngineHost") if p.pid not in before]
        assert len(ranks) == 2 and len(engines) == 1, (
            ranks,
            engines,
        )  # the engine runs in its own actor
        # vLLM's own shared memory of THIS run's engine (its processes are the actor's children)
        vllm_segments = vllm_segments_held_by(
            {engines[0].pid, *(c.pid for c in engines[0].children(recursive=True))}
        )
        assert any(name.startswith("psm_") for name in vllm_segments), vllm_segments
        killed_at = time.monotonic()
        os.kill((ranks[1] if victim == "TrainerRank" else engines[0]).pid, signal.SIGKILL)
        assert proc.wait(timeout=60 + 120) != 0
        assert time.monotonic() - killed_at < 60 + 60, (
            "the run outlived ray.timeout_s after its rank died"
        )
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    output = (tmp_path / "run.log").read_text()
    assert message in output, output[-3000:]
    deadline = time.monotonic() + 30
    while ray_processes() - before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not ray_processes() - before, (
        f"Ray processes outlived the run: {ray_processes() - before}"
    )
    while vllm_processes() - vllm_before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not vllm_processes() - vllm_before, "the engine's vLLM processes outlived the run"
    assert not set(Path("/dev/shm").glob("refit-*")) - segments, (
        "the run left transfer segments behind"
    )
    assert not vllm_segments_left(vllm_segments), (
        f"the run left vLLM's shared memory: {vllm_segments_left(vllm_segments)}"
    )


def test_the_async_engine_trains_behind_two_sharded_workers(ray_session, tmp_path):
    """rollout.engine=async with trainer.num_workers=2: the AsyncLLM lives in the Ray engine actor, its
    submit() handles reach the driver through it, and rank 0's refits reach its workers."""
    cfg = small_run_config(
        tmp_path,
        "rollout.engine=async",
        "trainer.max_staleness=1",
        "trainer.total_steps=3",
        "trainer.num_workers=2",
        *ray_overrides(ray_session),
    )
    summary = run(cfg)
    rows = load_checkpoint(tmp_path / "checkpoints")["history"]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["version_lag"] <= 1 for r in rows) and rows[-1]["version_lag"] == 1, rows
    assert summary["dropped_samples"] == 0
    assert all(
        r["refit/gather_peak_mb"] > 0 for r in rows
    )  # every refit came from the sharded ranks
