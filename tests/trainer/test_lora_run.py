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
    check_export(tmp_path)


def check_export(run_dir) -> None:
    """python -m trainers.export of a LoRA run: the merged model (transformers) and the adapter alone
    (PEFT on the base it trained on) both give the checkpoint's policy's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from trainers.export import load_trained_policy
    from trainers.export import main as export_main

    policy, model_path, _ = load_trained_policy(run_dir)
    export_main([str(run_dir), str(run_dir / "merged")])
    export_main([str(run_dir), str(run_dir / "adapter"), "--adapter-only"])
    ids = torch.tensor([[1, 5, 9, 3, 7, 2]])
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged", dtype=torch.float32)
    base_path = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())[
        "base_model_name_or_path"
    ]
    assert (
        base_path == model_path
    )  # no warm-start: the adapter sits on the model the run started on
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    adapter = PeftModel.from_pretrained(base, run_dir / "adapter")
    with torch.no_grad():
        want = policy(ids).logits
        torch.testing.assert_close(merged(ids).logits, want, atol=1e-5, rtol=0)
        torch.testing.assert_close(adapter(ids).logits, want, atol=0, rtol=0)
    assert not any("lora" in k for k in merged.state_dict()), (
        "the merged export kept adapter tensors"
    )


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


def test_an_adapter_exported_after_the_base_changed_names_the_base_it_trained_on(
    tiny_path, tmp_path
):
    """A warm-started base (or a resumed one) is part of what the adapter learned on: --adapter-only
    then writes that base beside the adapter and the adapter's config names it, not the start model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from trainers.config import DEFAULT_LORA_MODULES
    from trainers.export import _point_adapter_at_its_base
    from trainers.lora import wrap_policy

    policy = wrap_policy(load_policy(str(tiny_path)), 8, 16.0, 0.0, list(DEFAULT_LORA_MODULES))
    out = tmp_path / "adapter"
    _point_adapter_at_its_base(policy, str(tiny_path), out)
    assert policy.peft_config["default"].base_model_name_or_path == str(tiny_path)
    assert not (out / "base").exists()

    with torch.no_grad():
        policy.get_base_model().lm_head.weight.add_(0.5)  # what a warm-start does to the base
    _point_adapter_at_its_base(policy, str(tiny_path), out)
    assert policy.peft_config["default"].base_model_name_or_path == str(out / "base")
    policy.save_pretrained(out)
    reloaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32), out
    )
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, policy(ids).logits, atol=0, rtol=0)


def test_export_names_what_it_cannot_export(tmp_path):
    from trainers.export import main as export_main

    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"checkpoint='.*empty': no step_\* checkpoint"):
        export_main([str(tmp_path / "empty"), str(tmp_path / "out")])
    with pytest.raises(SystemExit, match=r"checkpoint='.*nowhere' does not exist"):
        export_main([str(tmp_path / "nowhere"), str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()  # nothing half-written
