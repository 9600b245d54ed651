"""The async rollout engine: vLLM's AsyncLLM in this process, on a background event loop, behind the
rollout API (generate, update_weights, sleep, wake_up, close) plus submit/collect, so generation can
run while the trainer trains. A refit pauses generation (`rollout.pause_mode`: wait, abort or keep)
and moves the weights through the same worker extension, transfer and cache-reset policy as the sync
engine (rollout/engine.py); samples carry the weight version of every token where vLLM tags them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import os
import queue
import threading
import time
from typing import Any, Awaitable, Iterable, Iterator, Sequence

import torch

from rollout.api import RefitStats, Sample, Send, send_tensors
from rollout.bounded import EngineCoreWatch
from rollout.cache_reset import (
    ASYNC_LLM_CALLS,
    Cache,
    caches_to_reset,
    check_reset,
    reset_calls,
)
from rollout.config import Mode, RolloutConfig
from rollout.engine import (
    check_awake,
    check_engine_setup,
    engine_kwargs,
    prompt_inputs,
    resolved_transfer,
    sampling_params,
    to_samples,
    vllm_worker_env,
)
from rollout.platform import Platform, get_platform
from rollout.refit import EngineState, Refitter
from rollout.vllm_compat import (
    has_weight_versions,
    installed_vllm_version,
    pause_generation_kwargs,
    renders_in_one_call,
    token_versions,
)
from rollout.vllm_logs import vllm_logging_env
from rollout.vllm_segments import EngineSegments
from rollout.vllm_sockets import VllmSocketDir
from rollout.worker.rpc import ReceiveRequest

logger = logging.getLogger(__name__)


class Handle:
    """The samples of one `submit()`, filled in by the event loop as its prompts finish.

    Example:
        handle = ro.submit(prompts, n=4, max_tokens=8, seed=0)
        for group in handle.as_completed(timeout_s=60):   # one prompt's n samples at a time
            ...
        samples = handle.result(timeout_s=60)             # all of them, grouped in prompt order
    """

    def __init__(self, num_prompts: int, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._groups: list[list[Sample] | None] = [None] * num_prompts
        self._finished: queue.Queue[int | BaseException] = queue.Queue()
        self._remaining = num_prompts
        self._done = threading.Event()
        self._error: BaseException | None = None
        self.finished_at: float | None = None  # time.perf_counter() when the last prompt finished
        if num_prompts == 0:
            self._done.set()
            self.finished_at = time.perf_counter()

    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout_s: float | None = None) -> list[Sample]:
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        if not self._done.wait(timeout_s):
            raise TimeoutError(
                f"async rollout: {self._remaining} prompt(s) still unfinished after {timeout_s} s"
            )
        if self._error is not None:
            raise RuntimeError(f"async rollout: the batch failed: {self._error}") from self._error
        return [s for group in self._groups for s in group]  # type: ignore[union-attr]

    def as_completed(self, timeout_s: float | None = None) -> Iterator[list[Sample]]:
        """Each prompt's samples as soon as they finish; `timeout_s` bounds the wait for the whole batch."""
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        for _ in range(len(self._groups)):
            try:
                item = self._finished.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(
                    f"async rollout: {self._remaining} prompt(s) still unfinished at the deadline"
                ) from None
            if isinstance(item, BaseException):
                raise RuntimeError(f"async rollout: the batch failed: {item}") from item
            yield self._groups[item]  # type: ignore[misc]

    # called on the event loop
    def _finish(self, index: int, samples: list[Sample]) -> None:
        self._groups[index] = samples
        self._remaining -= 1
        self._finished.put(index)
        if self._remaining == 0:
            self.finished_at = time.perf_counter()
            self._done.set()

    def _fail(self, error: BaseException) -> None:
        if self._done.is_set():
            return
        self._error = error
        self._finished.put(error)
        self.finished_at = time.perf_counter()
        self._done.set()


