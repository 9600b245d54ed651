"""`python -m trainers.ppo`: GRPO or PPO on a live vLLM rollout engine that is refit after every update.

One step: generate n responses per prompt with vLLM -> score them with the task's reward ->
recompute old log-probs (and reference / critic values) with the trainer's model -> advantages
(GRPO: group-relative; PPO: GAE over a critic) -> clipped policy-gradient update with AdamW ->
refit the engine with `update_weights` (every `trainer.refit_every` steps) -> next step.
`logprob_gap` compares vLLM's sampling log-probs with the trainer's: a refit bug shows there first, and the
refit canary (trainers/refit_canary.py) warns, or with `trainer.strict_refit=true` fails, when it does.

    python -m trainers.ppo                                  # GRPO on the embedded tiny model, CPU
    python -m trainers.ppo algorithm=ppo logger=[console,jsonl,tensorboard]
    python -m trainers.ppo --config-dir recipes --config-name grpo_tiny_cpu
    python -m trainers.ppo -m rollout.transfer.bucket_mb=16,64,256 trainer.total_steps=5
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Optional

import hydra
import torch
from omegaconf import DictConfig

from rollout.api import RolloutEngine
from rollout.config import Mode
from trainers.algorithms import gae, grpo_advantages, masked_whiten, terminal_rewards
from trainers.async_rollouts import AsyncRollouts
from trainers.checkpoint import checkpoint_path, load_checkpoint
from trainers.config import (
    Algorithm,
    AlgorithmConfig,
    LoraConfig,
    PPOConfig,
    TrainerConfig,
    register_configs,
    to_typed,
)
from trainers.distributed.cluster import RayConfig
from trainers.interrupts import Interrupts
from trainers.learner import Learner, LocalLearner
from trainers.loggers import build_loggers
from trainers.policy import collate, resolve_model_path
from trainers.refit_canary import check_refit_gap, gap_threshold, logprob_gaps
from trainers.rollouts import RolloutProducer, Rollouts, SyncRollouts
from trainers.run_log import LOG_NAME, run_log
from trainers.tasks import Task, build_task

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
        raise ValueError(
            f"task.reward={node!r} built {fn!r}, which is not callable (set _partial_: true for a function)"
        )
    return fn


def score(samples, answers: list[str], reward_fn: RewardFn) -> torch.Tensor:
    return torch.tensor([float(reward_fn(s.text, answers[s.prompt_index])) for s in samples])


def shuffle_seed(seed: int, step: int) -> int:
    """The minibatch order of a step: a resumed run replays the same order."""
    return seed * 1_000_003 + step


EVAL_SEED_OFFSET = 10_000_000  # the eval's sampling seed sits far from every training step's


@dataclass
class RunState:
    """What a run carries from step to step and through a checkpoint, besides the learner's tensors."""

    step: int = 0  # the last finished step
    history: list[dict] = field(default_factory=list)  # every finished step's metrics
    baseline: Optional[float] = None  # the pre-RL eval reward


@dataclass
class Setup:
    """Everything the loop needs, built (and validated) before the engine starts."""

    out_dir: Path
    model_path: str
    task: Task
    reward_fn: RewardFn
    tokenizer: Any
    learner: Learner
    state: RunState
    log: Any  # trainers.loggers.Loggers
    warmup_loss: Optional[float] = None  # None: resumed, or no warm-start
    checkpointed_step: Optional[int] = None  # the step of the last checkpoint this run wrote


def evaluate(ro: RolloutEngine, task: Task, reward_fn: RewardFn, cfg: PPOConfig) -> float:
    """Mean reward on the fixed eval prompts (same sampling settings and seed every time)."""
    samples = ro.generate(
        [e.prompt for e in task.eval],
        n=cfg.trainer.eval_samples,
        max_tokens=cfg.task.max_tokens,
        temperature=cfg.algorithm.temperature,
        seed=EVAL_SEED_OFFSET + cfg.trainer.seed,
    )
    return float(score(samples, [e.answer for e in task.eval], reward_fn).mean())


