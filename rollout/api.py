"""The one boundary between a trainer and every rollout engine: what an engine is, what it returns.

Every engine `build_rollout` makes (vLLM's LLM, its AsyncLLM, several of either, the Ray engine actor)
implements `RolloutEngine`, and the trainer relies on nothing else. A refit is ONE verb,
`refit(version, send)`: the engine readies its workers, hands `send` a `RefitPort`, and `send` moves the
weights through it (a sender in this process, a sharded gather on Ray ranks, ...); the engine never
needs to know which. `update_weights(tensors, version)` is that verb with this process's sender.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    ContextManager,
    Iterable,
    Protocol,
    Sequence,
)

if TYPE_CHECKING:
    import torch

    from rollout.transfer import TransferConfig, TransferStats, WeightSender


@dataclass
class Sample:
    """One generated sequence. `token_ids`/`logprobs`/`text` are the response only."""

    prompt_index: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[
        float
    ]  # log-probability of each response token under the model (before temperature)
    text: str
    version: int  # the weight version that produced it (the oldest, if several did)
    finish_reason: str | None = None
    # The version of each response token, where vLLM reports it (the async engine on vLLM >= 0.32):
    # a request kept running across a refit holds tokens of both versions.
    token_versions: list[int] | None = None


@dataclass
class RefitStats:
    version: int
    seconds: float  # end to end: wake-up, transfer + load, cache resets
    num_bytes: int
    num_tensors: int
    num_buckets: int
    send_s: float  # the sending half (returns once the last bucket is loaded by every worker)
    load_s: float  # the slowest worker's reload_weights, final processing included
    detached_bytes: (
        int  # copied out because a layer straddled a bucket boundary (summed over workers)
    )
    caches_reset: tuple[str, ...] = field(default_factory=tuple)
    load_path: str = "layerwise"  # "direct" (weight loaders) or "layerwise" (rollout/load_path.py)
    worker_load_s: tuple[
        float, ...
    ] = ()  # each worker's load_s, by receiver rank (engine k, worker w: k*TP+w)
    load_plan: str = ""  # direct path: "recorded" (first refit), "replayed", or "off: <why>"
    graph_audit: Any = None  # rollout.graph_audit=true: a rollout.graph_audit.GraphAudit


class RefitError(RuntimeError):
    """A refit failed; the engine refuses to generate until a complete refit succeeds."""


@dataclass(frozen=True)
class RefitEndpoint:
    """Where a sender in another process binds, and how it sends (plain data: it travels to Ray ranks).

    Example:
        sender = endpoint.sender()            # in the sending process, kept across refits
        stats = sender.send(model.named_parameters(), version=3)
    """

    address: str
    transfer: "TransferConfig"
    device: str  # where the sender's buffers live (the engine's device type)
    num_receivers: int = 1  # every worker of every engine
    node_id: str | None = (
        None  # the Ray node of the engine's workers, where the engine is a Ray actor
    )

    def sender(self, device: str | None = None) -> "WeightSender":
        """A new sender bound at this endpoint; the caller keeps (and closes) it."""
        import os

        from rollout.transfer import WeightSender
        from rollout.transfer.channel import ipc_path

        # A previous sender on this endpoint removed its private directory on close: make it again (0700).
        os.makedirs(os.path.dirname(ipc_path(self.address)), mode=0o700, exist_ok=True)
        return WeightSender(
            self.transfer,
            self.address,
            device=device or self.device,
            num_receivers=self.num_receivers,
        )


class RefitPort(Protocol):
    """What a refit hands its sending half. Asking for either starts the workers' receive."""

    def endpoint(self) -> RefitEndpoint:
        """For a sender in another process (it binds there and keeps its sender across refits)."""

    def sender(self) -> "WeightSender":
        """This process's sender for the engine, kept across refits (its buffers are made once)."""


# The sending half of a refit: moves `version`'s weights through the port; returns the sender's stats.
Send = Callable[[RefitPort, int], "TransferStats"]


def send_tensors(named_tensors: Iterable[tuple[str, "torch.Tensor"]]) -> Send:
    """The sending half for tensors in this process: one pass over `named_tensors`."""

    def send(port: RefitPort, version: int) -> "TransferStats":
        return port.sender().send(named_tensors, version)

    return send


class Handle(Protocol):
    """The samples of one `submit()`."""

    finished_at: float | None  # time.perf_counter() when the last prompt finished, where known

    def done(self) -> bool: ...

    def result(self, timeout_s: float | None = None) -> list[Sample]: ...


class RolloutEngine(Protocol):
    """What the trainer relies on, and all it relies on.

    Example:
        with build_rollout(RolloutConfig(), model_path) as ro:
            samples = ro.generate(["1+1="], n=4, max_tokens=8, seed=0)
            ro.sleep()                                           # colocate: memory to the trainer
            stats = ro.refit(1, send_tensors(model.named_parameters()))   # == ro.update_weights(...)
            handle = ro.submit(["2+2="], n=4)                   # async engines return at once
    """

    @property
    def version(self) -> int:
        """The weight version the engine generates with."""

    @property
    def dtype(self) -> "torch.dtype":
        """The dtype the engine computes in."""

    @property
    def tokenizer(self) -> Any: ...

    def generate(
        self,
        prompts: Sequence[Any],
        n: int = 1,
        max_tokens: int = 32,
        temperature: float = 1.0,
        seed: int | None = None,
        top_p: float = 1.0,
    ) -> list[Sample]:
        """`n` samples per prompt, grouped in prompt order; prompt i's sample j uses seed `seed + i*n + j`."""

    def submit(
        self,
        prompts: Sequence[Any],
        n: int = 1,
        max_tokens: int = 32,
        temperature: float = 1.0,
        seed: int | None = None,
        top_p: float = 1.0,
    ) -> Handle:
        """Start generation; an async engine returns at once, a sync one once the samples are there."""

    def off_engine_cores(self) -> ContextManager[None]:
        """The calling thread off the cores of the engine's processes inside (where they are split)."""

    def sleep(self, level: int | None = None) -> None: ...

    def wake_up(self, tags: list[str] | None = None) -> None: ...

    def refit(self, version: int, send: Send) -> RefitStats:
        """One refit: the engine's workers receive what `send` moves; RefitError on any failure."""

    def update_weights(
        self, named_tensors: Iterable[tuple[str, "torch.Tensor"]], version: int
    ) -> RefitStats:
        """`refit(version, send_tensors(named_tensors))`."""

    def close(self) -> None: ...

    def __enter__(self) -> "RolloutEngine": ...

    def __exit__(self, *exc: object) -> None: ...


class FinishedHandle:
    """A `Handle` whose samples are already there (a sync engine's submit)."""

    def __init__(self, samples: list[Sample], finished_at: float) -> None:
        self._samples, self.finished_at = samples, finished_at

    def done(self) -> bool:
        return True

    def result(self, timeout_s: float | None = None) -> list[Sample]:
        return self._samples


def no_core_split() -> ContextManager[None]:
    """`off_engine_cores` of an engine that does not split the cores."""
    return contextlib.nullcontext()
