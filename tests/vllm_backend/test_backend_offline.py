"""backend="refit" in an offline `LLM(...)` (CPU, tiny model), driven through vLLM's trainer-side
API with the LLM as the client: refits equal a fresh engine in both transfer modes, the weight
version follows, an update that fails midway leaves the last complete version serving, and a
killed worker fails the trainer within its timeout, leaving nothing behind."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest
from backend_helpers import PROMPTS, assert_same, load, refit_segments_mapped, send_halfway
from helpers import child_pids, wait_gone

from benchmarks.serve import Completion
from rollout.config import RefitTimeouts
from rollout.transfer import TransferConfig

TIMEOUT_S = 5.0


def _llm(path):
    from vllm import LLM
    from vllm.config import WeightTransferConfig

    extra = {"weight_transfer_config": WeightTransferConfig(backend="refit")}
    return LLM(
        str(path), dtype="float32", max_model_len=512, enforce_eager=True,
        gpu_memory_utilization=0.1, seed=0, **extra,
    )  # fmt: skip


def _complete(llm) -> list[Completion]:
    from vllm import SamplingParams

    from rollout.vllm_compat import sampled_logprobs

    params = SamplingParams(temperature=0.0, max_tokens=12, logprobs=0)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    return [Completion(list(o.outputs[0].token_ids), sampled_logprobs(o.outputs[0])) for o in outs]


def _shutdown(llm, pids: set[int]) -> None:
    llm.llm_engine.engine_core.shutdown()
    assert not wait_gone(pids), "vLLM's processes outlived the LLM"


@pytest.fixture(scope="module")
def llm(tiny_path, fresh_new):  # fresh_new first: one engine at a time
    """One engine for the module; the last test kills its worker."""
    from rollout.vllm_segments import EngineSegments

    before = child_pids()
    engine = _llm(tiny_path)
    engine.vllm_pids = child_pids() - before
    segments = EngineSegments.of_client(engine.llm_engine.engine_core, "the test engine")
    engine.start_outputs = _complete(engine)  # a fresh engine on the start-up weights
    yield engine
    _shutdown(engine, engine.vllm_pids)
    segments.release()  # what vLLM's killed worker left of its own shared memory
    assert segments.left_behind() == {}


def _trainer_engine(llm, source, **transfer):
    from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

    from rollout import RefitTrainerInitInfo

    info = RefitTrainerInitInfo(
        transfer=TransferConfig(bucket_mb=1, timeout_s=TIMEOUT_S, **transfer),
        timeouts=RefitTimeouts(next_bucket_s=10.0, receiver_exit_s=10.0, worker_reply_s=30.0),
        call_timeout_s=30.0,
        rank=0,
    )
    return WeightTransferTrainerFactory.trainer_init(info, client=llm, source=source)


@pytest.mark.parametrize("mode", ["bucketed", "direct"])
def test_three_refits_equal_a_fresh_engine_and_the_version_follows(
    llm, trainer, base_state, new_state, fresh_new, mode, mapped_before
):
    from vllm.distributed.weight_transfer.base import ModuleSource

    engine = _trainer_engine(llm, ModuleSource(trainer), mode=mode)
    shown = llm.get_weight_version()  # "default" until the first update
    start = int(shown) if shown.isdigit() else 0
    try:
        for version, state, expected in [
            (start + 1, new_state, fresh_new),
            (start + 2, base_state, llm.start_outputs),  # back: no prefix block of the last one
            (start + 3, new_state, fresh_new),
        ]:
            load(trainer, state)
            stats = engine.send_weights(version)
            assert stats.version == version
            assert llm.get_weight_version() == str(version)
            assert_same(_complete(llm), expected, f"{mode} version {version}")
    finally:
        load(trainer, base_state)
        engine.shutdown()
    assert set(refit_segments_mapped()) - mapped_before == set(), "a transfer buffer stayed mapped"


def test_a_failed_update_keeps_the_previous_complete_version(
    llm, trainer, base_state, new_state, mapped_before
):
    from vllm.distributed.weight_transfer.base import ModuleSource

    from rollout.vllm_backend.trainer import RefitBackendError

    class FailsNearTheEnd(ModuleSource):
        def __iter__(self):
            yield from list(super().__iter__())[:-2]  # more than one bucket sent
            raise RuntimeError("the trainer failed mid-update")

    load(trainer, base_state)
    good = _trainer_engine(llm, ModuleSource(trainer))
    good.send_weights(50)
    good.shutdown()
    before = _complete(llm)
    load(trainer, new_state)
    engine = _trainer_engine(llm, FailsNearTheEnd(trainer))
    started = time.monotonic()
    with pytest.raises(RefitBackendError, match="update to version 51.*mid-update"):
        engine.send_weights(51)
    assert time.monotonic() - started < 4 * TIMEOUT_S + 30
    assert llm.get_weight_version() == "50"
    assert_same(_complete(llm), before, "after the failed update")  # staged: nothing loaded
    engine.shutdown()
    load(trainer, base_state)
    assert set(refit_segments_mapped()) - mapped_before == set()


def test_a_killed_worker_fails_the_trainer_within_its_timeout(
    llm, trainer, base_state, mapped_before
):
    """SIGKILLs the module's engine's worker halfway through an update (this test runs last)."""
    from rollout.vllm_backend.trainer import RefitBackendError

    load(trainer, base_state)
    engine, sender, go_on, outcome = send_halfway(
        lambda source: _trainer_engine(llm, source), trainer, 90
    )
    (worker,) = [p for p in map(psutil.Process, llm.vllm_pids) if "Worker" in p.name()]
    os.kill(worker.pid, signal.SIGKILL)
    killed = time.monotonic()
    go_on.set()
    sender.join(4 * TIMEOUT_S + 60)
    assert not sender.is_alive(), "send_weights did not return"
    print(f"the trainer reported the dead worker {time.monotonic() - killed:.1f} s after")
    assert isinstance(outcome.get("error"), RefitBackendError), outcome
    assert "update to version 90" in str(outcome["error"])
    engine.shutdown()  # the dead engine cannot be told: the sender's buffers are freed anyway
    assert set(refit_segments_mapped()) - mapped_before == set(), (
        "the trainer still maps its buffers"
    )
    assert not os.path.exists(os.path.dirname(engine.endpoint.removeprefix("ipc://")))
