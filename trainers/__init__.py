"""PPO/GRPO training loops built on the `rollout` module."""
