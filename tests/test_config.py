"""Every config option composes into its typed config; bad overrides fail clearly (recipes: tests/trainer)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from rollout.config import Backend, BackendConfig, CacheReset, Mode, RefitTimeouts
from rollout.transfer.config import DirectFallback, Sync, TransferConfig, TransferMode, Transport
from trainers.config import (
    AlgorithmConfig,
    ConsoleLoggerConfig,
    JsonlLoggerConfig,
    ModelConfig,
    PPOConfig,
    TaskConfig,
    TensorboardLoggerConfig,
    WandbLoggerConfig,
    register_configs,
    to_typed,
)

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
        (
            "rollout.transfer.transport=cuda_ipc",
            lambda c: c.rollout.transfer.transport is Transport.cuda_ipc,
        ),
        ("rollout.transfer.bucket_mb=16", lambda c: c.rollout.transfer.bucket_mb == 16),
        (
            "rollout.transfer.sync=double_buffer",
            lambda c: c.rollout.transfer.sync is Sync.double_buffer,
        ),
        ("rollout.transfer.sync=clone", lambda c: c.rollout.transfer.sync is Sync.clone),
        ("rollout.transfer.timeout_s=5", lambda c: c.rollout.transfer.timeout_s == 5.0),
        ("rollout.transfer.spin_us=0", lambda c: c.rollout.transfer.spin_us == 0),
        ("rollout.transfer.mode=direct", lambda c: c.rollout.transfer.mode is TransferMode.direct),
        (
            "rollout.transfer.direct_fallback=bucketed",
            lambda c: c.rollout.transfer.direct_fallback is DirectFallback.bucketed,
        ),
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
        (
            "rollout/backend=vllm_tpu",
            ConfigCompositionException,
            ["vllm_tpu", "vllm_cpu", "vllm_gpu", "vllm_ascend"],
        ),
        (
            "rollout.transfer.sync=eager",
            ConfigCompositionException,
            ["rollout.transfer.sync", "fenced", "double_buffer", "clone"],
        ),
        ("rollout.transfer.bucket_mb=0", ValueError, ["rollout.transfer.bucket_mb", ">= 1"]),
        (
            "rollout.transfer.bucket_mb=1.5",
            ConfigCompositionException,
            ["rollout.transfer.bucket_mb"],
        ),
        ("rollout.transfer.bukket_mb=8", ConfigCompositionException, ["bukket_mb"]),
        (
            "rollout.mode=shared",
            ConfigCompositionException,
            ["rollout.mode", "colocate", "standalone"],
        ),
        ("rollout.transfer.timeout_s=0", ValueError, ["rollout.transfer.timeout_s"]),
        ("rollout.transfer.spin_us=-1", ValueError, ["rollout.transfer.spin_us", ">= 0"]),
        (
            "rollout.transfer.mode=zerocopy",
            ConfigCompositionException,
            ["rollout.transfer.mode", "bucketed", "direct"],
        ),
        (
            "rollout.transfer.direct_fallback=silent",
            ConfigCompositionException,
            ["direct_fallback", "error", "bucketed"],
        ),
        ("algorithm=reinforce", ConfigCompositionException, ["reinforce", "grpo", "ppo"]),
        (
            "rollout.transfer.timeout_s=500",
            ValueError,
            ["rollout.timeouts.next_bucket_s", "rollout.transfer.timeout_s"],
        ),
        (
            "rollout.timeouts.worker_reply_s=60",
            ValueError,
            ["rollout.timeouts.worker_reply_s", "next_bucket_s"],
        ),
        ("rollout.timeouts.receiver_exit_s=0", ValueError, ["rollout.timeouts.receiver_exit_s"]),
    ],
)
def test_bad_overrides_fail_naming_the_key(override, exc, words):
    with pytest.raises(exc) as info:
        _compose([override])
    text = str(info.value) + str(info.value.__cause__ or "")
    for word in words:
        assert word in text, f"{word!r} missing from error: {text}"


def test_dataclasses_validate_without_hydra():
    with pytest.raises(
        ValueError,
        match="rollout.transfer.sync='eager' is not one of: fenced, double_buffer, clone",
    ):
        TransferConfig(sync="eager")
    with pytest.raises(ValueError, match="rollout.backend.name"):
        BackendConfig(name="tpu")
    assert (
        TransferConfig(transport="shm", bucket_mb=64, sync="fenced", timeout_s=30.0).bucket_bytes
        == 64 << 20
    )
    assert (
        TransferConfig().mode is TransferMode.bucketed
        and TransferConfig().direct_fallback is DirectFallback.error
    )
    with pytest.raises(ValueError, match="rollout.transfer.mode=direct .* not nccl"):
        TransferConfig(transport="nccl", mode="direct")


GROUP_SCHEMAS = {
    "algorithm": AlgorithmConfig,
    "task": TaskConfig,
    "model": ModelConfig,
    "rollout/backend": BackendConfig,
}
LOGGER_SCHEMAS = {
    "console": ConsoleLoggerConfig,
    "jsonl": JsonlLoggerConfig,
    "tensorboard": TensorboardLoggerConfig,
    "wandb": WandbLoggerConfig,
}


def _leaves(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, dict) and "_target_" not in value:
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _option_files():
    for group, schema in GROUP_SCHEMAS.items():
        for path in sorted((CONF / group).glob("*.yaml")):
            yield path, OmegaConf.to_container(OmegaConf.structured(schema))
    for path in sorted((CONF / "logger").glob("*.yaml")):
        yield path, OmegaConf.to_container(OmegaConf.structured(LOGGER_SCHEMAS[path.stem]))


@pytest.mark.parametrize(
    "path, defaults",
    list(_option_files()),
    ids=lambda v: str(v).rsplit("conf/", 1)[-1] if isinstance(v, Path) else "",
)
def test_group_options_hold_deltas_only(path, defaults):
    """A default is written once, in its dataclass: a group option sets only what differs (and its name)."""
    body, defaults = OmegaConf.to_container(OmegaConf.load(path)) or {}, dict(_leaves(defaults))
    restated = [
        key
        for key, value in _leaves(body)
        if key != "name" and key in defaults and defaults[key] == value
    ]
    assert not restated, f"{path.relative_to(ROOT)} restates defaults: {restated}"


def test_debug_tiny_is_the_small_run():
    cfg = _compose(["debug=tiny"])
    assert (cfg.trainer.total_steps, cfg.trainer.prompts_per_step, cfg.algorithm.num_samples) == (
        3,
        4,
        4,
    )
    assert cfg.logger.console is None and cfg.logger.jsonl is not None
    assert (
        _compose(["debug=tiny", "algorithm=ppo"]).algorithm.num_samples == 4
    )  # it applies over any tree


def test_timeouts_nest_and_default_to_valid():
    assert RefitTimeouts().next_bucket_s > TransferConfig().timeout_s
    with pytest.raises(
        ValueError,
        match="rollout.timeouts.next_bucket_s=120.0 must exceed rollout.transfer.timeout_s=300",
    ):
        from rollout.config import RolloutConfig

        RolloutConfig(transfer=TransferConfig(timeout_s=300.0))
