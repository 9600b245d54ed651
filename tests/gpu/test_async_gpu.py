"""The async engine (vLLM's AsyncLLM) on vllm_gpu in colocate mode with vLLM 0.24's API: sleep (requests
in flight kept) -> wake weights -> refit -> wake KV cache with the encoder-cache reset on the AsyncLLM;
and a few steps of trainer.max_staleness=1 GRPO on the GPU.

Runs only where CUDA and vLLM's CUDA build exist (`bash .ci/gpu test` on a lent H200).
"""

from __future__ import annotations

import functools
import json

import helpers
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.vllm_gpu]


helpers.skip_module_unless_vllm_cuda()

from test_vllm_gpu import PROMPTS, SPEC, assert_same, perturbed  # noqa: E402

from rollout import BackendConfig, Mode, PauseMode, RolloutConfig, build_rollout  # noqa: E402
from rollout.tiny_model import ensure_tiny_model  # noqa: E402
from rollout.transfer import TransferConfig  # noqa: E402
from rollout.vllm_compat import has_weight_versions  # noqa: E402


def async_cfg(pause_mode: PauseMode) -> RolloutConfig:
    return RolloutConfig(
        backend=BackendConfig(
            name="vllm_gpu",
            dtype="bfloat16",
            gpu_memory_utilization=0.3,
            max_model_len=512,
            max_num_seqs=32,
        ),
        mode=Mode.colocate,
        transfer=TransferConfig(transport="auto", bucket_mb=1, timeout_s=60.0),
        engine="async",
        pause_mode=pause_mode,
        generate_timeout_s=300.0,
    )


greedy = functools.partial(helpers.greedy, max_tokens=24)


@pytest.mark.parametrize("pause_mode", [PauseMode.keep, PauseMode.abort])
def test_async_colocate_sleep_wake_refit_and_encoder_reset(tmp_path, pause_mode):
    from safetensors.torch import load_file

    path = ensure_tiny_model(SPEC, tmp_path / "models")
    state = load_file(path / "model.safetensors")
    w1, w2 = perturbed(state, seed=1), perturbed(state, seed=2)
    with build_rollout(async_cfg(pause_mode), path) as ro:
        assert ro._can_sleep, "colocate on vllm_gpu must really sleep"
        ro.update_weights(w1.items(), version=1)
        out1 = greedy(ro)
        handle = ro.submit(
            ["12+7="] * 8, n=4, max_tokens=400, seed=0
        )  # in flight through the sleep
        free_awake, _ = torch.cuda.mem_get_info()
        ro.sleep()
        free_asleep, total = torch.cuda.mem_get_info()
        assert free_asleep - free_awake > 0.15 * total, (free_awake, free_asleep, total)
        with pytest.raises(RuntimeError, match="asleep"):
            ro.submit(PROMPTS)
        stats = ro.update_weights(
            w2.items(), version=2
        )  # wake weights, refit, wake KV cache, reset, resume
        assert stats.caches_reset[:2] == ("prefix", "encoder"), stats.caches_reset
        samples = handle.result()
        assert len(samples) == 32
        if pause_mode is PauseMode.abort:  # aborted by the sleep, restarted on version 2
            assert all(s.version == 2 for s in samples)
        elif has_weight_versions(ro.vllm_version):
            assert all(set(s.token_versions) <= {1, 2} for s in samples)
        out2 = greedy(ro)
        ro.sleep()
        ro.update_weights(w1.items(), version=3)
        again = greedy(ro)
    assert [s.token_ids for s in out1] != [s.token_ids for s in out2]
    assert_same(out1, again)  # same weights after two sleep/refit cycles: identical greedy output
    assert {s.version for s in again} == {3}


def test_async_grpo_steps_with_max_staleness_1(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer"))
    from trainer_helpers import small_run_config

    from trainers.ppo import run

    cfg = small_run_config(
        tmp_path,
        "rollout/backend=vllm_gpu",
        "rollout.engine=async",
        "trainer.max_staleness=1",
        "trainer.total_steps=4",
    )
    summary = run(cfg)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert summary["max_version_lag"] <= 1 and summary["dropped_samples"] == 0
    print(json.dumps(summary, indent=2))  # the lead records these figures
