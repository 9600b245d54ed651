"""`python -m trainers.ppo`: GRPO or PPO on a live vLLM rollout engine that is refit after every update.

One step: generate n responses per prompt with vLLM -> score them with the task's reward ->
recompute old log-probs (and reference / critic values) with the trainer's model -> advantages
(GRPO: group-relative; PPO: GAE over a critic) -> clipped policy-gradient update with AdamW ->
refit the engine with `update_weights` (every `trainer.refit_every` steps) -> next step.
`logprob_gap` compares vLLM's sampling log-probs with the trainer's: a refit bug shows there first.

    python -m trainers.ppo                                  # GRPO on the embedded tiny model, CPU
    python -m trainers.ppo algorithm=ppo logger=[console,jsonl,tensorboard]
    python -m trainers.ppo --config-dir recipes --config-name grpo_tiny_cpu
    python -m trainers.ppo -m rollout.transfer.bucket_mb=16,64,256 trainer.total_steps=5
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import hydra
import torch
from omegaconf import DictConfig

from trainers.algorithms import gae, grpo_advantages, masked_mean, masked_whiten, terminal_rewards
from trainers.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from trainers.config import Algorithm, PPOConfig, register_configs, to_typed
from trainers.loggers import build_loggers
from trainers.policy import ValueModel, collate, load_policy, token_logprobs
from trainers.tasks import Task, build_task
from trainers.update import logprobs_no_grad, policy_backward, value_backward, values_no_grad

register_configs()

RewardFn = Callable[[str, str], float]


def build_reward(node: dict) -> RewardFn:
    """Instantiate `task.reward` (a `_target_` node) into `fn(response, answer) -> float`."""
    from hydra.utils import instantiate

    try:
        fn = instantiate(node)
    except Exception as exc:  # Hydra wraps import errors; name the key the user wrote
        raise ValueError(f"task.reward={node!r} could not be built: {exc}") from exc
    if not callable(fn):
        raise ValueError(f"task.reward={node!r} built {fn!r}, which is not callable (set _partial_: true for a function)")
    return fn


def score(samples, answers: list[str], reward_fn: RewardFn) -> torch.Tensor:
    return torch.tensor([float(reward_fn(s.text, answers[s.prompt_index])) for s in samples])


def evaluate(ro, task: Task, reward_fn: RewardFn, cfg: PPOConfig) -> float:
    """Mean reward on the fixed eval prompts (same sampling settings and seed every time)."""
    samples = ro.generate(
        [e.prompt for e in task.eval], n=cfg.trainer.eval_samples, max_tokens=cfg.task.max_tokens,
        temperature=cfg.algorithm.temperature, seed=10_000_000 + cfg.trainer.seed,
    )
    return float(score(samples, [e.answer for e in task.eval], reward_fn).mean())


def warm_start(policy, tokenizer, task: Task, cfg: PPOConfig, log) -> Optional[float]:
    """A short supervised warm-start on the task's reference completions; returns the last loss."""
    t = cfg.trainer
    if t.warmup_steps == 0:
        return None
    optimizer = torch.optim.AdamW(policy.parameters(), lr=t.warmup_lr, weight_decay=0.0)
    loss = torch.tensor(float("nan"))
    for step in range(1, t.warmup_steps + 1):
        examples = task.batch(-step, t.warmup_batch_size)  # negative steps: disjoint from the RL batches
        batch = collate(
            [tokenizer(e.prompt).input_ids for e in examples],
            [tokenizer(e.completion).input_ids + [tokenizer.eos_token_id] for e in examples],
            pad_id=tokenizer.pad_token_id or 0,
        ).to(next(policy.parameters()).device)
        logp, _ = token_logprobs(policy, batch)
        loss = -masked_mean(logp, batch.mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    log.message(f"warm-start: {t.warmup_steps} supervised steps, final loss {loss.item():.3f}")
    return loss.item()


def resolve_device(device: str, backend: str) -> torch.device:
    if device == "auto":
        device = {"vllm_cpu": "cpu", "vllm_gpu": "cuda", "vllm_ascend": "npu"}[backend]
    return torch.device(device)


def run(cfg: PPOConfig, rollout=None) -> dict:
    """Train; returns the summary also written to <out_dir>/summary.json.

    `rollout`: an already running engine on the same model to use (and leave open) instead of
    building one from `cfg.rollout`; tests share one engine this way.
    """
    t, alg = cfg.trainer, cfg.algorithm
    out_dir = Path(t.out_dir or "outputs/ppo").expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    torch.manual_seed(t.seed)
    wall_start = time.perf_counter()

    # Everything a bad config can break is built before the engine starts.
    reward_fn = build_reward(cfg.task.reward)
    task = build_task(cfg.task, seed=t.seed)
    ckpt = load_checkpoint(t.resume) if t.resume else None
    if cfg.model.path is None:
        from rollout.tiny_model import ensure_tiny_model

        model_path = str(ensure_tiny_model(cache_dir=cfg.model.cache_dir))
    else:
        model_path = cfg.model.path
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    device = resolve_device(t.device, cfg.rollout.backend.name.value)
    policy = load_policy(model_path).to(device)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=alg.lr, weight_decay=alg.weight_decay)
    critic = ValueModel(model_path).to(device) if alg.name is Algorithm.ppo else None
    critic_opt = torch.optim.AdamW(critic.parameters(), lr=alg.critic_lr) if critic is not None else None

    start_step, history, baseline, reference = 0, [], None, None
    if ckpt is not None:
        policy.load_state_dict(ckpt["policy"])  # load_state_dict copies into the live device tensors
        optimizer.load_state_dict(ckpt["optimizer"])
        if critic is not None:
            if ckpt.get("critic") is None:
                raise ValueError(f"trainer.resume={t.resume!r} holds no critic: it was not an algorithm=ppo run")
            critic.load_state_dict(ckpt["critic"])
            critic_opt.load_state_dict(ckpt["critic_optimizer"])
        start_step, history, baseline = ckpt["step"], ckpt["history"], ckpt["baseline"]
    if start_step > t.total_steps:
        raise ValueError(f"trainer.resume is at step {start_step}, past trainer.total_steps={t.total_steps}")

    log = build_loggers(cfg.logger, out_dir, t.total_steps, start_step, run_config=asdict(cfg))
    for record in history:  # a resumed run's files hold the whole run, not only its second half
        log.replay({k: v for k, v in record.items() if k != "step"}, record["step"])
    log.message(f"{alg.name.value} on task {cfg.task.name.value}: {model_path} -> {out_dir}")
    warmup_loss = None
    if ckpt is None:
        warmup_loss = warm_start(policy, tokenizer, task, cfg, log)
    if alg.kl_coef > 0:  # the frozen reference is the policy RL starts from (after the warm-start)
        reference = copy.deepcopy(policy).requires_grad_(False)
        if ckpt is not None and ckpt["reference"] is not None:
            reference.load_state_dict(ckpt["reference"])

    if rollout is None:
        from rollout import build_rollout

        engine = build_rollout(cfg.rollout, model_path)
    else:
        engine = contextlib.nullcontext(rollout)
    with contextlib.closing(log), engine as ro:
        # The engine starts from the trainer's weights: warm-started, resumed, or whatever a shared
        # engine held before.
        ro.update_weights(policy.named_parameters(), version=start_step)
        if baseline is None:
            baseline = evaluate(ro, task, reward_fn, cfg)
            log.message(f"pre-RL baseline: eval reward {baseline:.3f}")
            log.log_eval({"eval/reward": baseline, "warmup/loss": warmup_loss}, step=start_step)

        for step in range(start_step + 1, t.total_steps + 1):
            step_start = time.perf_counter()
            # 1. generate with the engine's current weights
            ro.wake_up()  # no-op unless it slept through a step without a refit (trainer.refit_every > 1)
            examples = task.batch(step, t.prompts_per_step)
            samples = ro.generate(
                [e.prompt for e in examples], n=alg.num_samples, max_tokens=cfg.task.max_tokens,
                temperature=alg.temperature, seed=t.seed * 1_000_003 + step * 100_003,
            )
            gen_s = time.perf_counter() - step_start
            ro.sleep()  # colocate: the engine's device memory goes to training; update_weights wakes it up
            version_lag = (step - 1) - min(s.version for s in samples)  # the policy has step-1 updates

            # 2. reward
            rewards = score(samples, [e.answer for e in examples], reward_fn)
            train_start = time.perf_counter()
            batch = collate(
                [s.prompt_token_ids for s in samples], [s.token_ids for s in samples],
                pad_id=tokenizer.pad_token_id or 0, sampler_logprobs=[s.logprobs for s in samples],
            ).to(device)
            rewards = rewards.to(device)
            mask = batch.mask

            # 3. old log-probs, reference, critic: recomputed by the trainer on the sampled tokens
            micro = t.micro_batch_size
            old_logp = logprobs_no_grad(policy, batch, alg.temperature, micro)
            raw_logp = old_logp if alg.temperature == 1.0 else logprobs_no_grad(policy, batch, 1.0, micro)
            gap = ((raw_logp - batch.sampler_logprobs).abs() * mask).sum() / mask.sum()
            ref_logp = logprobs_no_grad(reference, batch, alg.temperature, micro) if reference else None
            old_values = values_no_grad(critic, batch, micro) if critic is not None else None

            # 4. advantages
            if alg.name is Algorithm.grpo:
                advantages = grpo_advantages(rewards, alg.num_samples, alg.scale_adv_by_std)[:, None] * mask
                returns = None
            else:
                advantages, returns = gae(terminal_rewards(rewards, mask), old_values, mask, alg.gamma, alg.lam)
                advantages = masked_whiten(advantages, mask)

            # 5. update: num_epochs passes of num_minibatches clipped policy-gradient steps
            acc = {"loss": 0.0, "clip_frac": 0.0, "ppo_kl": 0.0, "entropy": 0.0, "kl": 0.0, "grad_norm": 0.0,
                   "value_loss": 0.0}
            num_updates = 0
            shuffle = torch.Generator().manual_seed(t.seed * 1_000_003 + step)  # resume replays the same order
            for _ in range(alg.num_epochs):
                for idx in torch.randperm(len(samples), generator=shuffle).to(device).chunk(alg.num_minibatches):
                    mb = batch.select(idx)
                    optimizer.zero_grad(set_to_none=True)
                    ref_mb = ref_logp[idx] if ref_logp is not None else None
                    for key, value in policy_backward(policy, mb, old_logp[idx], advantages[idx], ref_mb, alg, micro).items():
                        acc[key] += value
                    acc["grad_norm"] += torch.nn.utils.clip_grad_norm_(policy.parameters(), alg.max_grad_norm).item()
                    optimizer.step()
                    if critic is not None:
                        critic_opt.zero_grad(set_to_none=True)
                        acc["value_loss"] += value_backward(critic, mb, old_values[idx], returns[idx], alg.value_clip, micro)
                        torch.nn.utils.clip_grad_norm_(critic.parameters(), alg.max_grad_norm)
                        critic_opt.step()
                    num_updates += 1
            train_s = time.perf_counter() - train_start

            # 6. refit: the engine samples the next step with these weights
            refit_s, gbps = 0.0, None
            if step % t.refit_every == 0 or step == t.total_steps:
                stats = ro.update_weights(policy.named_parameters(), version=step)
                refit_s, gbps = stats.seconds, stats.num_bytes / stats.seconds / 1e9

            metrics = {
                "reward/mean": rewards.mean().item(),
                "reward/std": rewards.std(unbiased=False).item(),
                "response_len": mask.sum(1).mean().item(),
                **{k: v / num_updates for k, v in acc.items()},
                "kl": acc["kl"] / num_updates if reference is not None else None,
                "value_loss": acc["value_loss"] / num_updates if critic is not None else None,
                "logprob_gap": gap.item(),
                "version_lag": version_lag,
                "refit/gbps": gbps,
                "timing/gen_s": gen_s,
                "timing/train_s": train_s,
                "timing/refit_s": refit_s,
                "timing/step_s": time.perf_counter() - step_start,
            }
            history.append({"step": step, **metrics})
            log.log(metrics, step)
            if (t.checkpoint_every and step % t.checkpoint_every == 0) or step == t.total_steps:
                save_checkpoint(checkpoint_path(out_dir, step), {
                    "step": step, "history": history, "baseline": baseline, "config": asdict(cfg),
                    "policy": policy.state_dict(), "optimizer": optimizer.state_dict(),
                    "critic": critic.state_dict() if critic is not None else None,
                    "critic_optimizer": critic_opt.state_dict() if critic is not None else None,
                    "reference": reference.state_dict() if reference is not None else None,
                })
        final_eval = evaluate(ro, task, reward_fn, cfg)
        log.log_eval({"eval/reward": final_eval}, step=t.total_steps)
        log.message(f"final: eval reward {final_eval:.3f} (pre-RL baseline {baseline:.3f})")

    summary = summarize(history, baseline, final_eval, time.perf_counter() - wall_start)
    summary["algorithm"] = alg.name.value
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if history:
        from trainers.plots import reward_curve

        reward_curve(history, out_dir / "reward_curve.png", baseline, title=f"{alg.name.value} on {cfg.task.name.value}")
    return summary