class AsyncVllmRollout:
    """vLLM's AsyncLLM on a background event loop. Build it with `build_rollout(cfg)`, cfg.engine=async.

    Example:
        with build_rollout(RolloutConfig(engine="async", pause_mode="keep"), model_path) as ro:
            ro.update_weights(model.named_parameters(), version=1)
            handle = ro.submit(prompts, n=4, max_tokens=8, seed=0)          # returns at once
            ...                                                             # train meanwhile
            ro.update_weights(model.named_parameters(), version=2)          # pause, refit, resume
            samples = handle.result()   # keep: tokens of versions 1 and 2 (Sample.token_versions)
    """

    def __init__(
        self,
        cfg: RolloutConfig,
        model_path: str,
        platform: Platform | None = None,
        worker_extension: str | None = None,
        engine_index: int = 0,
    ) -> None:
        """`worker_extension`, `engine_index`: as for VllmRollout."""
        self.cfg = cfg
        self.engine_index = engine_index
        self.worker_extension = worker_extension
        self.model_path = str(model_path)
        self.platform = platform or get_platform(cfg.backend.name)
        self.vllm_version = installed_vllm_version()
        self._can_sleep = check_engine_setup(cfg, self.platform, self.vllm_version)
        transfer = resolved_transfer(cfg, self.platform)
        self.state = EngineState(dummy_weights=cfg.backend.load_format == "dummy")
        self.refitter = Refitter(
            [self],
            self.platform.device_type,
            cfg.endpoint_dir,
            cfg.timeouts,
            transfer,
            cfg.load_path,
            cfg.backend.tensor_parallel_size,
        )
        self._ids = itertools.count()
        self._tasks: set[asyncio.Task] = set()
        # (trainer's cores, engine's cores), or None: vLLM binds its worker as it likes (rollout.engine_cores)
        self._cores = split_cores(cfg.engine_cores) if self.platform.device_type == "cpu" else None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="async-rollout-loop", daemon=True
        )
        self._thread.start()
        self.sockets = VllmSocketDir()
        try:
            self._resumed = self._call(_new_event(), "creating the resume event")
            self.engine = self._call(self._start(), "engine start-up")
            self._tag_version(self.version)
            if (
                self._cores is not None
            ):  # the loop shares the GIL with the trainer: it runs on the trainer's cores
                os.sched_setaffinity(self._thread.native_id, self._cores[0])
        except BaseException:
            self._stop_loop()
            self.sockets.remove()
            raise
        self.vllm_segments = EngineSegments.of_client(
            self.engine.engine_core, f"async engine {engine_index}"
        )  # see VllmRollout
        self._core_watch = EngineCoreWatch(
            self.engine.engine_core, f"async engine {engine_index}", loop=self._loop
        )
        self.multimodal = bool(getattr(self.engine.model_config, "is_multimodal_model", False))
        self._set_worker_idle_spin()
        if cfg.graph_audit:  # the model as the CUDA graphs captured it (rollout/graph_audit.py)
            self._call(self.engine.collective_rpc("refit_audit_start"), "refit_audit_start")
        self._tokenizer = self.engine.get_tokenizer()
        try:  # what AsyncLLM itself parses a raw prompt with (vLLM 0.24, 0.32); else prompts go to it raw
            from vllm.renderers.inputs.preprocess import parse_model_prompt

            self._parse_prompt: Any = parse_model_prompt
        except ImportError:
            self._parse_prompt = None

    async def _start(self) -> Any:
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        kwargs = engine_kwargs(
            self.cfg,
            self.model_path,
            self.platform,
            self._can_sleep,
            self.worker_extension or ASYNC_WORKER_EXTENSION,
        )
        # Built on the loop: the engine-core client's sockets and the output handler belong to it.
        tp, k, num_engines = (
            self.cfg.backend.tensor_parallel_size,
            self.engine_index,
            self.cfg.num_engines,
        )
        if self._cores is None:
            env = self.platform.worker_env(k, num_engines, tp)
        else:  # the engine-core process inherits this (the loop's) thread's cores; the worker binds its own
            env = self.platform.worker_env(
                k, num_engines, tp, units=sorted(self._cores[1]), bind_alone=True
            )
            os.sched_setaffinity(0, self._cores[1])
        env = {
            **env,
            **vllm_logging_env(self.cfg.vllm_log_file, self.cfg.vllm_console_level),
            **self.sockets.env,
        }
        with vllm_worker_env(env):
            return AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs, disable_log_stats=True))

    def _set_worker_idle_spin(self) -> None:
        """`rollout.worker_idle_spin_s`: how long vLLM's workers busy-wait for the scheduler's next step
        before they sleep on a socket (vLLM's own: 1 s). Generation here runs beside training, so a
        worker spinning through the trainer's step takes a core from it; our extension sets the wait."""
        seconds = self.cfg.worker_idle_spin_s
        if seconds is None:
            return
        if self.worker_extension is not None:
            logger.info(
                "rollout.worker_idle_spin_s not applied: worker extension %s is the caller's",
                self.worker_extension,
            )
            return
        counts = self._call(
            self.engine.collective_rpc("refit_set_idle_spin", args=(seconds,)),
            "refit_set_idle_spin",
        )
        logger.debug("worker idle spin %s s on %s shm reader(s) per worker", seconds, counts)

    @property
    def trainer_cores(self) -> set[int] | None:
        """The cores left to the trainer (rollout.engine_cores), or None where they are not split."""
        return None if self._cores is None else set(self._cores[0])

    @contextlib.contextmanager
    def off_engine_cores(self) -> Iterator[None]:
        """The calling thread runs on the trainer's cores inside (threads it starts there inherit them), as
        before afterwards. Training beside generation: neither takes the other's core, and the trainer's
        thread is not descheduled behind vLLM's while the loop waits for the GIL (or the other way round)."""
        if self._cores is None:
            yield
            return
        before = os.sched_getaffinity(0)
        os.sched_setaffinity(0, self._cores[0])
        try:
            yield
        finally:
            os.sched_setaffinity(0, before)

    @property
    def version(self) -> int:
        return self.state.version

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the engine computes in (after vLLM resolved `auto`)."""
        return self.engine.model_config.dtype

    @property
    def tokenizer(self) -> Any:
        if self.engine is None:
            raise RuntimeError("tokenizer of a closed rollout")
        return self.engine.get_tokenizer()

    # -- generation -----------------------------------------------------------------------------
    def submit(
        self,
        prompts: Sequence[str | Sequence[int]],
        n: int = 1,
        max_tokens: int = 32,
        temperature: float = 1.0,
        seed: int | None = None,
        top_p: float = 1.0,
        prompt_offset: int = 0,
    ) -> Handle:
        """Start `n` samples per prompt and return at once; seeds and `prompt_offset` as in the sync engine's
        generate()."""
        from vllm.sampling_params import RequestOutputKind

        self.state.check_can_generate()
        # FINAL_ONLY and no incremental detokenizer: this process's event loop shares the GIL with the
        # trainer, and per-step output work there slowed training (0.13 -> 0.10 s of loop CPU per
        # 32x16-sample batch without detokenizing); the text is decoded once, when a request finishes.
        params = sampling_params(
            len(prompts),
            n,
            max_tokens,
            temperature,
            seed,
            top_p,
            prompt_offset,
            output_kind=RequestOutputKind.FINAL_ONLY,
            detokenize=False,
        )
        handle = Handle(len(prompts), self.cfg.generate_timeout_s)
        self._loop.call_soon_threadsafe(
            self._spawn, handle, prompt_inputs(prompts), params, prompt_offset
        )
        return handle

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        n: int = 1,
        max_tokens: int = 32,
        temperature: float = 1.0,
        seed: int | None = None,
        top_p: float = 1.0,
    ) -> list[Sample]:
        """`n` samples per prompt, grouped in prompt order: submit() and wait (the sync engine's call)."""
        return self.submit(prompts, n, max_tokens, temperature, seed, top_p).result()

    def _spawn(self, handle: Handle, prompts: list[Any], params: list[Any], offset: int) -> None:
        """On the loop, once per submit(): the batch's prompts tokenized in one call, one task per prompt."""
        try:
            prompts = self._render(prompts)
        except Exception as exc:  # noqa: BLE001 - handed to the caller waiting on the handle
            handle._fail(exc)
            return
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            task = self._loop.create_task(self._request(handle, i, prompt, p, offset))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _render(self, prompts: list[Any]) -> list[Any]:
        """The prompts as vLLM's engine inputs, rendered (tokenized) here in one call, on vLLM 0.32, where
        AsyncLLM would hand each raw prompt to its renderer's thread pool, one hop per prompt through a thread
        that shares this process's GIL. Elsewhere the prompts as they are (0.24 has the renderer too, but this
        path never ran there)."""
        renderer = getattr(self.engine, "renderer", None)
        if (
            self._parse_prompt is None
            or not hasattr(renderer, "render_cmpl")
            or not renders_in_one_call(self.vllm_version)
        ):
            return prompts
        model_config = self.engine.model_config
        return renderer.render_cmpl([self._parse_prompt(model_config, p) for p in prompts])

    async def _request(
        self, handle: Handle, index: int, prompt: Any, params: Any, offset: int
    ) -> None:
        try:
            while True:
                version = (
                    self.version
                )  # what the engine holds now: the label where vLLM tags nothing
                final = None
                async for out in self.engine.generate(prompt, params, f"refit-{next(self._ids)}"):
                    final = out
                if any(c.finish_reason == "abort" for c in final.outputs) and not self.state.closed:
                    await (
                        self._resumed.wait()
                    )  # aborted by a refit (pause_mode=abort): again, on the new weights
                    continue
                samples = to_samples(offset + index, final, version, self._versions_of)
                # as the sync engine's text: special tokens skipped; one call per prompt (vLLM's tokenizer
                # lends a copy from its pool per call)
                texts = self._tokenizer.batch_decode(
                    [s.token_ids for s in samples], skip_special_tokens=True
                )
                for sample, text in zip(samples, texts):
                    sample.text = text
                handle._finish(index, samples)
                return
        except asyncio.CancelledError:
            handle._fail(RuntimeError("the rollout closed with the request in flight"))
            raise
        except Exception as exc:  # noqa: BLE001 - handed to the caller waiting on the handle
            handle._fail(exc)

    def _versions_of(self, completion: Any) -> list[int] | None:
        return token_versions(completion, self.vllm_version)

    # -- colocate memory hand-off ----------------------------------------------------------------
    def sleep(self, level: int | None = None) -> None:
        """colocate: release device memory while the trainer runs (where the platform can: in-flight
        requests are then handled as `pause_mode` says); standalone: no-op."""
        if self.cfg.mode is Mode.standalone:
            return
        level = self.cfg.backend.sleep_level if level is None else level
        if self._can_sleep:
            self.platform.check_sleep_level(level)
            self._call(self._clear_resumed(), "clearing the resume event")
            self._call(
                self.engine.sleep(level, mode=self.cfg.pause_mode.value), f"sleep(level={level})"
            )
        self.state.asleep = True
        self.state.weights_discarded = self.state.weights_discarded or level == 2

    def wake_up(self, tags: list[str] | None = None) -> None:
        if not self.state.asleep:
            return
        if self._can_sleep:
            check_awake(
                self._call(self.engine.wake_up(tags), f"wake_up({tags})"), tags, self.vllm_version
            )
        if tags is None or "kv_cache" in tags:
            self.state.asleep = False
            self._reset_caches(after_sleep=True)
            self._resume()

    # -- refit: the verb, and this engine's part in it (rollout.refit.RefitTarget) -----------------
    def refit(self, version: int, send: Send) -> RefitStats:
        """Pause generation (`pause_mode`), refit through the transfer, tag the new version, reset the
        caches, resume. On failure raises RefitError and stays paused until a later refit succeeds."""
        stats = self.refitter.refit(version, send)
        if self.cfg.graph_audit:
            from rollout.graph_audit import GraphAudit

            stats.graph_audit = GraphAudit.of(
                self._call(self.engine.collective_rpc("refit_audit"), "refit_audit")
            )
        return stats

    def update_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int
    ) -> RefitStats:
        """A refit from this process: one pass over `named_tensors`."""
        return self.refit(version, send_tensors(named_tensors))

    # Two loop round trips around the transfer (not one per call): this process's loop shares a core
    # and the GIL with the trainer, whose step waits for the refit.
    def refit_prepare(self) -> bool:
        if self.state.asleep and self._can_sleep:  # sleep() already paused the scheduler
            self._call(
                self.engine.wake_up(["weights"]), "wake_up(['weights'])"
            )  # the KV cache stays released
        else:
            self._call(self._pause(), f"pausing generation ({self.cfg.pause_mode.value})")
        return self.state.asleep

    def refit_rpc(self, request: ReceiveRequest) -> list[dict[str, Any]]:
        rpc = self.engine.collective_rpc("refit_receive", args=(request.to_dict(),))
        return self._call(
            rpc, "refit_receive", self.cfg.timeouts.worker_reply_s
        )  # every worker's answer

    def refit_finish(self, version: int, was_asleep: bool) -> tuple[Cache, ...]:
        self.state.asleep = False
        wanted = self._caches_wanted(after_sleep=was_asleep)
        slept = was_asleep and self._can_sleep
        return self._call(
            self._after_refit(version, slept, wanted), "tagging the version, cache reset, resume"
        )

    async def _pause(self) -> None:
        """Stop scheduling (`rollout.pause_mode`); what is aborted waits for the resume event to retry."""
        self._resumed.clear()
        kwargs = pause_generation_kwargs(self.cfg.pause_mode.value)
        core = getattr(self.engine, "engine_core", None)
        if has_weight_versions(self.vllm_version) and hasattr(core, "pause_scheduler_async"):
            # What AsyncLLM.pause_generation does with the caches kept (clear_cache=False: no mm-cache
            # clear either), less its closing 20 ms sleep, there "not required for correctness, just more
            # intuitive ordering": a request drained or aborted by the pause finishes on its own task.
            await core.pause_scheduler_async(**kwargs)
        else:
            await self.engine.pause_generation(**kwargs)

    async def _after_refit(
        self, version: int, slept: bool, wanted: tuple[Cache, ...]
    ) -> tuple[Cache, ...]:
        """The new version's tag (before anything runs again: later tokens carry it), the KV cache back
        after a sleep, the cache reset, resume: one coroutine, so one round trip from the trainer."""
        if has_weight_versions(self.vllm_version):
            await self.engine.update_weight_version(str(version))
        if slept:
            check_awake(await self.engine.wake_up(["kv_cache"]), ["kv_cache"], self.vllm_version)
        caches = await self._reset_caches_async(wanted)
        await self.engine.resume_generation()
        self._resumed.set()
        return caches

    def _tag_version(self, version: int) -> None:
        if has_weight_versions(self.vllm_version):
            self._call(self.engine.update_weight_version(str(version)), "update_weight_version")

    def _caches_wanted(self, after_sleep: bool) -> tuple[Cache, ...]:
        return caches_to_reset(
            self.cfg.cache_reset, self.cfg.mode, self.vllm_version, self.multimodal, after_sleep
        )

    def _reset_caches(self, after_sleep: bool) -> tuple[Cache, ...]:
        return self._call(self._reset_caches_async(self._caches_wanted(after_sleep)), "cache reset")

    async def _reset_caches_async(self, wanted: tuple[Cache, ...]) -> tuple[Cache, ...]:
        """On the loop: each reset awaited in turn."""
        # Requests kept across the refit hold KV blocks of the old weights: preempting them makes vLLM
        # recompute those blocks with the new weights (and lets the reset succeed).
        done = []
        for cache, call in reset_calls(
            self.engine,
            wanted,
            self.vllm_version,
            ASYNC_LLM_CALLS,
            prefix_kwargs={"reset_running_requests": True},
        ):
            check_reset(cache, await call())
            done.append(cache)
        return tuple(done)

    def _resume(self) -> None:
        self._call(self.engine.resume_generation(), "resume_generation")
        self._call(self._set_resumed(), "setting the resume event")

    async def _clear_resumed(self) -> None:
        self._resumed.clear()

    async def _set_resumed(self) -> None:
        self._resumed.set()

    # -- lifetime -------------------------------------------------------------------------------
    def close(self) -> None:
        """Idempotent, bounded by the backend's shutdown timeout even with requests in flight: closes
        the transfer on both ends, cancels what still runs, shuts vLLM's processes and the loop down."""
        if self.state.closed:
            return
        self.state.closed = True
        timeout_s = self.cfg.backend.shutdown_timeout_s
        dead = self._core_watch.dead()
        if dead:  # a dead core answers nothing
            logger.warning("closing %s: skipping the receivers' close, shutting vLLM down", dead)
        try:
            if self.state.receivers_open and not dead:
                self._call(
                    self.engine.collective_rpc(
                        "refit_close", timeout=self.refitter.transfer.timeout_s
                    ),
                    "refit_close",
                    self.refitter.transfer.timeout_s,
                )
        except Exception as exc:  # noqa: BLE001 - a dead engine's receivers died with it; shut down regardless
            logger.warning("closing the workers' receivers failed (engine dead or hung?): %s", exc)
        finally:
            self.refitter.close()
            self.vllm_segments.record()
            self._core_watch.stop()
            try:
                self._call(self._cancel_requests(), "cancelling in-flight requests", timeout_s)
                self._call(self._shutdown(timeout_s), "engine shutdown", timeout_s)
            finally:
                self._stop_loop()
                self.vllm_segments.release()
                self.sockets.remove()

    async def _cancel_requests(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _shutdown(self, timeout_s: float) -> None:
        # vLLM's default (5 s) force-kills a busy engine core; this only bounds a stuck shutdown.
        self.engine.shutdown(timeout=timeout_s)
        # AsyncLLM.__del__ shuts down again; dropped here it runs now, not at interpreter exit (where
        # vLLM's module globals are already gone and it raises).
        self.engine = None

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(self.cfg.backend.shutdown_timeout_s)
        if not self._thread.is_alive():
            self._loop.close()

    def _call(self, coro: Awaitable[Any], what: str, timeout_s: float | None = None) -> Any:
        """Run `coro` on the event loop and wait for it, at most `timeout_s` (default: generate_timeout_s)."""
        timeout_s = self.cfg.generate_timeout_s if timeout_s is None else timeout_s
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(
                f"async rollout: {what} did not finish within {timeout_s} s"
            ) from None

    def __enter__(self) -> "AsyncVllmRollout":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def split_cores(engine_cores: int | None) -> tuple[set[int], set[int]] | None:
    """(trainer's cores, engine's cores) out of those this process may run on: `rollout.engine_cores` of them,
    the last ones, for vLLM's processes (null: half); None where there is nothing to split (one core, or 0)."""
    allowed = sorted(os.sched_getaffinity(0))
    count = len(allowed) // 2 if engine_cores is None else engine_cores
    if count == 0 or len(allowed) < 2:
        return None
    if count >= len(allowed):
        raise ValueError(
            f"rollout.engine_cores={engine_cores} leaves the trainer no core of the {len(allowed)} "
            f"this process may run on ({allowed})"
        )
    return set(allowed[:-count]), set(allowed[-count:])


ASYNC_WORKER_EXTENSION = "rollout.worker.extension.AsyncWorkerExtension"  # + refit_set_idle_spin


async def _new_event() -> asyncio.Event:
    event = asyncio.Event()  # made on the loop that waits on it
    event.set()  # generation runs until the first pause
    return event
