"""Where vLLM's log lines go. With `rollout.vllm_log_file` set, every vLLM process (this one, its engine core,
its workers) appends its lines to that file and shows only those at `rollout.vllm_console_level` or above on
the console; unset, vLLM logs as it always does. vLLM reads a logging config file when it is imported
(VLLM_LOGGING_CONFIG_PATH), so its spawned processes are configured before their first line."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - (%(processName)s pid %(process)d) %(message)s"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def check_level(key: str, level: str) -> str:
    if str(level).upper() not in LEVELS:
        raise ValueError(f"{key} must be one of {', '.join(LEVELS)}, got {level!r}")
    return str(level).upper()


def logging_config(log_file: str, console_level: str) -> dict:
    """The `logging.config.dictConfig` of vLLM's processes: its `vllm` logger to the file and the console."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": FORMAT}},
        "handlers": {
            "file": {
                "class": "logging.FileHandler",
                "filename": log_file,
                "mode": "a",
                "formatter": "plain",
                "level": "DEBUG",
            },
            "console": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stdout",
                "formatter": "plain",
                "level": console_level,
            },
        },
        "loggers": {"vllm": {"handlers": ["file", "console"], "level": "INFO", "propagate": False}},
    }


def vllm_logging_env(log_file: str | None, console_level: str) -> dict[str, str]:
    """vLLM's environment for its processes (rollout.engine.vllm_worker_env), with this process's `vllm`
    logger routed the same way at once; {} where `log_file` is None (vLLM's own logging)."""
    if log_file is None:
        return {}
    path = Path(log_file).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    config_path = path.with_name(path.stem + ".vllm-logging.json")
    config_path.write_text(json.dumps(logging_config(str(path), console_level), indent=1) + "\n")
    _route_here(path, console_level)
    return {"VLLM_CONFIGURE_LOGGING": "1", "VLLM_LOGGING_CONFIG_PATH": str(config_path)}


def _route_here(path: Path, console_level: str) -> None:
    # Not dictConfig: it would close every other handler of this process (Hydra's among them).
    vllm_logger = logging.getLogger("vllm")
    for handler in list(vllm_logger.handlers):
        vllm_logger.removeHandler(handler)
        handler.close()
    file = logging.FileHandler(path, mode="a")
    console = logging.StreamHandler(sys.stdout)
    console.setLevel(console_level)
    for handler in (file, console):
        handler.setFormatter(logging.Formatter(FORMAT))
        vllm_logger.addHandler(handler)
    vllm_logger.setLevel(logging.INFO)
    vllm_logger.propagate = False
