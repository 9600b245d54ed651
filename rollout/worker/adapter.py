"""A LoRA refit's end in the vLLM worker: one adapter version from tensors into vLLM's LoRA manager.

vLLM loads adapters from a directory (`LoRARequest.lora_path`) when a request first names them. A
refit installs each version in memory instead: the tensors (PEFT names, copied out of the transfer's
buckets) become a `LoRAModel` (`LoRAModel.from_lora_tensors`, as vLLM's own directory loader builds
it) that goes straight into the worker's LoRA manager under LoRA id `lora_id`. A request naming that id
then finds it registered and never reads its `lora_path`. The newest `max_versions` installed versions
stay registered, pinned in vLLM's adapter cache (a request started on an older one finishes on it,
and adapters vLLM loads from directories beside them never evict them); older ones are removed.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch

from rollout.worker.rpc import AdapterSpec


class AdapterVersions:
    """The adapter versions this worker installed, newest last, in vLLM's worker LoRA manager."""

    def __init__(self, lora_manager: Any) -> None:
        if lora_manager is None:
            raise ValueError(
                "a LoRA refit reached an engine started without LoRA (enable_lora): set "
                "rollout.adapter when building the engine"
            )
        self.manager = lora_manager  # vllm.lora.worker_manager.LRUCacheWorkerLoRAManager
        self.installed: deque[int] = deque()

    def install(self, spec: AdapterSpec, tensors: dict[str, torch.Tensor]) -> None:
        """Install `tensors` as LoRA id `spec.lora_id` (replacing that id if present), then remove the
        versions beyond the newest `spec.max_versions`."""
        from vllm.lora.peft_helper import PEFTHelper

        manager = self.manager
        adapters = manager._adapter_manager  # vLLM's LoRAModelManager: no public add of a LoRAModel
        helper = PEFTHelper.from_dict(spec.peft_config())
        helper.validate_legal(manager.lora_config)  # names a rank above max_lora_rank
        lora = manager._lora_model_cls.from_lora_tensors(
            spec.lora_id,
            tensors,
            peft_helper=helper,
            device="cpu",
            dtype=manager.lora_config.lora_dtype,
            model_vocab_size=manager.vocab_size,
            weights_mapper=_rename_mapper(adapters.model),
        )
        self._check_modules(lora, spec)
        if spec.lora_id in manager.list_adapters():
            adapters.remove_adapter(spec.lora_id)
        if spec.lora_id in self.installed:
            self.installed.remove(spec.lora_id)
        while len(self.installed) >= spec.max_versions:
            adapters.remove_adapter(self.installed.popleft())
        if len(adapters) + 1 > adapters.capacity:  # make room as vLLM does: the oldest unpinned
            adapters.remove_oldest_adapter()  # (one vLLM loaded from a directory; ours are pinned)
        adapters.add_adapter(lora)
        # pinned in vLLM's CPU cache only (its LRU never evicts a refit's version: there is no
        # directory to reload it from); the GPU slots stay vLLM's to schedule
        adapters._registered_adapters.pin(spec.lora_id)
        self.installed.append(spec.lora_id)

    @staticmethod
    def _check_modules(lora: Any, spec: AdapterSpec) -> None:
        if not lora.loras:
            raise ValueError(
                f"LoRA refit to id {spec.lora_id}: no tensor was a LoRA weight (names like "
                "'base_model.model.<module>.lora_A.weight', from peft.get_peft_model_state_dict)"
            )
        unknown = sorted(
            name for name in lora.loras if name.rsplit(".", 1)[-1] not in spec.target_modules
        )
        if unknown:
            raise ValueError(
                f"LoRA refit to id {spec.lora_id}: tensors for {unknown[:3]} outside "
                f"rollout.adapter.target_modules={list(spec.target_modules)}"
            )


def _rename_mapper(model: Any) -> Any:
    """As vLLM's directory loader: the model's Hugging Face -> vLLM renames, without its stacking."""
    mapper = getattr(model, "hf_to_vllm_mapper", None)
    return mapper.get_rename_mapper() if mapper is not None else None
