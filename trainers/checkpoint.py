"""Training checkpoints: one file per saved step holding everything `trainer.resume` needs to continue."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def checkpoint_path(out_dir: Path, step: int) -> Path:
    return out_dir / "checkpoints" / f"step_{step:06d}.pt"


def save_checkpoint(path: Path, state: dict[str, Any]) -> Path:
    """Write atomically (temp file + rename) so a crash never leaves a truncated checkpoint behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run/checkpoints directory (its latest step is taken)."""
    path = Path(path).expanduser()
    if path.is_dir():
        folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        found = sorted(folder.glob("step_*.pt"))
        if not found:
            raise FileNotFoundError(f"trainer.resume={str(path)!r}: no step_*.pt checkpoint in {folder}")
        return found[-1]
    if not path.is_file():
        raise FileNotFoundError(f"trainer.resume={str(path)!r} does not exist")
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    return torch.load(resolve_checkpoint(path), map_location="cpu", weights_only=False)
