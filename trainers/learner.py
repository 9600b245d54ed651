"""The trainer's model side behind one small typed object: policy, optimizer, frozen reference, critic.

The PPO loop talks to a `Learner` (the Protocol below) only, so a sharded learner (FSDP2 ranks on Ray,
trainers/distributed/learner.py) stands in for this single-process one without the loop changing; both
run the same update math (trainers/update.py).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable, Optional, Protocol

import torch
from torch import Tensor

from rollout.api import RefitPort, RolloutEngine
from trainers.algorithms import masked_mean
from trainers.checkpoint import SHARDS, save_checkpoint
from trainers.config import Algorithm, AlgorithmConfig, LoraConfig, TrainerConfig
from trainers.lora import BaseModel, adapter_tensors, export_base, warm_start_params, wrap_policy
from trainers.policy import TokenBatch, ValueModel, collate, load_policy, token_logprobs
from trainers.tasks import Example, Task
from trainers.update import Models, OldScores, minibatch_order, minibatch_step, score

UPDATE_METRICS = ("loss", "clip_frac", "ppo_kl", "entropy", "kl", "grad_norm", "value_loss")


def warm_start_batch(tokenizer: Any, examples: list[Example]) -> TokenBatch:
    """The supervised warm-start's batch (on the CPU): each example's prompt, then its reference completion
    + EOS as the response."""
    return collate(
        [tokenizer(e.prompt).input_ids for e in examples],
        [tokenizer(e.completion).input_ids + [tokenizer.eos_token_id] for e in examples],
        pad_id=tokenizer.pad_token_id or 0,
    )


class Learner(Protocol):
    """What the PPO loop relies on, and all it relies on: `LocalLearner` (one process) and
    `trainers.distributed.learner.ShardedLearner` (FSDP2 ranks on Ray) implement it."""

    device: torch.device  # where a step's batch goes before the learner's calls
    last_gather_peak_bytes: Optional[
        int
    ]  # the last refit's gathered-tensor peak (sharded), else None

    @property
    def dtype(self) -> torch.dtype:
        """The policy's parameter dtype (the precision of the trainer's log-probs)."""

    def warm_start(self, tokenizer: Any, task: Task) -> Optional[float]: ...

    def freeze_reference(self, state: Optional[dict] = None) -> None: ...

    def logprobs(self, batch: TokenBatch) -> OldScores: ...

    def update(
        self,
        batch: TokenBatch,
        old: OldScores,
        advantages: Tensor,
        returns: Optional[Tensor],
        seed: int,
    ) -> dict[str, Optional[float]]: ...

    def send(self, port: RefitPort, version: int) -> Any:
        """The sending half of a refit (rollout.api.Send): the policy's full tensors through `port`."""

    def open_engine(self, rollout_cfg: Any, model_path: str) -> RolloutEngine:
        """The rollout engine placed where this learner feeds it."""

    def engine_model_path(self, model_path: str, out_dir: Path) -> str:
        """The weights the engine starts on (LoRA: the base, where it changed here)."""

    def save_checkpoint(self, path: Path, run_state: dict[str, Any]) -> Path: ...

    def load_state_dict(self, state: dict[str, Any], source: str = "the checkpoint") -> None: ...

    def close(self) -> None: ...


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters an optimizer steps: all of them, or with LoRA the adapter's."""
    return [p for p in model.parameters() if p.requires_grad]


