"""Several vLLM engines (data-parallel replicas) behind the one-engine API, fed by ONE refit.

`generate` splits the prompts into contiguous shares, one per engine, runs them concurrently (each
`LLM.generate` waits on its own engine-core process) and joins the samples in prompt order; each prompt
keeps the seeds it has on one engine, so samples do not depend on `num_engines`. `update_weights` packs
every bucket once for all K x TP workers: one sender, one receiver per worker. The engines move to a new
version together: if any worker fails, every engine refuses to generate until a refit succeeds.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Sequence

from rollout.config import RolloutConfig
from rollout.engine import RefitPhases, RefitStats, Sample, VllmRollout, refit_stats
from rollout.refit_channel import RefitChannel


class EngineGroup(RefitPhases):
    """`cfg.num_engines` engines of `cfg.backend.tensor_parallel_size` workers each. Build it with `build_rollout`.

    Example:
        cfg = RolloutConfig(num_engines=2)
        with build_rollout(cfg, model_path) as ro:                      # an EngineGroup
            samples = ro.generate(prompts, n=4, max_tokens=8, seed=0)  # as one engine would sample them
            stats = ro.update_weights(model.named_parameters(), version=1)  # every worker of both engines
            stats.worker_load_s                                         # one load time per worker
    """

    def __init__(self, cfg: RolloutConfig, model_path: str, worker_extension: str | None = None) -> None:
        self.cfg = cfg
        self.engines: list[VllmRollout] = []
        try:
            for k in range(cfg.num_engines):  # one at a time: each start sets its own worker environment
                self.engines.append(VllmRollout(cfg, model_path, worker_extension=worker_extension, engine_index=k))
        except BaseException:
            self.close()
            raise
        self.platform = self.engines[0].platform
        self.transfer = self.engines[0].transfer
        self._channel = RefitChannel(self.platform.device_type, cfg.endpoint_dir, cfg.timeouts,
                                     cfg.backend.tensor_parallel_size, cfg.num_engines)
        self._pending_refit: tuple[int, float, list[bool]] | None = None  # begin_refit: (version, start, slept)
        self._closed = False

    @property
    def tokenizer(self) -> Any:
        return self.engines[0].tokenizer

    @property
    def version(self) -> int:
        return self.engines[0].version

    @property
    def _endpoint(self) -> str | None:
        return self._channel.endpoint

    @property
    def vllm_segments(self) -> Any:
        """vLLM's shared memory of every engine (each engine's close() removes its own leftovers)."""
        from rollout.vllm_segments import EngineSegments

        return EngineSegments.merge("engine group", [engine.vllm_segments for engine in self.engines])

    def generate(self, prompts: Sequence[str | Sequence[int]], n: int = 1, max_tokens: int = 32,
                 temperature: float = 1.0, seed: int | None = None, top_p: float = 1.0) -> list[Sample]:
        """As VllmRollout.generate, over all engines; refuses (before any engine starts) if one cannot generate."""
        for engine in self.engines:
            engine._state.check_can_generate()
        shares = split(len(prompts), len(self.engines))
        results: list[list[Sample] | BaseException] = [[] for _ in shares]

        def run(k: int, start: int, stop: int) -> None:
            try:
                results[k] = self.engines[k].generate(prompts[start:stop], n, max_tokens, temperature, seed, top_p,
                                                      prompt_offset=start)
            except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread
                results[k] = exc

        threads = [threading.Thread(target=run, args=(k, a, b), name=f"generate-{k}", daemon=True)
                   for k, (a, b) in enumerate(shares) if b > a]
        for t in threads:
            t.start()
        for t in threads:
            t.join()  # bounded by vLLM itself: generation ends at max_tokens or when its engine core dies
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return [s for r in results for s in r]

    def _prepare(self, version: int) -> tuple[float, list[bool]]:
        if self._closed:
            raise RuntimeError("update_weights() on a closed rollout")
        return time.perf_counter(), [engine.prepare_refit() for engine in self.engines]

    def _receives(self) -> list[Any]:
        return [engine._receive for engine in self.engines]

    def _failed(self, version: int) -> None:
        for engine in self.engines:
            engine._state.failed_version = version

    def _done(self, version: int, start: float, was_asleep: list[bool], send_stats: Any, replies: list) -> RefitStats:
        caches = [engine.refit_done(version, slept) for engine, slept in zip(self.engines, was_asleep)]
        return refit_stats(version, time.perf_counter() - start, send_stats, replies, caches[0])

    def sleep(self, level: int | None = None) -> None:
        for engine in self.engines:
            engine.sleep(level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        for engine in self.engines:
            engine.wake_up(tags)

    def close(self) -> None:
        """Idempotent: closes every engine (each closes its workers' receivers), then the sender."""
        if getattr(self, "_closed", False):
            return
        self._closed = True
        errors = []
        for engine in self.engines:
            try:
                engine.close()
            except Exception as exc:  # noqa: BLE001 - close the others first, then raise it
                errors.append(exc)
        if getattr(self, "_channel", None) is not None:
            self._channel.close()
        if errors:
            raise errors[0]

    def __enter__(self) -> "EngineGroup":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def split(num_prompts: int, num_engines: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) shares of `num_prompts`, sizes differing by at most one, in engine order."""
    return [(k * num_prompts // num_engines, (k + 1) * num_prompts // num_engines) for k in range(num_engines)]
