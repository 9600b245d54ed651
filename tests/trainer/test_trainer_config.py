"""Every shipped config composes into its typed schema; bad configs fail clearly before any engine starts."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
from helpers import child_pids
from hydra.errors import ConfigCompositionException
from trainer_helpers import ROOT, compose_typed

from trainers.config import Algorithm, KLEstimator, PPOConfig
from trainers.ppo import run

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def test_default_config_is_grpo_on_the_tiny_model_with_vllm_cpu():
    cfg = compose_typed()
    assert isinstance(cfg, PPOConfig)
    assert cfg.algorithm.name is Algorithm.grpo and cfg.model.path is None
    assert cfg.rollout.backend.name.value == "vllm_cpu" and cfg.task.name.value == "toy"
    assert (
        cfg.logger.console is not None
        and cfg.logger.jsonl is not None
        and cfg.logger.tensorboard is not None
    )


def test_algorithm_group_switches_to_ppo():
    cfg = compose_typed(["algorithm=ppo", "algorithm.kl_coef=0.1", "algorithm.kl_estimator=k1"])
    assert cfg.algorithm.name is Algorithm.ppo and cfg.algorithm.kl_estimator is KLEstimator.k1


def test_logger_group_takes_several_options():
    cfg = compose_typed(["logger=[console,jsonl,tensorboard,wandb]", "logger.wandb.mode=offline"])
    assert cfg.logger.wandb.mode == "offline" and cfg.logger.tensorboard.subdir == "tensorboard"
    only = compose_typed(["logger=[jsonl]"])
    assert only.logger.console is None and only.logger.jsonl.filename == "metrics.jsonl"


def test_gsm8k_task_composes_with_its_sample_file():
    cfg = compose_typed(["task=gsm8k"])
    assert (
        Path(cfg.task.data_path).exists()
        and cfg.task.reward["_target_"] == "trainers.rewards.Gsm8kReward"
    )


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_every_recipe_composes_and_converts(recipe):
    text = recipe.read_text()
    assert f"python -m trainers.ppo --config-dir recipes --config-name {recipe.stem}" in text, (
        "launch command in the header"
    )
    # `--config-dir recipes` puts recipes/ on the search path beside conf/; composing from recipes/
    # with conf/ on the search path is the same tree.
    cfg = compose_typed(
        [f"hydra.searchpath=[file://{ROOT / 'conf'}]"],
        config_name=recipe.stem,
        config_dir=ROOT / "recipes",
    )
    assert isinstance(cfg, PPOConfig) and cfg.trainer.total_steps > 0


def _leaves(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, dict) and "_target_" not in value:
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_every_recipe_holds_deltas_only(recipe):
    """Each value a recipe sets differs from what its defaults list alone composes to."""
    from omegaconf import OmegaConf

    body = OmegaConf.to_container(OmegaConf.load(recipe))
    groups = [
        f"{k.removeprefix('override ')}={v}"
        for entry in body.pop("defaults")
        if isinstance(entry, dict)
        for k, v in entry.items()
    ]
    base = dict(_leaves(OmegaConf.to_container(OmegaConf.structured(compose_typed(groups)))))
    restated = [key for key, value in _leaves(body) if base.get(key, object()) == value]
    assert not restated, f"{recipe.name} restates what its defaults already give: {restated}"


def test_recipes_set_what_their_names_say():
    by_name = {
        r.stem: compose_typed(
            [f"hydra.searchpath=[file://{ROOT / 'conf'}]"],
            config_name=r.stem,
            config_dir=ROOT / "recipes",
        )
        for r in RECIPES
    }
    assert by_name["ppo_tiny_cpu"].algorithm.name is Algorithm.ppo
    assert by_name["grpo_tiny_cpu"].algorithm.name is Algorithm.grpo
    assert by_name["grpo_lora_tiny_cpu"].rollout.adapter.rank == 8
    assert by_name["grpo_qwen2.5-0.5b_gsm8k_gpu"].rollout.backend.name.value == "vllm_gpu"
    assert by_name["grpo_qwen2.5-7b_ascend"].rollout.backend.name.value == "vllm_ascend"


@pytest.mark.parametrize(
    "override, error, match",
    [
        ("algorithm=sac", ConfigCompositionException, "Could not find 'algorithm/sac'"),
        (
            "trainer.totl_steps=3",
            ConfigCompositionException,
            "Key 'totl_steps' not in 'TrainerConfig'",
        ),
        (
            "algorithm.lr=fast",
            ConfigCompositionException,
            "Value 'fast' of type 'str' could not be converted to Float",
        ),
        (
            "algorithm.name=sac",
            ConfigCompositionException,
            "Invalid value 'sac', expected one of \\[grpo, ppo\\]",
        ),
        ("algorithm.num_samples=1", ValueError, "algorithm=grpo needs algorithm.num_samples >= 2"),
        (
            "algorithm.kl_estimator=k2",
            ConfigCompositionException,
            "Invalid value 'k2', expected one of \\[k1, k3\\]",
        ),
        ("trainer.refit_every=0", ValueError, "trainer.refit_every must be >= 1"),
        (
            "task.name=chess",
            ConfigCompositionException,
            "Invalid value 'chess', expected one of \\[toy, gsm8k\\]",
        ),
        ("~task.reward._target_", ValueError, "task.reward must be a node with a _target_"),
        ("rollout.transfer.bucket_mb=0", ValueError, "rollout.transfer.bucket_mb"),
        ("trainer.num_workers=0", ValueError, "trainer.num_workers must be >= 1"),
        (
            "ray.placement_strategy=RANDOM",
            ConfigCompositionException,
            "Invalid value 'RANDOM', expected one of \\[PACK",
        ),
        ("ray.timeout_s=0", ValueError, "ray.timeout_s must be > 0"),
        ("ray.num_cpus=-1", ValueError, "ray.num_cpus must be > 0"),
        ("model.lora.rank=0", ValueError, "model.lora.rank must be an integer >= 1 or null"),
        (
            "model.lora.rank=8 trainer.num_workers=2",
            ValueError,
            "model.lora.rank=8 with trainer.num_workers=2: LoRA trains in one process",
        ),
        (
            "model.lora.rank=8 rollout.engine=async",
            ValueError,
            "rollout.adapter \\(LoRA refits\\) does not support rollout.engine=async",
        ),
        (
            "model.lora.rank=8 model.lora.target_modules=[q_proj,lm_head]",
            ValueError,
            "rollout.adapter.target_modules: \\['lm_head'\\] cannot take a LoRA refit",
        ),
        ("model.lora.rank=16 rollout.backend.max_lora_rank=8", ValueError, "max_lora_rank=8"),
    ],
)
def test_bad_config_fails_at_compose_or_conversion(override, error, match):
    with pytest.raises(error) as info:
        compose_typed(override.split(" "))
    chain, exc = [], info.value
    while exc is not None:  # Hydra puts the schema's reason in the cause
        chain.append(str(exc))
        exc = exc.__cause__
    assert re.search(match, "\n".join(chain)), chain


def test_the_async_engine_composes_with_sharded_trainers_and_several_engines():
    """One engine API for all: the async engine runs in the Ray engine actor and as several engines."""
    cfg = compose_typed(
        ["trainer.num_workers=2", "rollout.engine=async", "trainer.max_staleness=1"]
    )
    assert cfg.trainer.num_workers == 2 and cfg.rollout.engine.value == "async"
    cfg = compose_typed(
        ["rollout.num_engines=2", "rollout.engine=async", "trainer.max_staleness=1"]
    )
    assert cfg.rollout.num_engines == 2 and cfg.rollout.engine.value == "async"


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (["task.reward._target_=trainers.rewards.nope"], ValueError, "task.reward=.*nope"),
        (
            ["task=gsm8k", "task.data_path=/nonexistent/gsm8k.jsonl"],
            FileNotFoundError,
            "/nonexistent/gsm8k.jsonl",
        ),
        (
            ["trainer.resume=/nonexistent/run"],
            FileNotFoundError,
            "trainer.resume='/nonexistent/run'",
        ),
        pytest.param(
            ["logger=[console,wandb]"],
            ImportError,
            "logger=wandb needs the wandb package",
            marks=pytest.mark.skipif(
                importlib.util.find_spec("wandb") is not None, reason="wandb is installed"
            ),
        ),
    ],
)
def test_run_fails_before_any_engine_starts(tmp_path, overrides, error, match):
    cfg = compose_typed([f"trainer.out_dir={tmp_path}", "logger=[jsonl]", *overrides])
    before = child_pids()
    with pytest.raises(error, match=match):
        run(cfg)
    assert child_pids() == before, "a vLLM engine was started for a config that cannot run"


def test_model_lora_sets_the_engines_adapter():
    from rollout import AdapterConfig
    from rollout.config import DEFAULT_LORA_MODULES

    assert compose_typed().rollout.adapter is None  # full fine-tuning: refits move the model
    cfg = compose_typed(["model.lora.rank=8"])
    assert cfg.model.lora.alpha == 16.0  # null: 2 x rank
    assert cfg.rollout.adapter == AdapterConfig(8, 16.0, list(DEFAULT_LORA_MODULES), 1)
    from rollout import RolloutConfig
    from trainers.config import PPOConfig

    with pytest.raises(ValueError, match="rollout.adapter is set from model.lora"):
        PPOConfig(rollout=RolloutConfig(adapter=AdapterConfig()))


@pytest.mark.parametrize(
    ("override", "suggestion"),
    [
        ("trainer.totl_steps=5", "'trainer.total_steps'"),
        ("+trainer.totl_steps=5", "'trainer.total_steps'"),  # Hydra's `+` would add it silently
        ("trainr.total_steps=5", "'trainer.total_steps'"),
        ("trainer.lr=1e-3", "'algorithm.lr'"),  # the key lives in another node
        ("rollout.transfer.bukcet_mb=4", "'rollout.transfer.bucket_mb'"),
    ],
)
def test_an_unknown_key_on_the_command_line_fails_at_once_with_the_closest_key(
    tmp_path, override, suggestion
):
    import subprocess
    import sys
    import time

    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "trainers.ppo", override, f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert f"unknown config key '{override.lstrip('+').split('=')[0]}'" in done.stderr, done.stderr
    assert f"did you mean {suggestion}?" in done.stderr, done.stderr
    assert not (tmp_path / "run").exists(), "the run started before the check"
    assert time.monotonic() - start < 60


def test_known_keys_group_choices_and_hydra_keys_pass_the_key_check():
    from trainers.ppo import check_command_line

    check_command_line(
        [
            "trainer.total_steps=5",
            "model=tiny",
            "debug=tiny",
            "logger=[jsonl]",
            "rollout/backend=vllm_gpu",
            "hydra.run.dir=x",
            "algorithm.lr=1e-3,2e-3",
            "model.lora.rank=8",
            "ray.timeout_s=3",
            "--config-name=ppo",
        ]
    )
