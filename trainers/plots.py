"""The reward curve of one run, drawn from its per-step metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Optional


def reward_curve(
    history: list[dict], path: Path, baseline: Optional[float] = None, title: str = ""
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    mean = [h["reward/mean"] for h in history]
    std = [h["reward/std"] for h in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, mean, label="reward/mean")
    ax.fill_between(
        steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2
    )
    if baseline is not None:
        ax.axhline(baseline, color="gray", linestyle="--", label=f"pre-RL baseline {baseline:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
