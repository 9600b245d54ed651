"""CUDA graphs on vllm_gpu (`enforce_eager=false`: torch.compile with vLLM's full and piecewise
graphs). After refits through both load paths, on the sync and async engines, tied and untied tiny
models and the 0.5B-shaped one, every tensor the graphs captured is where it was
(rollout.graph_audit) and greedy tokens and log-probs equal a fresh engine with graphs on the same
weights; a re-allocated parameter is caught.

Runs only where CUDA and vLLM's CUDA build exist (a lent H100/H200 with the vLLM GPU kit).
"""

from __future__ import annotations

import dataclasses

import helpers
import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.vllm_gpu]


helpers.skip_module_unless_vllm_cuda()

from test_vllm_gpu import SPEC, greedy, perturbed, save_model  # noqa: E402

from benchmarks.worker_ext import BENCH_WORKER_EXTENSION  # noqa: E402
from rollout import BackendConfig, Mode, RolloutConfig, build_rollout  # noqa: E402
from rollout.load_path import LoadPath  # noqa: E402
from rollout.tiny_model import TinyModelSpec, ensure_tiny_model  # noqa: E402
from rollout.transfer import TransferConfig  # noqa: E402

TIED_QWEN2 = dataclasses.replace(SPEC, tie_word_embeddings=True, num_key_value_heads=1)
UNTIED_LLAMA = dataclasses.replace(SPEC, architecture="llama")
CASES = {  # spec, engine, mode (colocate: the engine sleeps before every refit, as in training)
    "tied-qwen2-sync": (TIED_QWEN2, "sync", Mode.standalone),
    "untied-llama-async": (UNTIED_LLAMA, "async", Mode.colocate),
    "qwen2-0.5b-sync": (TinyModelSpec.qwen2_0_5b(), "sync", Mode.colocate),
    "tied-qwen2-async": (TIED_QWEN2, "async", Mode.standalone),
}
REALLOCATED = "model.layers.0.mlp.down_proj.weight"


def graph_cfg(
    engine: str = "sync", mode: Mode = Mode.standalone, utilization: float = 0.2
) -> RolloutConfig:
    return RolloutConfig(
        backend=BackendConfig(
            name="vllm_gpu",
            dtype="bfloat16",
            gpu_memory_utilization=utilization,
            max_model_len=512,
            max_num_seqs=32,
            enforce_eager=False,
        ),
        mode=mode,
        transfer=TransferConfig(transport="auto", bucket_mb=64, timeout_s=60.0),
        engine=engine,
        graph_audit=True,
        generate_timeout_s=300.0,
    )


def check_graph_safe(stats) -> None:
    """The refit left every captured tensor in place and wrote every parameter."""
    audit = stats.graph_audit
    assert audit is not None, "rollout.graph_audit is off"
    assert audit.keeps_pointers, (
        f"refit {stats.version} moved what the CUDA graphs captured: moved {audit.moved}, "
        f"missing {audit.missing}, added {audit.added}"
    )
    assert not audit.unchanged_parameters, (
        f"refit {stats.version} left {audit.unchanged_parameters} unwritten"
    )


def max_gap(a, b) -> float:
    assert [s.token_ids for s in a] == [s.token_ids for s in b], (
        "greedy tokens differ from the fresh engine's"
    )
    return max(abs(x - y) for p, q in zip(a, b) for x, y in zip(p.logprobs, q.logprobs))


_FRESH: dict = {}


def model_and_expected(spec: TinyModelSpec, root) -> tuple:
    """The model dir, its weights, the perturbed weights and a fresh graph engine's greedy output on
    them."""
    if spec not in _FRESH:
        from safetensors.torch import load_file

        path = ensure_tiny_model(spec, root / "models")
        state = load_file(path / "model.safetensors")
        new = perturbed(state, seed=1)
        with build_rollout(
            graph_cfg(), save_model(path, new, root / f"fresh-{spec.key()}")
        ) as fresh:
            _FRESH[spec] = (path, state, new, greedy(fresh))
    return _FRESH[spec]


@pytest.mark.parametrize("case", list(CASES))
def test_refits_under_cuda_graphs_keep_pointers_and_equal_a_fresh_graph_engine(
    case, tmp_path_factory
):
    spec, engine, mode = CASES[case]
    path, state, new, expected = model_and_expected(spec, tmp_path_factory.getbasetemp())
    other = perturbed(state, seed=2)
    gaps, version = [], 0
    with build_rollout(
        graph_cfg(engine, mode), path, worker_extension=BENCH_WORKER_EXTENSION
    ) as ro:
        before = greedy(ro)
        for load_path in (LoadPath.auto, LoadPath.layerwise, LoadPath.auto):
            ro.refitter.load_path = load_path  # the refitter's, read at every refit
            for weights in (other, new):
                ro.sleep()  # standalone: a no-op
                version += 1
                stats = ro.update_weights(weights.items(), version=version)
                check_graph_safe(stats)
                assert stats.load_path == (
                    "layerwise" if load_path is LoadPath.layerwise else "direct"
                )
            gaps.append(max_gap(greedy(ro), expected))
    assert [s.token_ids for s in before] != [s.token_ids for s in expected], (
        "the perturbation changed nothing"
    )
    print(
        f"{case}: max |log-prob - fresh| per load path (auto, layerwise, auto): {gaps}; "
        f"{stats.graph_audit.tensors} tensors audited"
    )
    assert max(gaps) <= 1e-3


def test_graph_audit_catches_a_reallocated_parameter(tmp_path):
    """The negative control: a parameter given a fresh storage between two refits is named by the
    audit (and the check above fails on it), while the captured graphs go on reading the old
    storage."""
    from safetensors.torch import load_file

    path = ensure_tiny_model(SPEC, tmp_path / "models")
    state = load_file(path / "model.safetensors")
    with build_rollout(graph_cfg(), path, worker_extension=BENCH_WORKER_EXTENSION) as ro:
        check_graph_safe(ro.update_weights(perturbed(state, seed=1).items(), version=1))
        ro.llm.collective_rpc("refit_debug_reallocate", args=(REALLOCATED,))
        stats = ro.update_weights(perturbed(state, seed=2).items(), version=2)
        with pytest.raises(AssertionError, match="moved what the CUDA graphs captured"):
            check_graph_safe(stats)
        assert stats.graph_audit.moved == (REALLOCATED,), stats.graph_audit
        assert (
            stats.load_plan == "recorded"
        )  # the direct path saw its plan go stale and recorded it again
