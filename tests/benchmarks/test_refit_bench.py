"""The end-to-end refit benchmark (benchmarks/refit.py): its config composes and validates, and a tiny run
into a live vLLM (CPU) engine measures every path and checks the tokens."""

from __future__ import annotations

import os

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from benchmarks import refit
from rollout.config import Backend

CONF_DIR = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks", "conf"
)


def compose_root(*overrides: str) -> refit.RefitBenchRoot:
    refit._register()
    with initialize_config_dir(config_dir=os.path.abspath(CONF_DIR), version_base="1.3"):
        return OmegaConf.to_object(compose("refit", overrides=list(overrides)))


def test_refit_bench_config_composes_into_typed_dataclasses():
    root = compose_root(
        "bench.model=qwen2_0_5b", "rollout.transfer.bucket_mb=64", "bench.disk=false"
    )
    assert (
        root.bench.model is refit.BenchModel.qwen2_0_5b and root.bench.backend is Backend.vllm_cpu
    )
    assert (
        root.rollout.transfer.bucket_bytes == 64 << 20 and root.rollout.transfer.timeout_s == 300.0
    )
    assert root.bench.disk is False and root.bench.max_model_len == 512


def test_refit_bench_config_rejects_what_cannot_run():
    with pytest.raises(Exception, match="bench.model=qwen2_7b needs bench.backend=vllm_gpu"):
        compose_root("bench.model=qwen2_7b")
    with pytest.raises(Exception, match="bench.num_repeats"):
        compose_root("bench.num_repeats=0")
    with pytest.raises(Exception, match="bench.modle"):
        compose_root("bench.modle=tiny")


def test_tiny_refit_bench_measures_every_path_and_the_tokens_agree(tmp_path):
    result = refit.run(
        compose_root(
            "bench.num_repeats=1", "rollout.transfer.bucket_mb=1", "bench.compare_modes=true"
        )
    )
    for key in (
        "floor_s",
        "refit_s",
        "disk_reload_s",
        "vllm_reload_from_memory_s",
        "engine_start_s",
    ):
        assert result[key] > 0, key
    assert result["vllm_reload_error"] is None and result["num_buckets"] >= 2
    assert result["worker_device"] == "cpu" and result["transport"] == "shm"
    assert result["scaled_weights_changed_tokens"] is True and result["load_path"] == "layerwise"
    assert result["one_copy_floor_s"] > 0 and result["refit_over_one_copy"] > 0
    # the refitted engine against a FRESH engine on the same weights (not vLLM's reload from disk)
    assert result["same_greedy_tokens_refit_vs_fresh"] is True
    assert result["max_logprob_diff_refit_vs_fresh"] < 1e-5
    modes = result[
        "modes"
    ]  # bench.compare_modes: direct against bucketed fenced on the same engine
    assert modes["direct"]["num_buckets"] == 0 and modes["bucketed_fenced"]["num_buckets"] >= 2
    assert modes["one_copy_floor_s"] > 0 and modes["direct_over_bucketed_fenced"] > 0
    assert (
        len(modes["direct"]["all_refit_s"]) == 2
        and len(modes["direct"]["trainer_memory_mb_per_block"]) == 2
    )
