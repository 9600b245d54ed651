"""The trainer's model side behind one small object: policy, optimizer, frozen reference, critic.

The PPO loop talks to a `Learner` only through the methods below, so a sharded learner (FSDP ranks
on Ray, say) can stand in for this single-process one without the loop changing.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from torch import Tensor

from trainers.algorithms import masked_mean, truncated_is_weights
from trainers.checkpoint import SHARDS, save_checkpoint
from trainers.config import Algorithm, AlgorithmConfig, TrainerConfig
from trainers.distributed.cluster import RayConfig
from trainers.policy import TokenBatch, ValueModel, collate, load_policy, token_logprobs
from trainers.tasks import Example, Task
from trainers.update import logprobs_no_grad, policy_backward, value_backward, values_no_grad

UPDATE_METRICS = ("loss", "clip_frac", "ppo_kl", "entropy", "kl", "grad_norm", "value_loss")


def warm_start_batch(tokenizer: Any, examples: list[Example]) -> TokenBatch:
    """The supervised warm-start's batch (on the CPU): each example's prompt, then its reference completion
    + EOS as the response."""
    return collate(
        [tokenizer(e.prompt).input_ids for e in examples],
        [tokenizer(e.completion).input_ids + [tokenizer.eos_token_id] for e in examples],
        pad_id=tokenizer.pad_token_id or 0,
    )


@dataclass
class OldScores:
    """What the trainer's models say about the sampled tokens before the update ([B, L-1] each)."""

    logp: Tensor  # the policy's, at the sampling temperature: the ratio's denominator
    raw_logp: Tensor  # the policy's at temperature 1: what vLLM reports, for `logprob_gap`
    ref_logp: Optional[Tensor]  # the frozen reference's (None without a KL penalty)
    values: Optional[Tensor]  # the critic's (None for GRPO)
    # min(pi_policy / pi_sampler, algorithm.tis_cap) per token, at temperature 1 on both sides (what
    # vLLM reports); None with tis_cap off
    is_weights: Optional[Tensor] = None


