"""Cache-reset policy: which engine caches a refit (or a wake-up) invalidates, so no result of old weights is served."""

from __future__ import annotations

import logging
from enum import Enum
from typing import Any, Callable, Mapping

from rollout.config import CacheReset, Mode
from rollout.vllm_compat import has_encoder_cache_reset, resolve_call

logger = logging.getLogger(__name__)


class Cache(str, Enum):
    prefix = "prefix"  # KV blocks of shared prompt prefixes, computed with the old weights
    encoder = "encoder"  # encoder outputs (e.g. vision embeddings) of multimodal inputs
    mm = "mm"  # the multimodal processor / input cache


def caches_to_reset(
    policy: CacheReset | str,
    mode: Mode | str,
    vllm_version: str,
    multimodal: bool,
    after_sleep: bool,
) -> tuple[Cache, ...]:
    """The caches to invalidate after a refit, in reset order.

    auto: the prefix cache always; the encoder cache on vLLM >= 0.17 and always after a sleep in colocate
    mode (the gate in `reset_caches` then says if the installed vLLM lacks the call); the multimodal cache
    for multimodal models. `all` asks for every cache; `none` keeps every cache (only to show staleness).
    """
    policy, mode = CacheReset(policy), Mode(mode)
    if policy is CacheReset.none:
        return ()
    if policy is CacheReset.prefix:
        return (Cache.prefix,)
    if policy is CacheReset.all:
        return (Cache.prefix, Cache.encoder, Cache.mm)
    caches = [Cache.prefix]
    if has_encoder_cache_reset(vllm_version) or (mode is Mode.colocate and after_sleep):
        caches.append(Cache.encoder)
    if multimodal:
        caches.append(Cache.mm)
    return tuple(caches)


_WHAT = {
    Cache.prefix: "prefix-cache reset",
    Cache.encoder: "encoder-cache reset",
    Cache.mm: "multimodal-cache reset",
}
# Where each reset lives: on the sync `LLM` the encoder reset sits on its LLMEngine; the AsyncLLM has all
# three itself, as coroutines (the async engine awaits them).
LLM_CALLS = {
    Cache.prefix: "reset_prefix_cache",
    Cache.encoder: "llm_engine.reset_encoder_cache",
    Cache.mm: "reset_mm_cache",
}
ASYNC_LLM_CALLS = {
    Cache.prefix: "reset_prefix_cache",
    Cache.encoder: "reset_encoder_cache",
    Cache.mm: "reset_mm_cache",
}


def reset_calls(
    llm: Any,
    caches: tuple[Cache, ...],
    vllm_version: str,
    calls: Mapping[Cache, str] = LLM_CALLS,
    prefix_kwargs: Mapping[str, Any] | None = None,
) -> list[tuple[Cache, Callable[[], Any]]]:
    """The reset of each of `caches` this vLLM has, as a call with its arguments bound, in order (a missing
    call logs once and is left out, never crashes). `prefix_kwargs` go to reset_prefix_cache (e.g.
    reset_running_requests=True: requests kept across a refit recompute their KV)."""
    out = []
    for cache in caches:
        if cache is Cache.encoder and not has_encoder_cache_reset(vllm_version):
            logger.warning(
                "vLLM %s predates the encoder-cache reset (>= 0.17): encoder cache kept",
                vllm_version,
            )
            continue
        call = resolve_call(llm, calls[cache], _WHAT[cache], version=vllm_version)
        if call is None:
            continue
        kwargs = dict(prefix_kwargs or {}) if cache is Cache.prefix else {}
        out.append((cache, lambda call=call, kwargs=kwargs: call(**kwargs)))
    return out


def check_reset(cache: Cache, result: Any) -> None:
    """reset_prefix_cache answers False when requests still run: their blocks would survive the refit."""
    if result is False:
        raise RuntimeError(
            f"vLLM refused to reset the {cache.value} cache (requests still running?)"
        )


def reset_caches(llm: Any, caches: tuple[Cache, ...], vllm_version: str) -> tuple[Cache, ...]:
    """Reset `caches` on a vLLM `LLM`; return those actually reset (see reset_calls; the AsyncLLM awaits the
    same calls, rollout/async_engine.py)."""
    done = []
    for cache, call in reset_calls(llm, caches, vllm_version):
        check_reset(cache, call())
        done.append(cache)
    return tuple(done)
