"""Helpers shared by the trainer tests: compose the real config tree into a typed config."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from rollout import RefitStats
from trainers.config import PPOConfig, register_configs, to_typed

ROOT = Path(__file__).resolve().parents[2]
register_configs()
# The LoRA runs of the shared LoRA engine (conftest.lora_engine): no warm-start, so its base is theirs.
LORA_OVERRIDES = ["model.lora.rank=8", "trainer.warmup_steps=0"]


def compose_typed(
    overrides: list[str] = (), config_name: str = "ppo", config_dir: Path = ROOT / "conf"
) -> PPOConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        return to_typed(compose(config_name, overrides=list(overrides)))


def small_run_config(out_dir: Path, *overrides: str) -> PPOConfig:
    """A few small steps on the default tree (conf/debug/tiny.yaml), written to `out_dir`."""
    return compose_typed(["debug=tiny", f"trainer.out_dir={out_dir}", *overrides])


class SkipsARefit:
    """The real engine, except that the refit to `skip_version` loads nothing while the engine claims it."""

    def __init__(self, engine, skip_version: int) -> None:
        self._engine, self._skip = engine, skip_version

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def refit(self, version, send):
        if version != self._skip:
            return self._engine.refit(version, send)
        self._engine.state.version = (
            version  # what a refit that silently loaded nothing would leave behind
        )
        return RefitStats(
            version,
            seconds=1e-3,
            num_bytes=1,
            num_tensors=0,
            num_buckets=0,
            send_s=0.0,
            load_s=0.0,
            detached_bytes=0,
        )
