"""LoRA runs (issue 26): `model.lora.rank=8` trains only the adapter, each refit moves only the adapter's
bytes, the engine's log-probs equal the trainer's at fp32 noise every step, the KL reference is the base,
and a skipped adapter refit is caught by the refit canary. One shared LoRA engine (conftest.lora_engine)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from trainer_helpers import LORA_OVERRIDES, SkipsARefit, small_run_config

from trainers.learner import LocalLearner
from trainers.policy import collate, load_policy, token_logprobs
from trainers.ppo import run
from trainers.refit_canary import RefitCanaryError

GAP_ATOL = 1e-4  # fp32 engine vs fp32 trainer; measured ~2e-7


def rows(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def adapter_mb(cfg, tiny_path) -> float:
    """The adapter's size as PEFT makes it for the run's model.lora."""
    learner = LocalLearner(
        str(tiny_path), cfg.algorithm, cfg.trainer, torch.device("cpu"), cfg.model.lora
    )
    return (
        sum(t.numel() * t.element_size() for _, t in learner.named_parameters_for_refit()) / 2**20
    )


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_a_lora_run_moves_only_the_adapter_and_the_engine_tracks_it(
    algorithm, lora_engine, tiny_path, tmp_path
):
    cfg = small_run_config(tmp_path, *LORA_OVERRIDES, f"algorithm={algorithm}", "algorithm.lr=1e-3")
    summary = run(cfg, rollout=lora_engine)
    history = rows(tmp_path)
    expected_mb = adapter_mb(cfg, tiny_path)
    model_mb = sum(p.numel() * 4 for p in load_policy(str(tiny_path)).parameters()) / 2**20
    assert expected_mb < model_mb / 5
    for row in history:
        assert row["refit/mb"] == pytest.approx(expected_mb), row  # the adapter, nothing else
        assert row["logprob_gap"] < GAP_ATOL, row
        assert row["kl"] is not None and row["kl"] >= 0.0  # to the base: the adapter disabled
    assert summary["steps"] == cfg.trainer.total_steps
    assert lora_engine.version == cfg.trainer.total_steps


def test_the_learner_trains_only_the_adapter_and_its_reference_is_the_base(tiny_path):
    cfg = small_run_config(tiny_path.parent, *LORA_OVERRIDES)
    learner = LocalLearner(
        str(tiny_path), cfg.algorithm, cfg.trainer, torch.device("cpu"), cfg.model.lora
    )
    stepped = {id(p) for group in learner.optimizer.param_groups for p in group["params"]}
    names = [n for n, p in learner.policy.named_parameters() if id(p) in stepped]
    assert names and all("lora_" in n for n in names)
    assert learner.optimizer.param_groups[0]["lr"] == cfg.algorithm.lr * cfg.model.lora.lr_scale
    with torch.no_grad():  # an adapter that changes the model (PEFT starts it at B = 0)
        for n, p in learner.policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    learner.freeze_reference()
    assert learner.reference.state_dict() == {}  # no second copy of the model
    batch = collate([[3, 4, 5, 6]], [[7, 8, 9]], pad_id=0)
    base, _ = token_logprobs(load_policy(str(tiny_path)), batch)
    ref, _ = token_logprobs(learner.reference, batch)
    policy, _ = token_logprobs(learner.policy, batch)
    torch.testing.assert_close(ref, base)
    assert (policy - base).abs().max() > 1e-3


def test_a_skipped_adapter_refit_is_caught_by_the_canary(lora_engine, tmp_path, caplog):
    stale = SkipsARefit(lora_engine, skip_version=1)  # step 2 samples with the step-0 adapter
    overrides = (*LORA_OVERRIDES, "algorithm.lr=1e-3")
    with caplog.at_level(logging.WARNING, logger="trainers.refit_canary"):
        run(small_run_config(tmp_path / "warn", *overrides), rollout=stale)
    fired = [r.getMessage() for r in caplog.records if r.name == "trainers.refit_canary"]
    assert len(fired) == 1 and "step 2: logprob_gap" in fired[0], fired
    with pytest.raises(RefitCanaryError, match="step 2: logprob_gap"):
        run(
            small_run_config(tmp_path / "strict", *overrides, "trainer.strict_refit=true"),
            rollout=stale,
        )
