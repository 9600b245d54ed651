"""Verifiable rewards: `fn(response, answer) -> float in [0, 1]`, chosen by config via `_target_`.

Plug your own with `task.reward._target_=my_pkg.MyReward` (a class whose instances are such callables;
the node's other keys go to its constructor) or, for a plain function, `task.reward._target_=my_pkg.my_reward`
plus `task.reward._partial_=true` (the other keys are bound as keyword arguments). A class is the faster
of the two: Hydra builds the instance once and the trainer calls it directly, while a partial is
authorized by Hydra's target policy at every call (hydra-core 1.3.8: ~0.1 ms a call, ~55 ms a step of 512
samples on a 2-core host, as measured in docs/, "Asynchronous rollout").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_LEADING_INT = re.compile(r"\s*(-?\d+)")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def addition_reward(response: str, answer: str, tolerance: int = 4) -> float:
    """Score an integer answer: 1 if exact, partial credit that falls linearly to 0 at `tolerance` away.

    Anything after the number (the model did not stop) halves the score; no leading integer scores 0.
    """
    m = _LEADING_INT.match(response)
    if m is None:
        return 0.0
    distance = abs(int(m.group(1)) - int(answer))
    score = 1.0 if distance == 0 else 0.5 * max(0.0, 1.0 - distance / tolerance)
    if response[m.end() :].strip():
        score *= 0.5
    return score


@dataclass(frozen=True)
class AdditionReward:
    """`addition_reward` with its tolerance: the default `task.reward`."""

    tolerance: int = 4

    def __call__(self, response: str, answer: str) -> float:
        return addition_reward(response, answer, self.tolerance)


def extract_answer(text: str) -> str | None:
    """The final answer of a GSM8K-style solution: after '####' if present, else the last number."""
    if "####" in text:
        tail = text.split("####")[-1]
        found = _NUMBER.search(tail)
    else:
        numbers = _NUMBER.findall(text)
        found = None if not numbers else _NUMBER.search(numbers[-1])
    if found is None:
        return None
    return _normalize_number(found.group(0))


def _normalize_number(s: str) -> str:
    s = s.replace(",", "").rstrip(".")
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    return s


def gsm8k_reward(response: str, answer: str, format_score: float = 0.1) -> float:
    """1 if the extracted final answer equals the reference, `format_score` if a number was given, else 0."""
    predicted = extract_answer(response)
    if predicted is None:
        return 0.0
    reference = extract_answer(answer) or _normalize_number(answer.strip())
    return 1.0 if predicted == reference else format_score


@dataclass(frozen=True)
class Gsm8kReward:
    """`gsm8k_reward` with its format score: task=gsm8k's reward."""

    format_score: float = 0.1

    def __call__(self, response: str, answer: str) -> float:
        return gsm8k_reward(response, answer, self.format_score)
