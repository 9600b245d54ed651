"""The refit canary: right after a refit the engine must sample with the trainer's weights, so the step's
`logprob_gap` (mean |engine log-prob - trainer log-prob| over response tokens) must stay at rounding level.

A gap above the threshold on a step whose samples all came from the weights just sent (`version_lag` 0)
means the engine serves other weights than the trainer holds (a stale or half-applied refit, a tied head
left behind: issue 10). It warns loudly, naming the step and the value, or fails the run with
`trainer.strict_refit=true`. Steps sampled with older weights (`trainer.refit_every` > 1) are not checked:
their gap is the policy's own drift.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

logger = logging.getLogger(__name__)

# Measured on the default tiny run: fp32 engine vs fp32 trainer <= 2e-7 per step; a bf16 engine (vLLM 0.24
# downcasts the tiny model) vs the fp32 trainer 2.7e-3..3.8e-3 (the benchmarks doc under docs/). A refit skipped
# with algorithm.lr=1e-2 gave > 1e-3 (tests/trainer/test_refit_canary.py).
FULL_PRECISION_GAP = 1e-3
HALF_PRECISION_GAP = 2e-2
_FULL = (torch.float32, torch.float64)


class RefitCanaryError(RuntimeError):
    """The engine's log-probs right after a refit disagree with the trainer's (trainer.strict_refit=true)."""


def gap_threshold(
    configured: Optional[float], engine_dtype: Optional[torch.dtype], trainer_dtype: torch.dtype
) -> float:
    """`trainer.refit_gap_threshold`, or (None) the default for the coarser of the two dtypes; an engine
    that does not say its dtype gets the 16-bit default."""
    if configured is not None:
        return configured
    return (
        FULL_PRECISION_GAP
        if engine_dtype in _FULL and trainer_dtype in _FULL
        else HALF_PRECISION_GAP
    )


def check_refit_gap(
    step: int,
    gap: float,
    version_lag: int,
    threshold: float,
    strict: bool,
    say: Callable[[str], None],
) -> bool:
    """Fire (True) when a step sampled right after a refit shows a gap above `threshold`."""
    if version_lag != 0 or gap <= threshold:  # a NaN gap fires too
        return False
    text = (
        f"REFIT CANARY: step {step}: logprob_gap {gap:.3g} > {threshold:.3g} on samples taken right after "
        "a refit: the engine is not serving the trainer's weights"
    )
    if strict:
        raise RefitCanaryError(text + " (trainer.strict_refit=true)")
    logger.warning(text)
    say(text)
    return True
