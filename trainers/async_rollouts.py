"""Asynchronous rollouts for the PPO loop (`trainer.max_staleness=k`, k >= 1, `rollout.engine=async`):
the engine generates the next k steps' batches while the trainer trains, and no sample more than k
weight versions old is trained on.

Step s trains a policy that has had s-1 updates, so a sample of version v is (s-1) - v versions
stale. The batch of step s+k is submitted when step s's batch is handed over, on the engine's weights
of version s-1: it is exactly k versions old when trained (tokens generated after later refits, with
`rollout.pause_mode=keep`, are newer). A group with any older sample is dropped and counted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any

from rollout.api import RolloutEngine
from trainers.rollouts import Rollouts, sample_seed
from trainers.tasks import Example, Task


class AsyncRollouts:
    """`step -> Rollouts` for trainers.ppo.run: keeps up to k batches ahead in flight on an async engine.

    Example:
        producer = AsyncRollouts(ro, task, cfg)          # ro: build_rollout(cfg.rollout), engine=async
        for step in range(1, total_steps + 1):
            rollouts = producer(step)                    # waits only for what is not generated yet
            ...train...; ro.update_weights(params, version=step)   # generation goes on meanwhile
    """

    def __init__(self, ro: RolloutEngine, task: Task, cfg: Any) -> None:
        self.ro, self.task, self.cfg = ro, task, cfg
        self.max_staleness = cfg.trainer.max_staleness
        self._pending: dict[
            int, tuple[list[Example], Any, float]
        ] = {}  # step -> (examples, handle, submitted)
        self._handed_over: float | None = None  # when the previous batch went to the trainer
        # The trainer's thread off the cores of vLLM's processes (rollout.engine_cores) until close().
        self._pinned = contextlib.ExitStack()
        self._pinned.enter_context(ro.off_engine_cores())

    def close(self) -> None:
        self._pinned.close()

    def __call__(self, step: int) -> Rollouts:
        start = time.perf_counter()
        self.ro.wake_up()  # no-op unless asleep without a refit since
        last = min(step + self.max_staleness, self.cfg.trainer.total_steps)
        for s in range(step, last + 1):
            if s not in self._pending:
                self._submit(s)
        overlap_s = self._generation_during(
            self._handed_over, start
        )  # the previous step's train + refit
        examples, handle, _ = self._pending.pop(step)
        samples = handle.result()
        self._handed_over = time.perf_counter()
        self.ro.sleep()  # colocate: the engine's device memory goes to training (requests: rollout.pause_mode)
        examples, samples, dropped = drop_stale_groups(
            examples, samples, step, self.max_staleness, self.cfg.algorithm.num_samples
        )
        return Rollouts(
            examples, samples, self._handed_over - start, dropped=dropped, overlap_s=overlap_s
        )

    def _submit(self, step: int) -> None:
        alg = self.cfg.algorithm
        examples = self.task.batch(step, self.cfg.trainer.prompts_per_step)
        handle = self.ro.submit(
            [e.prompt for e in examples],
            n=alg.num_samples,
            max_tokens=self.cfg.task.max_tokens,
            temperature=alg.temperature,
            seed=sample_seed(self.cfg.trainer.seed, step),
        )
        self._pending[step] = (examples, handle, time.perf_counter())

    def _generation_during(self, begin: float | None, end: float) -> float:
        """Seconds within [begin, end] in which some submitted batch was unfinished (queued or running)."""
        if begin is None:
            return 0.0
        spans = sorted(
            (max(submitted, begin), min(handle.finished_at or end, end))
            for _, handle, submitted in self._pending.values()
        )
        total, reach = 0.0, begin
        for lo, hi in spans:
            lo = max(lo, reach)
            if hi > lo:
                total, reach = total + hi - lo, hi
        return total


def drop_stale_groups(
    examples: list[Example], samples: list[Any], step: int, max_staleness: int, group_size: int
) -> tuple[list[Example], list[Any], int]:
    """Keep the prompts whose every sample is at most `max_staleness` versions behind the policy of
    `step` (which has had step-1 updates); returns (examples, samples re-indexed, samples dropped)."""
    kept_examples, kept = [], []
    for i, example in enumerate(examples):
        group = samples[i * group_size : (i + 1) * group_size]
        if all((step - 1) - s.version <= max_staleness for s in group):
            kept.extend(dataclasses.replace(s, prompt_index=len(kept_examples)) for s in group)
            kept_examples.append(example)
    if not kept_examples:
        raise RuntimeError(
            f"step {step}: every sample is more than {max_staleness} versions old; "
            "the engine is not being refit (trainer.refit_every must be 1)"
        )
    return kept_examples, kept, len(samples) - len(kept)
