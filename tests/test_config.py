"""Every config option composes into its typed config; bad overrides fail clearly (recipes: tests/trainer)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from rollout.config import Backend, BackendConfig, CacheReset, Mode
from rollout.transfer.config import Sync, TransferConfig, Transport
from trainers.config import PPOConfig, register_configs, to_typed

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

register_configs()


def _compose(overrides: list[str], config_dir: Path = CONF, name: str = "ppo") -> PPOConfig:
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        return to_typed(compose(config_name=name, overrides=overrides))


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_default_composes_to_embedded_cpu_backend():
    cfg = _compose([])
    assert isinstance(cfg, PPOConfig)
    assert cfg.rollout.backend.name is Backend.vllm_cpu
    assert cfg.rollout.mode is Mode.colocate
    assert cfg.rollout.transfer.sync is Sync.fenced
    assert cfg.model.path is None


@pytest.mark.parametrize("group", ["rollout/backend", "algorithm", "task", "logger", "model"])
def test_every_group_option_composes(group):
    options = _options(group)
    assert options, f"conf/{group} has no options"
    for option in options:
        value = f"[{option}]" if group == "logger" else option
        cfg = _compose([f"{group}={value}"])
        assert isinstance(cfg, PPOConfig)
        if group == "rollout/backend":
            assert cfg.rollout.backend.name.value == option


@pytest.mark.parametrize(
    "override, check",
    [
        ("rollout.mode=standalone", lambda c: c.rollout.mode is Mode.standalone),
        ("rollout.transfer.transport=cuda_ipc", lambda c: c.rollout.transfer.transport is Transport.cuda_ipc),
        ("rollout.transfer.bucket_mb=16", lambda c: c.rollout.transfer.bucket_mb == 16),
        ("rollout.transfer.sync=double_buffer", lambda c: c.rollout.transfer.sync is Sync.double_buffer),
        ("rollout.transfer.sync=clone", lambda c: c.rollout.transfer.sync is Sync.clone),
        ("rollout.transfer.timeout_s=5", lambda c: c.rollout.transfer.timeout_s == 5.0),
        ("rollout.transfer.spin_us=0", lambda c: c.rollout.transfer.spin_us == 0),
        ("rollout.cache_reset=none", lambda c: c.rollout.cache_reset is CacheReset.none),
        ("model.path=/models/qwen", lambda c: c.model.path == "/models/qwen"),
        ("trainer.total_steps=3", lambda c: c.trainer.total_steps == 3),
    ],
)
def test_documented_overrides(override, check):
    assert check(_compose([override]))


@pytest.mark.parametrize(
    "override, exc, words",
    [
        ("rollout/backend=vllm_tpu", ConfigCompositionException, ["vllm_tpu", "vllm_cpu", "vllm_gpu", "vllm_ascend"]),
        ("rollout.transfer.sync=eager", ConfigCompositionException, ["rollout.transfer.sync", "fenced", "double_buffer", "clone"]),
        ("rollout.transfer.bucket_mb=0", ValueError, ["rollout.transfer.bucket_mb", ">= 1"]),
        ("rollout.transfer.bucket_mb=1.5", ConfigCompositionException, ["rollout.transfer.bucket_mb"]),
        ("rollout.transfer.bukket_mb=8", ConfigCompositionException, ["bukket_mb"]),
        ("rollout.mode=shared", ConfigCompositionException, ["rollout.mode", "colocate", "standalone"]),
        ("rollout.transfer.timeout_s=0", ValueError, ["rollout.transfer.timeout_s"]),
        ("rollout.transfer.spin_us=-1", ValueError, ["rollout.transfer.spin_us", ">= 0"]),
        ("algorithm=reinforce", ConfigCompositionException, ["reinforce", "grpo", "ppo"]),
    ],
)
def test_bad_overrides_fail_naming_the_key(override, exc, words):
    with pytest.raises(exc) as info:
        _compose([override])
    text = str(info.value) + str(info.value.__cause__ or "")
    for word in words:
        assert word in text, f"{word!r} missing from error: {text}"


def test_dataclasses_validate_without_hydra():
    with pytest.raises(ValueError, match="rollout.transfer.sync='eager' is not one of: fenced, double_buffer, clone"):
        TransferConfig(sync="eager")
    with pytest.raises(ValueError, match="rollout.backend.name"):
        BackendConfig(name="tpu")
    assert TransferConfig(transport="shm", bucket_mb=64, sync="fenced", timeout_s=30.0).bucket_bytes == 64 << 20