class LocalLearner:
    """The policy, its AdamW, and (as the algorithm asks) a frozen reference and a critic, on one device.

    Example:
        learner = LocalLearner(model_path, cfg.algorithm, cfg.trainer, torch.device("cpu"))
        learner.warm_start(tokenizer, task)          # or learner.load_state_dict(checkpoint)
        learner.freeze_reference()
        old = learner.logprobs(batch)
        metrics = learner.update(batch, old, advantages, returns, seed=step)
        engine.refit(step, learner.send)
        learner.save_checkpoint(path, run_state)     # run_state: step, history, ... (a dict)
    """

    def __init__(
        self,
        model_path: str,
        alg: AlgorithmConfig,
        trainer: TrainerConfig,
        device: torch.device,
        lora: Optional[LoraConfig] = None,
    ) -> None:
        """`lora` (model.lora with a rank): the policy is a PEFT adapter on the frozen base, and
        refits send the adapter alone (trainers/lora.py)."""
        self.alg, self.micro_batch_size, self.device = alg, trainer.micro_batch_size, device
        self.trainer = trainer
        self.lora = lora if lora is not None and lora.enabled else None
        policy, lr = load_policy(model_path), alg.lr
        if self.lora is not None:
            c = self.lora
            policy = wrap_policy(policy, c.rank, c.alpha, c.dropout, c.target_modules)
            lr *= c.lr_scale
        policy = policy.to(device)
        critic = ValueModel(model_path).to(device) if alg.name is Algorithm.ppo else None
        self.models = Models(
            policy,
            torch.optim.AdamW(trainable(policy), lr=lr, weight_decay=alg.weight_decay),
            None,
            critic,
            torch.optim.AdamW(critic.parameters(), lr=alg.critic_lr)
            if critic is not None
            else None,
        )
        self._reference_loaded = False  # from a sharded checkpoint, by load_state_dict
        self._base_changed = False  # LoRA: the base differs from model_path (engine_model_path)
        self.last_gather_peak_bytes: Optional[int] = None  # nothing is gathered here

    # the models by name, for the methods below and the tests
    policy = property(lambda self: self.models.policy)
    optimizer = property(lambda self: self.models.optimizer)
    critic = property(lambda self: self.models.critic)
    critic_opt = property(lambda self: self.models.critic_opt)
    reference = property(lambda self: self.models.reference)

    def warm_start(self, tokenizer: Any, task: Task) -> Optional[float]:
        """A short supervised warm-start on the task's reference completions; returns the last loss.
        With LoRA it trains the base model (the adapter disabled and untouched), as supervised
        fine-tuning before LoRA RL would: the engine then starts on that base (engine_model_path)."""
        t = self.trainer
        if t.warmup_steps == 0:
            return None
        with warm_start_params(self.policy, self.lora is not None) as params:
            optimizer = torch.optim.AdamW(params, lr=t.warmup_lr, weight_decay=0.0)
            loss = torch.tensor(float("nan"))
            for step in range(1, t.warmup_steps + 1):
                examples = task.batch(
                    -step, t.warmup_batch_size
                )  # negative steps: disjoint from the RL batches
                batch = warm_start_batch(tokenizer, examples).to(self.device)
                logp, _ = token_logprobs(self.policy, batch)
                loss = -masked_mean(logp, batch.mask)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        self._base_changed = self.lora is not None
        return loss.item()

    def engine_model_path(self, model_path: str, out_dir: Path) -> str:
        """Where the engine loads its weights from: `model_path`, or with LoRA, once the base model
        changed here (warm-started, or loaded from a checkpoint), that base saved under `out_dir`
        (refits bring only the adapter, never the base)."""
        if not self._base_changed:
            return model_path
        return export_base(self.policy, model_path, out_dir / "lora_base")

    def freeze_reference(self, state: Optional[dict] = None) -> None:
        """With a KL penalty: the reference is a frozen copy of the policy now (or `state`, on resume);
        with LoRA, the base model itself (the adapter disabled), which never trains."""
        if self.alg.kl_coef <= 0 or (state is None and self._reference_loaded):
            return
        if self.lora is not None:
            self.models.reference = BaseModel(self.policy)
            return
        self.models.reference = copy.deepcopy(self.policy).requires_grad_(False)
        if state is not None:
            self.reference.load_state_dict(state)

    def logprobs(self, batch: TokenBatch) -> OldScores:
        return score(self.models, batch, self.alg, self.micro_batch_size)

    def update(
        self,
        batch: TokenBatch,
        old: OldScores,
        advantages: Tensor,
        returns: Optional[Tensor],
        seed: int,
    ) -> dict[str, Optional[float]]:
        """`num_epochs` passes of `num_minibatches` clipped steps (shuffled by `seed`); mean metrics."""
        acc = dict.fromkeys(UPDATE_METRICS, 0.0)
        minibatches = minibatch_order(batch.tokens.shape[0], self.alg, seed)
        for idx in minibatches:
            idx = idx.to(self.device)
            step = minibatch_step(
                self.models,
                batch.select(idx),
                old.select(idx),
                advantages[idx],
                returns[idx] if returns is not None else None,
                self.alg,
                self.micro_batch_size,
            )
            for key, value in step.items():
                acc[key] += value
        metrics: dict[str, Optional[float]] = {k: v / len(minibatches) for k, v in acc.items()}
        metrics["kl"] = metrics["kl"] if self.reference is not None else None
        metrics["value_loss"] = metrics["value_loss"] if self.critic is not None else None
        return metrics

    @property
    def dtype(self) -> torch.dtype:
        """The policy's parameter dtype (the precision of the trainer's log-probs)."""
        return next(self.policy.parameters()).dtype

    def named_parameters_for_refit(self) -> Iterable[tuple[str, Tensor]]:
        """The policy's full tensors, by Hugging Face name; with LoRA the adapter's, by PEFT's."""
        if self.lora is not None:
            return adapter_tensors(self.policy)
        return self.policy.named_parameters()

    def send(self, port: RefitPort, version: int) -> Any:
        """The sending half of a refit: the policy's tensors through this process's sender (the engine's,
        kept across refits)."""
        return port.sender().send(self.named_parameters_for_refit(), version)

    def open_engine(self, rollout_cfg: Any, model_path: str) -> RolloutEngine:
        from rollout import build_rollout

        return build_rollout(rollout_cfg, model_path)

    def save_checkpoint(self, path: Path, run_state: dict[str, Any]) -> Path:
        return save_checkpoint(path, {**run_state, **self.state_dict()})

    def close(self) -> None:
        """Drop the models and optimizers (their memory goes back at once)."""
        self.models = Models(None, None)  # type: ignore[arg-type]

    def state_dict(self) -> dict[str, Any]:
        critic = self.critic
        return {
            "policy": self.policy.state_dict(),
            "optimizer": self.optimizer.state_dict(),
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
            parts = {
                "policy": (self.policy, self.optimizer),
                "critic": (self.critic, self.critic_opt),
                "reference": (self.reference, None),
            }
            load_states(parts, state[SHARDS])
            return
        self.policy.load_state_dict(state["policy"])  # copies into the live device tensors
        self._base_changed = self.lora is not None
        self.optimizer.load_state_dict(state["optimizer"])
        if self.critic is not None:
            if state.get("critic") is None:
                raise ValueError(
                    f"trainer.resume={source!r} holds no critic: it was not an algorithm=ppo run"
                )
            self.critic.load_state_dict(state["critic"])
            self.critic_opt.load_state_dict(state["critic_optimizer"])
