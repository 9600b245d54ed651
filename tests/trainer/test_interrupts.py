"""A real `python -m trainers.ppo` (its own process group, as a shell job) stopped mid-run: by a terminal's
Ctrl-C (SIGINT to the whole group: vLLM's processes get it too), by `timeout`'s SIGTERM (the trainer only), or
by its vLLM engine core SIGKILLed. A signal ends it within the bound with a checkpoint, summary and plot and one
"interrupted at step N; resume with ..." line, exit code 128 + the signal, and the run resumes from its
directory; the killed engine ends the run with an error. Nothing is left: no process, segment or socket.
The signalled runs' console also shows the quiet console: no third-party INFO line, vLLM's in ppo.log."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from trainer_helpers import ROOT, small_run_config
from vllm_shm import vllm_segments_held_by, vllm_segments_left

from trainers.ppo import run

# A refit in flight when vLLM's processes die fails once the sender's wait for the dead worker's ack ends
# (rollout.transfer.timeout_s); then a checkpoint and the engine's close.
TRANSFER_TIMEOUT_S = 15.0
STOP_BOUND_S = TRANSFER_TIMEOUT_S + 45.0  # from the signal to the exit


def start_run(out: Path) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "trainers.ppo",
        "debug=tiny",
        "logger=[console,jsonl]",  # the step lines on the console, as in a default run
        "trainer.total_steps=400",
        "trainer.checkpoint_every=0",
        f"rollout.transfer.timeout_s={TRANSFER_TIMEOUT_S}",
        f"trainer.out_dir={out}",
        f"hydra.run.dir={out}",
    ]
    log = open(out.parent / "run.log", "w")
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        process_group=0,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def assert_quiet_console(console: str, out: Path) -> None:
    """Between the step lines the console shows no third-party INFO line (vLLM's go to the run's log file,
    with the step lines and ours)."""
    lines = console.splitlines()
    steps = [i for i, line in enumerate(lines) if re.match(r"step +\d+ \|", line)]
    assert len(steps) >= 2, console[-3000:]
    ours = re.compile(r"\]\[(rollout|trainers)[\w.]*\]\[INFO\]")
    noise = [
        line
        for line in lines[steps[0] : steps[-1]]
        if re.search(r"\bINFO\b", line) and not ours.search(line)
    ]
    assert not noise, noise[:10]
    log = (out / "ppo.log").read_text()
    assert re.search(r"\[vllm[\w.]*\]\[INFO\]", log), "vLLM's INFO lines are not in the run log"
    assert lines[steps[0]] in log and "trainers.run_log" not in console


def wait_for_steps(
    proc: subprocess.Popen, out: Path, num_steps: int, timeout_s: float = 300.0
) -> None:
    deadline = time.monotonic() + timeout_s
    metrics = out / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= num_steps):
        assert proc.poll() is None, (out.parent / "run.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the run did not finish its first steps in time"
        time.sleep(0.2)


def stop_and_wait(proc: subprocess.Popen, how: str) -> tuple[int, float, list[psutil.Process]]:
    """Signal (or kill the engine core of) the run; returns its exit code, seconds to exit, its processes."""
    procs = psutil.Process(proc.pid).children(recursive=True)
    sent = time.monotonic()
    if how == "SIGINT":
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    elif how == "SIGTERM":
        os.kill(proc.pid, signal.SIGTERM)  # what `timeout` does
    else:
        core = next(p for p in procs if "EngineCore" in " ".join(p.cmdline()))
        os.kill(core.pid, signal.SIGKILL)
    try:
        code = proc.wait(timeout=STOP_BOUND_S + 60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return code, time.monotonic() - sent, procs


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "engine core SIGKILL"])
def test_a_stopped_run_exits_in_time_leaves_nothing_and_a_signalled_one_resumes(
    tmp_path, trainer_engine, how
):
    out = tmp_path / "run"
    refit_segments = set(Path("/dev/shm").glob("refit-*"))  # other jobs may own some
    proc = start_run(out)
    wait_for_steps(proc, out, 2)
    segments = vllm_segments_held_by(
        {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
    )
    code, stop_s, procs = stop_and_wait(proc, how)
    output = (tmp_path / "run.log").read_text()
    assert stop_s < STOP_BOUND_S, f"{how}: the run took {stop_s:.0f} s to exit:\n{output[-3000:]}"
    _, alive = psutil.wait_procs(procs, timeout=30)
    assert not alive, f"{how}: processes outlived the run: {alive}"
    assert not vllm_segments_left(segments), (
        f"{how}: vLLM segments left: {vllm_segments_left(segments)}"
    )
    assert not set(Path("/dev/shm").glob("refit-*")) - refit_segments, (
        f"{how}: transfer segments left"
    )
    assert not [p for p in out.rglob("*") if p.is_socket()], (
        f"{how}: a socket file is left in the run directory"
    )
    print(f"{how}: exit {code} {stop_s:.1f} s after the signal")
    if how == "engine core SIGKILL":
        assert code != 0 and "EngineDeadError" in output, output[-3000:]
        return
    assert code == 128 + signal.Signals[how], output[-3000:]
    assert_quiet_console(output, out)
    found = re.findall(r"interrupted at step (\d+); resume with trainer.resume=(\S+)", output)
    assert len(found) == 1, output[-3000:]
    step, resume = int(found[0][0]), found[0][1]
    assert step >= 2 and Path(resume) == out.resolve()
    assert (out / "checkpoints" / f"step_{step:06d}.pt").is_file() and (
        out / "reward_curve.png"
    ).is_file()
    assert json.loads((out / "summary.json").read_text())["interrupted_at"] == step
    summary = run(
        small_run_config(
            tmp_path / "resumed", f"trainer.resume={resume}", f"trainer.total_steps={step + 1}"
        ),
        rollout=trainer_engine,
    )
    assert summary["steps"] == step + 1 and summary["interrupted_at"] is None
