"""Training checkpoints: per saved step, everything `trainer.resume` needs to continue.

One process: one file `step_N.pt`. Sharded ranks (`trainer.num_workers > 1`): a directory `step_N/` holding
`run.pt` (the run's state) and `shards/` (every rank's shards, torch.distributed.checkpoint, which reloads
on any number of ranks). On several nodes the run's out_dir must be a filesystem they all see.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

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


RUN_STATE = "run.pt"  # inside a sharded checkpoint's directory
SHARDS = "shards"


def save_sharded_checkpoint(
    path: Path, run_state: dict[str, Any], save_shards: Callable[[str], None]
) -> Path:
    """The directory `path` minus `.pt`: `save_shards(dir)` writes the ranks' shards, then the run's state;
    built under a temporary name and renamed, so a crash never leaves a half-written checkpoint."""
    directory = path.with_suffix("")
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_shards(str(tmp / SHARDS))
    torch.save(run_state, tmp / RUN_STATE)
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)
    return directory


def _is_sharded(path: Path) -> bool:
    return (path / RUN_STATE).is_file()


def resolve_checkpoint(path: str | Path, name: str = "trainer.resume") -> Path:
    """A checkpoint (file or sharded directory), or a run/checkpoints directory (its latest step is
    taken); `name` is what the user called it, for the error."""
    path = Path(path).expanduser()
    if path.is_dir() and not _is_sharded(path):
        folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        found = [p for p in folder.glob("step_*") if p.suffix == ".pt" or _is_sharded(p)]
        if not found:
            raise FileNotFoundError(f"{name}={str(path)!r}: no step_* checkpoint in {folder}")
        return max(found, key=lambda p: p.stem)
    if not (path.is_file() or _is_sharded(path)):
        raise FileNotFoundError(f"{name}={str(path)!r} does not exist")
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The saved state; a sharded checkpoint's has the run's state and `shards`, the shards' directory."""
    path = resolve_checkpoint(path)
    if _is_sharded(path):
        return {
            **torch.load(path / RUN_STATE, map_location="cpu", weights_only=False),
            SHARDS: str(path / SHARDS),
        }
    return torch.load(path, map_location="cpu", weights_only=False)