def summarize(history: list[dict], baseline: Optional[float], final_eval: float, wall_s: float) -> dict:
    fifth = max(1, len(history) // 5)

    def mean(key: str, rows: list[dict]) -> Optional[float]:
        values = [r[key] for r in rows if r.get(key) is not None]
        return sum(values) / len(values) if values else None

    refit, step = mean("timing/refit_s", history), mean("timing/step_s", history)
    return {
        "steps": len(history),
        "baseline_eval_reward": baseline,
        "final_eval_reward": final_eval,
        "reward_first_fifth": mean("reward/mean", history[:fifth]),
        "reward_last_fifth": mean("reward/mean", history[-fifth:]),
        "mean_step_s": step,
        "mean_refit_s": refit,
        "refit_share": refit / step if refit is not None and step else None,
        "max_logprob_gap": max((r["logprob_gap"] for r in history), default=None),
        "wall_s": wall_s,
    }


@hydra.main(version_base=None, config_path="../conf", config_name="ppo")
def main(cfg: DictConfig) -> None:
    typed = to_typed(cfg)
    if typed.trainer.out_dir is None:
        from hydra.core.hydra_config import HydraConfig

        typed.trainer.out_dir = HydraConfig.get().runtime.output_dir
    run(typed)


if __name__ == "__main__":
    main()