class Learner:
    """The policy, its AdamW, and (as the algorithm asks) a frozen reference and a critic, on one device.

    Example:
        learner = Learner(model_path, cfg.algorithm, cfg.trainer, torch.device("cpu"))
        learner.warm_start(tokenizer, task)          # or learner.load_state_dict(checkpoint)
        learner.freeze_reference()
        old = learner.logprobs(batch)
        metrics = learner.update(batch, old, advantages, returns, seed=step)
        learner.refit(engine, version=step)
        learner.save_checkpoint(path, run_state)     # run_state: step, history, ... (a dict)
    """

    def __init__(self, model_path: str, alg: AlgorithmConfig, trainer: TrainerConfig, device: torch.device) -> None:
        self.alg, self.micro_batch_size, self.device = alg, trainer.micro_batch_size, device
        self.trainer = trainer
        self.policy = load_policy(model_path).to(device)
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=alg.lr, weight_decay=alg.weight_decay)
        self.critic = ValueModel(model_path).to(device) if alg.name is Algorithm.ppo else None
        self.critic_opt = torch.optim.AdamW(self.critic.parameters(), lr=alg.critic_lr) if self.critic else None
        self.reference: Optional[torch.nn.Module] = None
        self._reference_loaded = False  # from a sharded checkpoint, by load_state_dict

    def warm_start(self, tokenizer: Any, task: Task) -> Optional[float]:
        """A short supervised warm-start on the task's reference completions; returns the last loss."""
        t = self.trainer
        if t.warmup_steps == 0:
            return None
        optimizer = torch.optim.AdamW(self.policy.parameters(), lr=t.warmup_lr, weight_decay=0.0)
        loss = torch.tensor(float("nan"))
        for step in range(1, t.warmup_steps + 1):
            examples = task.batch(-step, t.warmup_batch_size)  # negative steps: disjoint from the RL batches
            batch = warm_start_batch(tokenizer, examples).to(self.device)
            logp, _ = token_logprobs(self.policy, batch)
            loss = -masked_mean(logp, batch.mask)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return loss.item()

    def freeze_reference(self, state: Optional[dict] = None) -> None:
        """With a KL penalty: the reference is a frozen copy of the policy now (or `state`, on resume)."""
        if self.alg.kl_coef <= 0 or (state is None and self._reference_loaded):
            return
        self.reference = copy.deepcopy(self.policy).requires_grad_(False)
        if state is not None:
            self.reference.load_state_dict(state)

    @torch.no_grad()
    def logprobs(self, batch: TokenBatch) -> OldScores:
        temperature, micro = self.alg.temperature, self.micro_batch_size
        logp = logprobs_no_grad(self.policy, batch, temperature, micro)
        raw = logp if temperature == 1.0 else logprobs_no_grad(self.policy, batch, 1.0, micro)
        ref = logprobs_no_grad(self.reference, batch, temperature, micro) if self.reference else None
        values = values_no_grad(self.critic, batch, micro) if self.critic is not None else None
        weights = None
        if self.alg.tis_cap is not None:
            weights = truncated_is_weights(raw, batch.sampler_logprobs, self.alg.tis_cap, batch.mask)
        return OldScores(logp, raw, ref, values, weights)

    def update(
        self, batch: TokenBatch, old: OldScores, advantages: Tensor, returns: Optional[Tensor], seed: int
    ) -> dict[str, Optional[float]]:
        """`num_epochs` passes of `num_minibatches` clipped steps (shuffled by `seed`); mean metrics."""
        alg, micro = self.alg, self.micro_batch_size
        acc = dict.fromkeys(UPDATE_METRICS, 0.0)
        num_updates = 0
        shuffle = torch.Generator().manual_seed(seed)
        for _ in range(alg.num_epochs):
            for idx in torch.randperm(batch.tokens.shape[0], generator=shuffle).to(self.device).chunk(alg.num_minibatches):
                mb = batch.select(idx)
                self.optimizer.zero_grad(set_to_none=True)
                ref = old.ref_logp[idx] if old.ref_logp is not None else None
                weights = old.is_weights[idx] if old.is_weights is not None else None
                for key, value in policy_backward(self.policy, mb, old.logp[idx], advantages[idx], ref, alg, micro,
                                                  weights).items():
                    acc[key] += value
                acc["grad_norm"] += torch.nn.utils.clip_grad_norm_(self.policy.parameters(), alg.max_grad_norm).item()
                self.optimizer.step()
                if self.critic is not None:
                    self.critic_opt.zero_grad(set_to_none=True)
                    acc["value_loss"] += value_backward(self.critic, mb, old.values[idx], returns[idx], alg.value_clip, micro)
                    torch.nn.utils.clip_grad_norm_(self.critic.parameters(), alg.max_grad_norm)
                    self.critic_opt.step()
                num_updates += 1
        metrics: dict[str, Optional[float]] = {k: v / num_updates for k, v in acc.items()}
        metrics["kl"] = metrics["kl"] if self.reference is not None else None
        metrics["value_loss"] = metrics["value_loss"] if self.critic is not None else None
        return metrics

    @property
    def dtype(self) -> torch.dtype:
        """The policy's parameter dtype (the precision of the trainer's log-probs)."""
        return next(self.policy.parameters()).dtype

    def named_parameters_for_refit(self) -> Iterable[tuple[str, Tensor]]:
        """The policy's full tensors, by Hugging Face name, for `update_weights`."""
        return self.policy.named_parameters()

    def refit(self, ro: Any, version: int) -> Any:
        """`update_weights` of engine `ro` with the policy; returns its RefitStats."""
        return ro.update_weights(self.named_parameters_for_refit(), version=version)

    def save_checkpoint(self, path: Path, run_state: dict[str, Any]) -> Path:
        return save_checkpoint(path, {**run_state, **self.state_dict()})

    def close(self) -> None:
        """Drop the models and optimizers (their memory goes back at once)."""
        self.policy = self.optimizer = self.critic = self.critic_opt = self.reference = None

    def state_dict(self) -> dict[str, Any]:
        critic = self.critic
        return {
            "policy": self.policy.state_dict(), "optimizer": self.optimizer.state_dict(),
            "critic": critic.state_dict() if critic is not None else None,
            "critic_optimizer": self.critic_opt.state_dict() if critic is not None else None,
            "reference": self.reference.state_dict() if self.reference is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any], source: str = "the checkpoint") -> None:
        """Restore policy, optimizer and critic (the reference comes through `freeze_reference`)."""
        if SHARDS in state:  # saved by sharded ranks: DCP loads it whole into this process
            from trainers.distributed.states import load_states

            self.freeze_reference()  # the structure the reference loads into (kept by the next freeze_reference)
            self._reference_loaded = True
            parts = {"policy": (self.policy, self.optimizer), "critic": (self.critic, self.critic_opt),
                     "reference": (self.reference, None)}
            load_states(parts, state[SHARDS])
            return
        self.policy.load_state_dict(state["policy"])  # copies into the live device tensors
        self.optimizer.load_state_dict(state["optimizer"])
        if self.critic is not None:
            if state.get("critic") is None:
                raise ValueError(f"trainer.resume={source!r} holds no critic: it was not an algorithm=ppo run")
            self.critic.load_state_dict(state["critic"])
            self.critic_opt.load_state_dict(state["critic_optimizer"])


def build_learner(model_path: str, alg: AlgorithmConfig, trainer: TrainerConfig, backend: str,
                  ray: Optional[RayConfig] = None, engine_gpus: Optional[float] = None) -> Learner:
    """One process, or with `trainer.num_workers > 1` that many FSDP2 ranks on Ray (a ShardedLearner) with
    the engine's bundle: rank 0's (`engine_gpus=None`, colocate) or one of its own with that many GPUs."""
    device = trainer.device
    if device == "auto":
        device = {"vllm_cpu": "cpu", "vllm_gpu": "cuda", "vllm_ascend": "npu"}[backend]
    if trainer.num_workers > 1:
        from trainers.distributed.learner import ShardedLearner

        return ShardedLearner(model_path, alg, trainer, ray or RayConfig(), trainer.num_workers, device,
                              engine_gpus).start()
    return Learner(model_path, alg, trainer, torch.device(device))