def build_learner(
    model_path: str,
    alg: AlgorithmConfig,
    trainer: TrainerConfig,
    backend: str,
    ray: Optional[RayConfig] = None,
    engine_gpus: Optional[float] = None,
    lora: Optional[LoraConfig] = None,
) -> Learner:
    """A LocalLearner, or with `trainer.num_workers > 1` that many FSDP2 ranks on Ray (a ShardedLearner) with
    the engine's bundle: rank 0's (`engine_gpus=None`, colocate) or one of its own with that many GPUs."""
    device = trainer.device
    if device == "auto":
        device = {"vllm_cpu": "cpu", "vllm_gpu": "cuda", "vllm_ascend": "npu"}[backend]
    if trainer.num_workers > 1:
        from trainers.distributed.learner import ShardedLearner

        return ShardedLearner(
            model_path, alg, trainer, ray or RayConfig(), trainer.num_workers, device, engine_gpus
        ).start()
    return LocalLearner(model_path, alg, trainer, torch.device(device), lora)


def run_dir(t: TrainerConfig) -> Path:
    out_dir = Path(t.out_dir or "outputs/ppo").expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def setup(cfg: PPOConfig, out_dir: Path) -> Setup:
    """Build task, reward, model and learner, resume or warm-start: all before the engine starts."""
    t = cfg.trainer
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    torch.manual_seed(t.seed)
    reward_fn = build_reward(cfg.task.reward)
    task = build_task(cfg.task, seed=t.seed)
    ckpt = load_checkpoint(t.resume) if t.resume else None
    model_path = resolve_model_path(cfg.model.path, cfg.model.cache_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    r = cfg.rollout
    engine_gpus = (
        None
        if r.mode is Mode.colocate
        else (
            r.num_engines * r.backend.tensor_parallel_size
            if r.backend.name.value != "vllm_cpu"
            else 0
        )
    )
    learner = build_learner(
        model_path, cfg.algorithm, t, r.backend.name.value, cfg.ray, engine_gpus, cfg.model.lora
    )
    try:
        return prepare(learner, cfg, out_dir, ckpt, model_path, task, reward_fn, tokenizer)
    except BaseException:
        learner.close()  # sharded: its Ray actors (and a local Ray) stop here
        raise


def prepare(
    learner: Learner,
    cfg: PPOConfig,
    out_dir: Path,
    ckpt: Optional[dict],
    model_path: str,
    task: Task,
    reward_fn: RewardFn,
    tokenizer: Any,
) -> Setup:
    """Resume or warm-start the learner and open the loggers."""
    t = cfg.trainer
    state = resume(learner, ckpt, t) if ckpt is not None else RunState()
    log = build_loggers(cfg.logger, out_dir, t.total_steps, state.step, run_config=asdict(cfg))
    for (
        record
    ) in state.history:  # a resumed run's files hold the whole run, not only its second half
        log.replay({k: v for k, v in record.items() if k != "step"}, record["step"])
    log.message(
        f"{cfg.algorithm.name.value} on task {cfg.task.name.value}: {model_path} -> {out_dir}"
    )
    loss = learner.warm_start(tokenizer, task) if ckpt is None else None
    if loss is not None:
        log.message(f"warm-start: {t.warmup_steps} supervised steps, final loss {loss:.3f}")
    # The frozen reference is the policy RL starts from (after the warm-start), or the checkpoint's.
    learner.freeze_reference(ckpt.get("reference") if ckpt is not None else None)
    engine_path = learner.engine_model_path(model_path, out_dir)
    if engine_path != model_path:
        log.message(f"LoRA: the engine starts on this run's base model, saved in {engine_path}")
    return Setup(out_dir, engine_path, task, reward_fn, tokenizer, learner, state, log, loss)


def resume(learner: Learner, ckpt: dict, t: TrainerConfig) -> RunState:
    learner.load_state_dict(ckpt, source=t.resume)
    if ckpt["step"] > t.total_steps:
        raise ValueError(
            f"trainer.resume is at step {ckpt['step']}, past trainer.total_steps={t.total_steps}"
        )
    return RunState(ckpt["step"], ckpt["history"], ckpt["baseline"])


def open_engine(
    cfg: PPOConfig,
    model_path: str,
    out_dir: Path,
    learner: Learner,
    rollout: Optional[RolloutEngine] = None,
) -> ContextManager[RolloutEngine]:
    """A new engine on `model_path` (its transfer endpoint and vLLM's log lines in the run directory), placed by
    the learner (a sharded one puts it in its Ray placement group, beside its feeding rank), or the caller's
    running one (left open at the end)."""
    if rollout is not None:
        return contextlib.nullcontext(rollout)
    rollout_cfg = cfg.rollout
    if rollout_cfg.endpoint_dir is None:
        rollout_cfg = dataclasses.replace(rollout_cfg, endpoint_dir=str(out_dir.resolve()))
    if rollout_cfg.vllm_log_file is None:
        rollout_cfg = dataclasses.replace(
            rollout_cfg, vllm_log_file=str((out_dir / LOG_NAME).resolve())
        )
    return learner.open_engine(rollout_cfg, model_path)


def run(cfg: PPOConfig, rollout: Optional[RolloutEngine] = None) -> dict:
    """Train; returns the summary also written to <out_dir>/summary.json.

    `rollout`: an already running engine on the same model to use (and leave open) instead of
    building one from `cfg.rollout`; tests share one engine this way. The loop's two seams: batches come
    from `next_rollouts(step)` (a producer can stand in for the direct generate) and every tensor of the
    trainer sits behind `s.learner` (trainers/learner.py). A SIGINT or SIGTERM stops it after the step in
    progress, with a checkpoint (trainers/interrupts.py); the summary's `interrupted_at` is that step.
    """
    wall_start = time.perf_counter()
    out_dir = run_dir(cfg.trainer)
    with Interrupts() as stop, run_log(out_dir):
        s = setup(cfg, out_dir)
        with contextlib.closing(s.learner), contextlib.closing(s.log):
            final_eval = stop.unless_signalled(train_on_engine, s, cfg, rollout, stop)
            if stop.requested:
                save_checkpoint(s, cfg)
            summary = finish(s, cfg, final_eval, time.perf_counter() - wall_start, stop)
    return summary


def train_on_engine(
    s: Setup, cfg: PPOConfig, rollout: Optional[RolloutEngine], stop: Interrupts
) -> Optional[float]:
    """The RL steps on a live engine, then its final eval; None where a signal cut them short."""
    if stop.requested:  # during the warm-start: no engine to start just to stop it
        return None
    with open_engine(cfg, s.model_path, s.out_dir, s.learner, rollout) as ro:
        try:
            start_engine(ro, s, cfg)
            gap_limit = gap_threshold(cfg.trainer.refit_gap_threshold, ro.dtype, s.learner.dtype)
            next_rollouts = rollout_producer(ro, s.task, cfg)
            try:
                with frozen_gc_heap():
                    for step in range(s.state.step + 1, cfg.trainer.total_steps + 1):
                        if stop.requested:
                            break
                        step_start = time.perf_counter()
                        rollouts = stop.unless_signalled(next_rollouts, step)
                        if rollouts is None:  # the engine died with the signal: this step is lost
                            break
                        metrics = train(s, rollouts, cfg, step)
                        check_refit_gap(
                            step,
                            metrics["logprob_gap"],
                            gap_limit,
                            cfg.trainer.strict_refit,
                            s.log.message,
                        )
                        metrics.update(
                            stop.unless_signalled(refit, ro, s.learner, cfg.trainer, step) or {}
                        )
                        metrics["timing/step_s"] = time.perf_counter() - step_start
                        record(s, cfg, step, metrics)
            finally:
                next_rollouts.close()  # the async producer: its trainer thread back on every core
        finally:
            stop.shutting_down = stop.requested  # the engine's close is bounded: let it run
        if stop.requested:
            return None
        final_eval = evaluate(ro, s.task, s.reward_fn, cfg)
        s.log.log_eval({"eval/reward": final_eval}, step=cfg.trainer.total_steps)
        s.log.message(
            f"final: eval reward {final_eval:.3f} (pre-RL baseline {s.state.baseline:.3f})"
        )
    return final_eval


@contextlib.contextmanager
def frozen_gc_heap() -> Iterator[None]:
    """The objects alive when the loop starts (torch, transformers, vLLM and their modules: ~0.7 million)
    out of the collector's reach until it ends, as vLLM's engine core does with its own heap: a full
    collection then walks only what the steps allocated. Unfrozen afterwards, so a process running several
    runs (the tests) can still collect a finished run's cycles."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def start_engine(ro: RolloutEngine, s: Setup, cfg: PPOConfig) -> None:
    """The engine starts from the trainer's weights (warm-started, resumed, or whatever a shared
    engine held before); a fresh run measures its pre-RL baseline."""
    ro.refit(s.state.step, s.learner.send)
    if s.state.baseline is None:
        s.state.baseline = evaluate(ro, s.task, s.reward_fn, cfg)
        s.log.message(f"pre-RL baseline: eval reward {s.state.baseline:.3f}")
        s.log.log_eval(
            {"eval/reward": s.state.baseline, "warmup/loss": s.warmup_loss}, step=s.state.step
        )


def rollout_producer(ro: RolloutEngine, task: Task, cfg: PPOConfig) -> RolloutProducer:
    """step -> Rollouts: generate each batch when its step comes, or (trainer.max_staleness > 0) keep
    the next batches generating on the async engine while the trainer trains."""
    if cfg.trainer.max_staleness == 0:
        return SyncRollouts(ro, task, cfg)
    return AsyncRollouts(ro, task, cfg)


def advantages(
    alg: AlgorithmConfig, rewards: torch.Tensor, mask: torch.Tensor, values: Optional[torch.Tensor]
):
    """GRPO: group-relative per sequence; PPO: whitened GAE over the critic. Returns (advantages, returns)."""
    if alg.name is Algorithm.grpo:
        return grpo_advantages(rewards, alg.num_samples, alg.scale_adv_by_std)[:, None] * mask, None
    adv, returns = gae(terminal_rewards(rewards, mask), values, mask, alg.gamma, alg.lam)
    return masked_whiten(adv, mask), returns


def train(s: Setup, rollouts: Rollouts, cfg: PPOConfig, step: int) -> dict:
    """Score, recompute old log-probs, advantages, update: one step's learning and its metrics."""
    samples, learner = rollouts.samples, s.learner
    rewards = score(samples, [e.answer for e in rollouts.examples], s.reward_fn)
    train_start = time.perf_counter()
    batch = collate(
        [x.prompt_token_ids for x in samples],
        [x.token_ids for x in samples],
        pad_id=s.tokenizer.pad_token_id or 0,
        sampler_logprobs=[x.logprobs for x in samples],
    ).to(learner.device)
    rewards, mask = rewards.to(learner.device), batch.mask
    old = learner.logprobs(batch)
    gaps = logprob_gaps(
        old.raw_logp - batch.sampler_logprobs,
        mask,
        current_tokens(samples, mask.shape[1], step - 1).to(mask.device),
    )
    adv, returns = advantages(cfg.algorithm, rewards, mask, old.values)
    update = learner.update(batch, old, adv, returns, seed=shuffle_seed(cfg.trainer.seed, step))
    return {
        "reward/mean": rewards.mean().item(),
        "reward/std": rewards.std(unbiased=False).item(),
        "response_len": mask.sum(1).mean().item(),
        **update,
        **gaps,
        **staleness(samples, rollouts, step),
        "timing/gen_s": rollouts.gen_s,
        "timing/train_s": time.perf_counter() - train_start,
    }


