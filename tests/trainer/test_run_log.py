"""The quiet console's rules (trainers/run_log.py) and the run log: the end-to-end check on a real run's console
is in test_interrupts.py."""

from __future__ import annotations

import logging

from trainers.run_log import FILE_ONLY, LOG_NAME, ConsoleFilter, run_log


def _record(name: str, level: int) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, "text", None, None)


def test_the_console_shows_ours_and_everyones_warnings_only():
    keep = ConsoleFilter().filter
    assert keep(_record("trainers.ppo", logging.INFO)) and keep(
        _record("rollout.engine", logging.INFO)
    )
    assert not keep(_record("vllm.v1.engine.core", logging.INFO))
    assert not keep(_record("torch.distributed", logging.INFO))
    assert keep(_record("vllm.v1.engine.core", logging.WARNING))
    assert not keep(
        _record(FILE_ONLY.name, logging.INFO)
    )  # the step lines: the console showed them


def test_the_run_log_gets_every_info_record_for_the_block(tmp_path):
    # Not a `vllm.*` name: once vLLM is imported its logger does not propagate (rollout/vllm_logs.py routes it)
    with run_log(tmp_path) as path:
        logging.getLogger("some_library").info("third-party line")
        FILE_ONLY.info("step    1 | reward 0.5")
    logging.getLogger("some_library").info("after the block")
    text = path.read_text()
    assert path.name == LOG_NAME and "third-party line" in text and "step    1 | reward 0.5" in text
    assert "after the block" not in text
