"""Short GRPO/PPO runs on the tiny model with real vLLM (CPU): metrics, refit correctness, resume, multirun."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from trainer_helpers import ROOT, compose_typed, small_run_config

from trainers.checkpoint import load_checkpoint
from trainers.policy import collate, load_policy, token_logprobs
from trainers.ppo import run

REQUIRED = [
    "step",
    "reward/mean",
    "reward/std",
    "timing/gen_s",
    "timing/refit_s",
    "timing/train_s",
    "timing/step_s",
    "refit/gbps",
    "kl",
    "entropy",
    "clip_frac",
    "logprob_gap",
    "version_lag",
]
GAP_ATOL = 1e-4  # fp32 engine vs fp32 trainer: observed ~1e-7


def read_metrics(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_short_run_writes_every_metric_and_output(trainer_engine, tmp_path, algorithm):
    cfg = small_run_config(
        tmp_path,
        f"algorithm={algorithm}",
        "algorithm.kl_coef=0.05",
        "algorithm.entropy_coef=0.01",
        "trainer.checkpoint_every=2",
        "logger=[console,jsonl,tensorboard]",
    )
    summary = run(cfg, rollout=trainer_engine)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        missing = [k for k in REQUIRED if row.get(k) is None]
        assert not missing, f"step {row['step']} lacks {missing}"
        assert 0.0 <= row["reward/mean"] <= 1.0 and row["kl"] >= 0.0 and row["version_lag"] == 0
        assert row["logprob_gap"] < GAP_ATOL, (
            "the engine sampled with weights other than the trainer's"
        )
        assert (
            "logprob_gap/stale" in row and row["logprob_gap/stale"] is None
        )  # every token: the current weights
        assert row["timing/refit_s"] > 0 and row["refit/gbps"] > 0
    if algorithm == "ppo":
        assert all(r["value_loss"] is not None for r in rows)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "reward_curve.png").stat().st_size > 0
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step_000002.pt",
        "step_000003.pt",
    ]
    assert (
        summary["steps"] == 3
        and json.loads((tmp_path / "summary.json").read_text())["algorithm"] == algorithm
    )


def test_the_loop_runs_with_the_startup_heap_frozen_and_unfreezes_it(
    trainer_engine, tmp_path, monkeypatch
):
    """Full collections during the steps skip what was alive at the start (they took ~0.3 s each, with the GIL,
    over vLLM's and torch's objects); a run hands the heap back to the collector when it ends."""
    import gc

    import trainers.ppo as ppo

    frozen, record = [], ppo.record
    monkeypatch.setattr(
        ppo, "record", lambda *a: (frozen.append(gc.get_freeze_count()), record(*a))
    )
    run(small_run_config(tmp_path, "trainer.total_steps=2"), rollout=trainer_engine)
    assert len(frozen) == 2 and min(frozen) > 100_000, frozen
    assert gc.get_freeze_count() == 0


def test_gsm8k_task_runs_on_the_sample_file(trainer_engine, tmp_path):
    cfg = small_run_config(tmp_path, "task=gsm8k", "trainer.total_steps=1", "task.max_tokens=16")
    summary = run(cfg, rollout=trainer_engine)
    assert summary["steps"] == 1 and 0.0 <= read_metrics(tmp_path)[0]["reward/mean"] <= 1.0


def test_engine_serves_exactly_the_trainers_step_k_weights(trainer_engine, tmp_path, tiny_path):
    """After step k, the engine's greedy log-probs equal the trainer's step-k model on the same tokens,
    and differ from the weights it started with (the check can fail)."""
    run(
        small_run_config(tmp_path, "trainer.total_steps=2", "algorithm.lr=1e-2"),
        rollout=trainer_engine,
    )
    prompts = ["1+2=", "3+3=", "5+0=", "4+1="]
    samples = trainer_engine.generate(prompts, n=1, max_tokens=6, temperature=0.0)
    assert {s.version for s in samples} == {2}
    batch = collate(
        [s.prompt_token_ids for s in samples],
        [s.token_ids for s in samples],
        0,
        sampler_logprobs=[s.logprobs for s in samples],
    )
    trained = load_policy(str(tiny_path))
    trained.load_state_dict(load_checkpoint(tmp_path / "checkpoints" / "step_000002.pt")["policy"])
    initial = load_policy(str(tiny_path))
    with torch.no_grad():
        ours = token_logprobs(trained, batch)[0][batch.mask > 0]
        before = token_logprobs(initial, batch)[0][batch.mask > 0]
    engine = batch.sampler_logprobs[batch.mask > 0]
    torch.testing.assert_close(engine, ours, atol=GAP_ATOL, rtol=0)
    assert (engine - before).abs().max() > 1e-2, (
        "step-2 weights are indistinguishable from the initial ones"
    )
    # python -m trainers.export: a Hugging Face directory that transformers and a fresh vLLM engine load
    # as exactly the step-2 policy (the run directory resolves to its latest checkpoint, step 2)
    from transformers import AutoModelForCausalLM

    from rollout import build_rollout
    from trainers.export import main as export_main

    export_main([str(tmp_path), str(tmp_path / "hf")])
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    with torch.no_grad():
        hf = token_logprobs(exported, batch)[0][batch.mask > 0]
    assert torch.equal(hf, ours), "the exported model differs from the checkpoint's policy"
    with build_rollout(trainer_engine.cfg, str(tmp_path / "hf")) as fresh:
        again = fresh.generate(prompts, n=1, max_tokens=6, temperature=0.0)
    assert [s.token_ids for s in again] == [s.token_ids for s in samples]
    torch.testing.assert_close(
        torch.tensor([x for s in again for x in s.logprobs]),
        torch.tensor([x for s in samples for x in s.logprobs]),
        atol=1e-5,
        rtol=0,
    )


def test_refit_every_k_logs_the_version_lag_and_the_gap_sees_stale_weights(
    trainer_engine, tmp_path
):
    run(
        small_run_config(
            tmp_path, "trainer.total_steps=4", "trainer.refit_every=2", "algorithm.lr=1e-2"
        ),
        rollout=trainer_engine,
    )
    rows = read_metrics(tmp_path)
    assert [r["version_lag"] for r in rows] == [0, 1, 0, 1]
    assert [r["refit/gbps"] is not None for r in rows] == [False, True, False, True]
    assert [r["timing/refit_s"] > 0 for r in rows] == [False, True, False, True]
    for r in rows:
        if r["version_lag"] == 0:
            assert r["logprob_gap"] < GAP_ATOL and r["logprob_gap/stale"] is None
        else:  # every token from the weights before the last update: the refit check has nothing to check
            assert r["logprob_gap"] is None
            assert r["logprob_gap/stale"] > 10 * GAP_ATOL, (
                "stale engine weights must show in logprob_gap/stale"
            )


def test_resume_continues_with_consistent_steps_and_metrics(trainer_engine, tmp_path):
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    run(
        small_run_config(first, "trainer.total_steps=3", "trainer.checkpoint_every=2"),
        rollout=trainer_engine,
    )
    run(
        small_run_config(
            resumed,
            "trainer.total_steps=4",
            f"trainer.resume={first / 'checkpoints' / 'step_000002.pt'}",
        ),
        rollout=trainer_engine,
    )
    a, b = read_metrics(first), read_metrics(resumed)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert b[:2] == a[:2], "the resumed run's file holds the steps before the checkpoint unchanged"
    # Step 3 from the checkpoint sees the same weights, prompts and sampling seeds as the first run's step 3.
    assert b[2]["reward/mean"] == a[2]["reward/mean"]
    assert b[2]["loss"] == pytest.approx(a[2]["loss"], abs=1e-5)
    ckpt = load_checkpoint(resumed)  # a run directory resolves to its latest checkpoint
    assert ckpt["step"] == 4 and len(ckpt["history"]) == 4


@pytest.mark.slow
def test_multirun_of_two_jobs_completes_with_a_sweep_report(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "-m",
        "trainers.ppo",
        "-m",
        "rollout.transfer.bucket_mb=1,4",
        "debug=tiny",
        "trainer.total_steps=2",
        "trainer.prompts_per_step=2",
        "algorithm.num_samples=2",
        "algorithm.num_minibatches=1",
        "rollout.backend.max_num_seqs=16",
        f"hydra.sweep.dir={sweep}",
    ]
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ}
    )
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-6000:])
    for job in ("0", "1"):
        assert [r["step"] for r in read_metrics(sweep / job)] == [1, 2]
    report = (sweep / "sweep_report.md").read_text()
    assert "rollout.transfer.bucket_mb=1" in report and "rollout.transfer.bucket_mb=4" in report
    assert (sweep / "sweep_report.png").stat().st_size > 0


@pytest.mark.slow
def test_default_run_learns_beyond_its_warm_start(trainer_engine, tmp_path):
    """The default run (no overrides, ~2 min here): RL lifts the reward well above the warm-start's."""
    summary = run(
        compose_typed([f"trainer.out_dir={tmp_path}", "logger=[jsonl]"]), rollout=trainer_engine
    )
    assert summary["reward_last_fifth"] - summary["reward_first_fifth"] >= 0.2, summary
    assert summary["final_eval_reward"] - summary["baseline_eval_reward"] >= 0.2, summary
    assert summary["max_logprob_gap"] < GAP_ATOL, summary