def current_tokens(samples: list, width: int, version: int) -> torch.Tensor:
    """[B, width] bool, laid out as `collate` lays out responses: the tokens that weights `version` produced."""
    current = torch.zeros((len(samples), width), dtype=torch.bool)
    for i, x in enumerate(samples):
        versions = x.token_versions or [x.version] * len(x.token_ids)
        start = len(x.prompt_token_ids) - 1
        current[i, start : start + len(versions)] = torch.tensor(
            [v == version for v in versions], dtype=torch.bool
        )
    return current


def staleness(samples: list, rollouts: Rollouts, step: int) -> dict:
    """How many versions behind the policy (which has had step-1 updates) the trained samples were."""
    lags = [(step - 1) - x.version for x in samples]
    return {
        "version_lag": max(lags),
        "version_lag/mean": sum(lags) / len(lags),
        "rollout/dropped": rollouts.dropped,
        "timing/overlap_s": rollouts.overlap_s,
    }


def refit(ro: RolloutEngine, learner: Learner, t: TrainerConfig, step: int) -> dict:
    """Every `refit_every` steps (and at the last): the engine samples the next step with these weights."""
    refit_s, gbps, peak_mb, moved_mb = 0.0, None, None, None
    if step % t.refit_every == 0 or step == t.total_steps:
        stats = ro.refit(step, learner.send)
        refit_s, gbps = stats.seconds, stats.num_bytes / stats.seconds / 1e9
        moved_mb = stats.num_bytes / 2**20  # the model's bytes, or with LoRA the adapter's
        peak = learner.last_gather_peak_bytes  # a sharded learner's feeding rank: its gather's peak
        peak_mb = peak / 2**20 if peak is not None else None
    return {
        "refit/gbps": gbps,
        "refit/mb": moved_mb,
        "timing/refit_s": refit_s,
        "refit/gather_peak_mb": peak_mb,
    }


