"""backend="refit" in an offline `LLM(...)` (CPU, tiny model), driven through vLLM's trainer-side
API with the LLM as the client: refits equal a fresh engine in both transfer modes, the weight
version follows, and an update that fails midway leaves the last complete version serving."""

from __future__ import annotations

import time

import pytest
from backend_helpers import PROMPTS, assert_same, load, refit_segments_mapped
from helpers import child_pids, wait_gone

from benchmarks.serve import Completion
from rollout.config import RefitTimeouts
from rollout.transfer import TransferConfig

TIMEOUT_S = 5.0


def _llm(path, backend: str | None):
    from vllm import LLM
    from vllm.config import WeightTransferConfig

    extra = (
        {} if backend is None else {"weight_transfer_config": WeightTransferConfig(backend=backend)}
    )
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
    before = child_pids()
    engine = _llm(tiny_path, "refit")
    engine.start_outputs = _complete(engine)  # a fresh engine on the start-up weights
    yield engine
    _shutdown(engine, child_pids() - before)


@pytest.fixture(scope="module")
def fresh_new(new_path):
    before = child_pids()
    fresh = _llm(new_path, None)
    outputs = _complete(fresh)
    _shutdown(fresh, child_pids() - before)
    return outputs


def _trainer_engine(llm, source, **transfer):
    from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

    from rollout import RefitTrainerInitInfo

    info = RefitTrainerInitInfo(
        transfer=TransferConfig(bucket_mb=1, timeout_s=TIMEOUT_S, **transfer),
        timeouts=RefitTimeouts(next_bucket_s=10.0, receiver_exit_s=10.0, worker_reply_s=30.0),
        rank=0,
    )
    return WeightTransferTrainerFactory.trainer_init(info, client=llm, source=source)


@pytest.mark.parametrize("mode", ["bucketed", "direct"])
def test_three_refits_equal_a_fresh_engine_and_the_version_follows(
    llm, trainer, base_state, new_state, fresh_new, mode
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
    assert refit_segments_mapped() == [], "a transfer buffer stayed mapped"


def test_a_failed_update_keeps_the_previous_complete_version(llm, trainer, base_state, new_state):
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
    assert refit_segments_mapped() == []
