"""Where a PPO step's batch comes from: `SyncRollouts` generates it when the step comes (the default);
`trainers.async_rollouts.AsyncRollouts` keeps the next batches generating while the trainer trains."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

from rollout.api import RolloutEngine
from trainers.tasks import Example, Task


def sample_seed(seed: int, step: int) -> int:
    """vLLM's sampling seed of a training step: distinct per (run seed, step), the same on resume."""
    return seed * 1_000_003 + step * 100_003


@dataclass
class Rollouts:
    """One step's sampled responses and the prompts they answer."""

    examples: list[Example]
    samples: list[Any]  # rollout.Sample, in prompt order, n per prompt
    gen_s: float  # how long the trainer waited for them
    dropped: int = 0  # samples too stale to train on (trainer.max_staleness), left out of `samples`
    overlap_s: float = (
        0.0  # seconds the engine generated while the trainer trained (the previous step)
    )


class RolloutProducer(Protocol):
    """`step -> Rollouts` for trainers.ppo.run, closed when the loop ends."""

    def __call__(self, step: int) -> Rollouts: ...

    def close(self) -> None: ...


class SyncRollouts:
    """Each step's batch generated when its step comes, with the engine's current weights."""

    def __init__(self, ro: RolloutEngine, task: Task, cfg: Any) -> None:
        self.ro, self.task, self.cfg = ro, task, cfg

    def __call__(self, step: int) -> Rollouts:
        """`num_samples` responses per prompt of this step's batch."""
        start = time.perf_counter()
        self.ro.wake_up()  # no-op unless it slept through a step without a refit (trainer.refit_every > 1)
        examples = self.task.batch(step, self.cfg.trainer.prompts_per_step)
        alg = self.cfg.algorithm
        samples = self.ro.generate(
            [e.prompt for e in examples],
            n=alg.num_samples,
            max_tokens=self.cfg.task.max_tokens,
            temperature=alg.temperature,
            seed=sample_seed(self.cfg.trainer.seed, step),
        )
        gen_s = time.perf_counter() - start
        self.ro.sleep()  # colocate: the engine's device memory goes to training; the refit wakes it up
        return Rollouts(examples, samples, gen_s)

    def close(self) -> None:
        pass