def record(s: Setup, cfg: PPOConfig, step: int, metrics: dict) -> None:
    """Log the step, and checkpoint every `checkpoint_every` steps and at the last."""
    t = cfg.trainer
    s.state.step = step
    s.state.history.append({"step": step, **metrics})
    s.log.log(metrics, step)
    if (t.checkpoint_every and step % t.checkpoint_every == 0) or step == t.total_steps:
        save_checkpoint(s, cfg)


def save_checkpoint(s: Setup, cfg: PPOConfig) -> None:
    """The learner and the run's state at its last finished step (once per step)."""
    step = s.state.step
    if s.checkpointed_step != step:
        s.learner.save_checkpoint(
            checkpoint_path(s.out_dir, step),
            {
                "step": step,
                "history": s.state.history,
                "baseline": s.state.baseline,
                "config": asdict(cfg),
            },
        )
        s.checkpointed_step = step


def finish(
    s: Setup, cfg: PPOConfig, final_eval: Optional[float], wall_s: float, stop: Interrupts
) -> dict:
    """Write summary.json and the reward curve; returns the summary."""
    history, name = s.state.history, cfg.algorithm.name.value
    summary = summarize(history, s.state.baseline, final_eval, wall_s)
    summary["algorithm"] = name
    summary["interrupted_at"] = s.state.step if stop.requested else None
    summary["exit_code"] = stop.exit_code if stop.requested else 0
    (s.out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if history:
        from trainers.plots import reward_curve

        reward_curve(
            history,
            s.out_dir / "reward_curve.png",
            s.state.baseline,
            title=f"{name} on {cfg.task.name.value}",
        )
    if stop.requested:
        s.log.message(
            f"interrupted at step {s.state.step}; resume with trainer.resume={s.out_dir.resolve()}"
        )
    else:
        s.log.message(
            f"outputs: {s.out_dir.resolve()} ({LOG_NAME}, metrics, summary.json, reward_curve.png, checkpoints)"
        )
    return summary


def summarize(
    history: list[dict], baseline: Optional[float], final_eval: Optional[float], wall_s: float
) -> dict:
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
        "max_logprob_gap": max(
            (r["logprob_gap"] for r in history if r["logprob_gap"] is not None), default=None
        ),
        "max_version_lag": max((r["version_lag"] for r in history), default=None),
        "dropped_samples": sum(r.get("rollout/dropped") or 0 for r in history),
        "mean_overlap_s": mean("timing/overlap_s", history),
        "wall_s": wall_s,
    }


@hydra.main(version_base=None, config_path="../conf", config_name="ppo")
def main(cfg: DictConfig) -> None:
    typed = to_typed(cfg)
    if typed.trainer.out_dir is None:
        from hydra.core.hydra_config import HydraConfig

        typed.trainer.out_dir = HydraConfig.get().runtime.output_dir
    summary = run(typed)
    if summary["exit_code"]:
        raise SystemExit(summary["exit_code"])


CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def check_command_line(argv: list[str]) -> None:
    """Unknown keys among the command line's overrides end the run before Hydra composes, with the
    closest keys named (trainers.config.check_override_keys)."""
    from trainers.config import check_override_keys

    groups = {str(p.relative_to(CONF_DIR)) for p in CONF_DIR.rglob("*") if p.is_dir()}
    try:
        check_override_keys([a for a in argv if "=" in a and not a.startswith("-")], groups)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    import sys

    check_command_line(sys.argv[1:])
    main()
