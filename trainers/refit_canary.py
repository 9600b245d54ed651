"""The refit canary: right after a refit the engine must sample with the trainer's weights, so the step's
`logprob_gap` (mean |engine log-prob - trainer log-prob| over response tokens) must stay at rounding level.

`logprob_gap` is taken over the tokens that the weights just sent produced (every token of a synchronous run
right after a refit); the tokens of older weights (`trainer.refit_every` > 1, or an async run's samples begun
before the last refit) go to `logprob_gap/stale`: their gap is the policy's own drift, expected, not checked.
A `logprob_gap` above the threshold means the engine serves other weights than the trainer holds (a stale or
half-applied refit, a tied head left behind: issue 10). It warns loudly, naming the step and the value, or
fails the run with `trainer.strict_refit=true`.
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


def logprob_gaps(
    diff: torch.Tensor, mask: torch.Tensor, current: torch.Tensor
) -> dict[str, Optional[float]]:
    """Mean |engine - trainer| log-prob over the response tokens of the current weights (`current`, a bool
    mask like `mask`) and over the others; None where a step has no such token."""

    def mean(where: torch.Tensor) -> Optional[float]:
        count = where.sum()
        return (diff.abs() * where).sum().item() / count.item() if count > 0 else None

    current = current & mask.bool()
    return {"logprob_gap": mean(current), "logprob_gap/stale": mean(mask.bool() & ~current)}


def check_refit_gap(
    step: int, gap: Optional[float], threshold: float, strict: bool, say: Callable[[str], None]
) -> bool:
    """Fire (True) when the tokens of the weights just sent show a gap above `threshold` (None: no such token)."""
    if gap is None or gap <= threshold:  # a NaN gap fires too
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
