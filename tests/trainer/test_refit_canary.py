"""The refit canary (trainers/refit_canary.py): quiet on a correct run, loud on a stale engine, fatal with
trainer.strict_refit=true. The stale engine is the shared real engine behind a test-only wrapper that
skips one refit but labels the samples with the new version, as a refit that silently failed would."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from trainer_helpers import SkipsARefit, small_run_config

from trainers.ppo import run
from trainers.refit_canary import (
    FULL_PRECISION_GAP,
    HALF_PRECISION_GAP,
    RefitCanaryError,
    check_refit_gap,
    gap_threshold,
    logprob_gaps,
)

CANARY_LOGGER = "trainers.refit_canary"


def test_threshold_follows_the_dtypes_unless_configured():
    assert gap_threshold(None, torch.float32, torch.float32) == FULL_PRECISION_GAP
    assert gap_threshold(None, torch.bfloat16, torch.float32) == HALF_PRECISION_GAP
    assert gap_threshold(None, torch.float32, torch.bfloat16) == HALF_PRECISION_GAP
    assert gap_threshold(None, None, torch.float32) == HALF_PRECISION_GAP
    assert gap_threshold(5e-5, torch.bfloat16, torch.float32) == 5e-5


def test_fires_only_on_the_current_weights_tokens_and_above_the_threshold():
    said = []
    assert not check_refit_gap(3, 1e-4, 1e-3, False, said.append)
    assert not check_refit_gap(
        3, None, 1e-3, False, said.append
    )  # every token from older weights: not checked
    assert check_refit_gap(3, 0.5, 1e-3, False, said.append)
    assert check_refit_gap(4, math.nan, 1e-3, False, said.append)
    assert len(said) == 2 and "step 3" in said[0] and "0.5" in said[0]
    with pytest.raises(
        RefitCanaryError, match=r"step 7: logprob_gap 0\.5 > 0\.001.*strict_refit=true"
    ):
        check_refit_gap(7, 0.5, 1e-3, True, said.append)


def test_the_gap_splits_current_tokens_from_stale_ones():
    diff = torch.tensor([[0.1, -0.3, 9.0], [2.0, -4.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    current = torch.tensor([[True, True, True], [False, False, True]])
    gaps = logprob_gaps(diff, mask, current)
    assert gaps["logprob_gap"] == pytest.approx(0.4 / 3) and gaps[
        "logprob_gap/stale"
    ] == pytest.approx(3.0)
    assert logprob_gaps(diff, mask, torch.zeros_like(current))["logprob_gap"] is None


def test_config_rejects_a_non_positive_threshold():
    from trainers.config import TrainerConfig

    with pytest.raises(ValueError, match=r"trainer\.refit_gap_threshold must be > 0.*-1"):
        TrainerConfig(refit_gap_threshold=-1.0)


def test_quiet_on_the_default_tiny_run(trainer_engine, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger=CANARY_LOGGER):
        run(small_run_config(tmp_path, "algorithm.lr=1e-2"), rollout=trainer_engine)
    assert not [r for r in caplog.records if r.name == CANARY_LOGGER]


def test_warns_on_a_stale_engine_and_fails_the_run_when_strict(trainer_engine, tmp_path, caplog):
    stale = SkipsARefit(
        trainer_engine, skip_version=1
    )  # the refit after step 1: step 2 samples stale weights
    with caplog.at_level(logging.WARNING, logger=CANARY_LOGGER):
        run(small_run_config(tmp_path / "warn", "algorithm.lr=1e-2"), rollout=stale)
    fired = [r.getMessage() for r in caplog.records if r.name == CANARY_LOGGER]
    assert len(fired) == 1 and "step 2: logprob_gap" in fired[0], fired
    with pytest.raises(RefitCanaryError, match="step 2: logprob_gap"):
        run(
            small_run_config(tmp_path / "strict", "algorithm.lr=1e-2", "trainer.strict_refit=true"),
            rollout=stale,
        )
