"""Metric sinks selected by the `logger` group (console, jsonl, tensorboard, wandb; several at once).

Example:
    log = build_loggers(cfg.logger, out_dir, total_steps=100, run_config=asdict(cfg))
    log.log({"reward/mean": 0.5, ...}, step=1)
    log.close()
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

from trainers.config import (
    ConsoleLoggerConfig,
    JsonlLoggerConfig,
    LoggerConfig,
    TensorboardLoggerConfig,
    WandbLoggerConfig,
)

# The compact per-step console line: (metric key, label, format).
_LINE = [
    ("reward/mean", "reward", "{:.3f}"),
    ("kl", "kl", "{:.4f}"),
    ("entropy", "ent", "{:.2f}"),
    ("clip_frac", "clip", "{:.3f}"),
    ("logprob_gap", "gap", "{:.1e}"),
    ("version_lag", "lag", "{:d}"),
    ("timing/gen_s", "gen", "{:.2f}s"),
    ("timing/train_s", "train", "{:.2f}s"),
    ("timing/refit_s", "refit", "{:.3f}s"),
]


def _finite(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


class ConsoleLogger:
    def __init__(self, cfg: ConsoleLoggerConfig, total_steps: int, start_step: int):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.console = Console()
        self.progress = None
        if cfg.progress_bar:
            self.progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step)
            self.progress.start()

    def log(self, metrics: dict[str, Any], step: int) -> None:
        parts = [f"step {step:>4d}"]
        for key, label, fmt in _LINE:
            value = metrics.get(key)
            if value is not None:
                parts.append(f"{label} {fmt.format(value)}")
        self.console.print(" | ".join(parts), highlight=False, soft_wrap=True)
        if self.progress is not None:
            self.progress.update(self.task, completed=step)

    def message(self, text: str) -> None:
        self.console.print(text, highlight=False)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


class JsonlLogger:
    def __init__(self, cfg: JsonlLoggerConfig, out_dir: Path):
        self.path = out_dir / cfg.filename
        self.file = self.path.open("a")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        record = {"step": step, **{k: _finite(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class TensorboardLogger:
    def __init__(self, cfg: TensorboardLoggerConfig, out_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out_dir / cfg.subdir))

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for key, value in metrics.items():
            if (
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and value is not None
            ):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    def __init__(self, cfg: WandbLoggerConfig, out_dir: Path, run_config: dict):
        try:
            import wandb
        except ImportError:
            raise ImportError(
                "logger=wandb needs the wandb package: pip install -e '.[wandb]' (or pip install wandb)"
            ) from None
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            name=cfg.name,
            mode=cfg.mode,
            dir=str(out_dir),
            config=run_config,
        )

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log({k: v for k, v in metrics.items() if v is not None}, step=step)

    def close(self) -> None:
        self.run.finish()


class Loggers:
    """Fans each call out to every configured sink; `message` reaches the console only.

    `log` is one training step (every sink); `log_eval` is an evaluation (pre-RL baseline, final),
    kept out of metrics.jsonl so that file stays one record per step; `replay` re-writes a resumed
    run's earlier steps to the file sinks without printing them again.
    """

    def __init__(self, sinks: list, console: Optional[ConsoleLogger]):
        self.sinks = sinks
        self.console = console

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for sink in self.sinks:
            sink.log(metrics, step)

    def log_eval(self, metrics: dict[str, Any], step: int) -> None:
        for sink in self.sinks:
            if isinstance(sink, (TensorboardLogger, WandbLogger)):
                sink.log(metrics, step)

    def replay(self, metrics: dict[str, Any], step: int) -> None:
        for sink in self.sinks:
            if not isinstance(sink, ConsoleLogger):
                sink.log(metrics, step)

    def message(self, text: str) -> None:
        if self.console is not None:
            self.console.message(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def build_loggers(
    cfg: LoggerConfig,
    out_dir: Path,
    total_steps: int,
    start_step: int = 0,
    run_config: Optional[dict] = None,
) -> Loggers:
    sinks: list = []
    console = None
    # wandb first: a missing package fails before anything else is opened.
    if cfg.wandb is not None:
        sinks.append(WandbLogger(cfg.wandb, out_dir, run_config or {}))
    if cfg.jsonl is not None:
        sinks.append(JsonlLogger(cfg.jsonl, out_dir))
    if cfg.tensorboard is not None:
        sinks.append(TensorboardLogger(cfg.tensorboard, out_dir))
    if cfg.console is not None:
        console = ConsoleLogger(cfg.console, total_steps, start_step)
        sinks.append(console)
    return Loggers(sinks, console)
