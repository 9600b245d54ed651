"""`python -m trainers.ppo`: the PPO/GRPO entry point (placeholder until the training loop lands)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from trainers.config import PPOConfig, register_configs, to_typed

register_configs()


def run(cfg: PPOConfig) -> None:
    print(cfg)


@hydra.main(version_base=None, config_path="../conf", config_name="ppo")
def main(cfg: DictConfig) -> None:
    print(OmegaConf.to_yaml(cfg))
    run(to_typed(cfg))


if __name__ == "__main__":
    main()
