"""LoadPlan (rollout/load_path.py): the direct load path's recorded writes, replayed, against vLLM's own
weight loaders on a real vLLM model (Qwen2 with fused q/k/v and gate/up; Llama with a tied head), fed as
separate tensors (mode=direct) and as views of one bucket. The direct path itself runs on CUDA only
(tests/gpu/test_vllm_gpu.py); here the model is built on the CPU without an engine, in a child process."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import pytest
from load_plan_procs import broken_loader, deferred_copy, record_then_replay

from rollout.tiny_model import TinyModelSpec, ensure_tiny_model

TIMEOUT_S = 240


@pytest.fixture(scope="module")
def child():
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield pool


@pytest.mark.parametrize("bucketed", [False, True], ids=["tensors", "bucket"])
@pytest.mark.parametrize(
    "spec",
    [TinyModelSpec(), TinyModelSpec(architecture="llama", tie_word_embeddings=True)],
    ids=["qwen2", "llama-tied"],
)
def test_replayed_writes_equal_the_weight_loaders(child, spec, bucketed):
    out = child.submit(record_then_replay, str(ensure_tiny_model(spec)), bucketed).result(TIMEOUT_S)
    assert out["why_not"] is None and out["num_writes"] > 0
    assert out["mismatch"] == [
        [],
        [],
        [],
    ]  # recorded, replayed twice: every parameter bitwise equal
    assert out["fallbacks"] == [0, 0]
    assert out["stale_before"] is None and "re-allocated" in out["stale_after"]


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        ("transposed", "computed tensor"),
        ("scaled", "aten.mul_.Tensor writes into the model"),
        ("replaced", "replaced the storage of 'w'"),
        ("unwritten", "'w' was loaded without a write"),
    ],
)
def test_a_loader_the_plan_cannot_replay_is_named(kind, words):
    assert words in broken_loader(kind)


def test_a_copy_from_an_earlier_tensor_of_the_bucket_is_replayed_from_it():
    assert deferred_copy() == [True, True, True]
