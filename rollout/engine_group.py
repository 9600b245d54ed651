"""Several vLLM engines (data-parallel replicas) behind the one-engine API, fed by ONE refit.

`generate`/`submit` split the prompts into contiguous shares, one per engine, run them concurrently (each
engine waits on its own engine-core process) and join the samples in prompt order; each prompt
keeps the seeds it has on one engine, so samples do not depend on `num_engines`. `update_weights` packs
every bucket once for all K x TP workers: one sender, one receiver per worker. The engines move to a new
version together: if any worker fails, every engine refuses to generate until a refit succeeds.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any, Iterable, Sequence

import torch

from rollout.api import RefitStats, Sample, Send
from rollout.config import EngineKind, RolloutConfig
from rollout.refit import Refitter


class EngineGroup:
    """`cfg.num_engines` engines (sync or async, `cfg.engine`) of `cfg.backend.tensor_parallel_size` workers
    each, composed with ONE Refitter over all of them. Build it with `build_rollout`.

    Example:
        cfg = RolloutConfig(num_engines=2)
        with build_rollout(cfg, model_path) as ro:                      # an EngineGroup
            samples = ro.generate(prompts, n=4, max_tokens=8, seed=0)  # as one engine would sample them
            stats = ro.update_weights(model.named_parameters(), version=1)  # every worker of both engines
            stats.worker_load_s                                         # one load time per worker
    """

    def __init__(
        self, cfg: RolloutConfig, model_path: str, worker_extension: str | None = None
    ) -> None:
        self.cfg = cfg
        self.engines: list[Any] = []
        self._closed = False
        if cfg.engine is EngineKind("async"):
            from rollout.async_engine import AsyncVllmRollout as engine_cls
        else:
            from rollout.engine import VllmRollout as engine_cls
        try:
            for k in range(
                cfg.num_engines
            ):  # one at a time: each start sets its own worker environment
                self.engines.append(
                    engine_cls(cfg, model_path, worker_extension=worker_extension, engine_index=k)
                )
        except BaseException:
            self.close()
            raise
        first = self.engines[0]
        self.platform = first.platform
        self.refitter = Refitter(
            self.engines,
            self.platform.device_type,
            cfg.endpoint_dir,
            cfg.timeouts,
            first.refitter.transfer,
            cfg.load_path,
            cfg.backend.tensor_parallel_size,
            adapter=cfg.adapter,
        )

    @property
    def tokenizer(self) -> Any:
        return self.engines[0].tokenizer

    @property
    def version(self) -> int:
        return self.engines[0].version

    @property
    def dtype(self) -> Any:
        return self.engines[0].dtype

    @property
    def vllm_segments(self) -> Any:
        """vLLM's shared memory of every engine (each engine's close() removes its own leftovers)."""
        from rollout.vllm_segments import EngineSegments

        return EngineSegments.merge(
            "engine group", [engine.vllm_segments for engine in self.engines]
        )

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        n: int = 1,
        max_tokens: int = 32,
        temperature: float = 1.0,
        seed: int | None = None,
        top_p: float = 1.0,
    ) -> list[Sample]:
        """As VllmRollout.generate, over all engines; refuses (before any engine starts) if one cannot generate."""
        return self.submit(prompts, n, max_tokens, temperature, seed, top_p).result()

    def submit(
        self,
        prompts: Sequence[str | Sequence[int]],
        n: int = 1,
        max_tokens: int = 32,
        temperature: float = 1.0,
        seed: int | None = None,
        top_p: float = 1.0,
    ) -> "GroupHandle":
        """Each engine's share submitted at once (sync engines: each in a thread, joined here); one handle."""
        for engine in self.engines:
            engine.state.check_can_generate()
        shares = [
            (k, a, b) for k, (a, b) in enumerate(split(len(prompts), len(self.engines))) if b > a
        ]
        if self.cfg.engine is EngineKind("async"):
            return GroupHandle(
                [
                    self.engines[k].submit(
                        prompts[a:b], n, max_tokens, temperature, seed, top_p, prompt_offset=a
                    )
                    for k, a, b in shares
                ]
            )
        results: list[Any] = [None] * len(shares)

        def run(i: int, k: int, start: int, stop: int) -> None:
            try:
                results[i] = self.engines[k].submit(
                    prompts[start:stop],
                    n,
                    max_tokens,
                    temperature,
                    seed,
                    top_p,
                    prompt_offset=start,
                )
            except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread
                results[i] = exc

        threads = [
            threading.Thread(target=run, args=(i, *share), name=f"generate-{share[0]}", daemon=True)
            for i, share in enumerate(shares)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()  # bounded by vLLM itself: generation ends at max_tokens or when its engine core dies
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return GroupHandle(results)

    def off_engine_cores(self) -> contextlib.AbstractContextManager[None]:
        return self.engines[0].off_engine_cores()  # the engines share the cores they were given

    def refit(self, version: int, send: Send) -> RefitStats:
        """One refit of every worker of every engine: each bucket packed once for all of them."""
        return self.refitter.refit(version, send)

    def update_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int
    ) -> RefitStats:
        return self.refitter.update_weights(named_tensors, version)

    def sleep(self, level: int | None = None) -> None:
        for engine in self.engines:
            engine.sleep(level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        for engine in self.engines:
            engine.wake_up(tags)

    def close(self) -> None:
        """Idempotent: closes every engine (each closes its workers' receivers), then the sender."""
        if self._closed:
            return
        self._closed = True
        errors = []
        for engine in self.engines:
            try:
                engine.close()
            except Exception as exc:  # noqa: BLE001 - close the others first, then raise it
                errors.append(exc)
        if getattr(self, "refitter", None) is not None:
            self.refitter.close()
        if errors:
            raise errors[0]

    def __enter__(self) -> "EngineGroup":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class GroupHandle:
    """The engines' handles of one submit, as one: samples in prompt order."""

    def __init__(self, handles: list[Any]) -> None:
        self._handles = handles

    @property
    def finished_at(self) -> float | None:
        times = [h.finished_at for h in self._handles]
        return None if any(t is None for t in times) else max(times, default=time.perf_counter())

    def done(self) -> bool:
        return all(h.done() for h in self._handles)

    def result(self, timeout_s: float | None = None) -> list[Sample]:
        return [s for h in self._handles for s in h.result(timeout_s)]


def split(num_prompts: int, num_engines: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) shares of `num_prompts`, sizes differing by at most one, in engine order."""
    return [
        (k * num_prompts // num_engines, (k + 1) * num_prompts // num_engines)
        for k in range(num_engines)
    ]
