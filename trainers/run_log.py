"""The run's log and a quiet console: `<out_dir>/ppo.log` gets every line of a run (ours, each step's line,
vLLM's from all its processes: rollout/vllm_logs.py); the console shows the project's own lines and anyone's
warnings and errors (`ConsoleFilter`, on Hydra's console handler: conf/hydra/job_logging/quiet.yaml)."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator

LOG_NAME = (
    "ppo.log"  # Hydra's job log of `python -m trainers.ppo`: the same file when out_dir is Hydra's
)
OURS = ("rollout", "trainers", "benchmarks", "__main__")
# The console logger (or print) already showed these: they are for the file.
FILE_ONLY = logging.getLogger("trainers.run_log.file")


class ConsoleFilter(logging.Filter):
    """The project's records from INFO up, everyone's from WARNING up, never the file-only ones."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == FILE_ONLY.name:
            return False
        return record.levelno >= logging.WARNING or record.name.split(".")[0] in OURS


@contextlib.contextmanager
def run_log(out_dir: Path) -> Iterator[Path]:
    """Every record of this process at INFO or above also goes to `<out_dir>/ppo.log` for the `with` block,
    unless a handler (Hydra's) already writes there. Yields the file's path."""
    path = (out_dir / LOG_NAME).resolve()
    root = logging.getLogger()
    if any(Path(getattr(h, "baseFilename", "")) == path for h in root.handlers):
        yield path
        return
    handler = logging.FileHandler(path, mode="a")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    handler.setLevel(logging.INFO)
    saved_level = root.level
    root.addHandler(handler)
    root.setLevel(min(saved_level or logging.WARNING, logging.INFO))
    try:
        yield path
    finally:
        root.removeHandler(handler)
        root.setLevel(saved_level)
        handler.close()
