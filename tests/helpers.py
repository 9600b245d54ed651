"""What many tests share, written once: the test engine's settings, greedy decoding, our child processes."""

from __future__ import annotations

import dataclasses
import os
import time

import psutil

from rollout import BackendConfig, RolloutConfig
from rollout.transfer import TransferConfig

# The engine most tests run: fp32 (the trainer's precision), 1 MB buckets so every refit of the tiny model
# (1.8 MB) spans several buckets.
TEST_ENGINE_CFG = RolloutConfig(
    backend=BackendConfig(dtype="float32", max_model_len=512, max_num_seqs=32),
    transfer=TransferConfig(bucket_mb=1, timeout_s=30.0),
)

ASYNC_TEST_ENGINE_CFG = dataclasses.replace(
    TEST_ENGINE_CFG, engine="async", generate_timeout_s=120.0
)

PROMPTS = ["The quick brown fox", "12+7=", "def f(x):\n    return"]


def greedy(ro, prompts=PROMPTS, max_tokens: int = 16) -> list:
    """One greedy sample per prompt."""
    return ro.generate(prompts, n=1, max_tokens=max_tokens, temperature=0.0)


def assert_matches_transformers(model, samples, max_tokens: int, atol: float) -> None:
    """transformers' greedy decode with `model` gives each sample's tokens, and its log-probs of them
    match the engine's to `atol`."""
    import torch

    eos = model.config.eos_token_id
    with torch.no_grad():
        for s in samples:
            ids = torch.tensor([s.prompt_token_ids])
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=model.config.pad_token_id,
            )
            expected = out[0, ids.shape[1] :].tolist()
            expected = expected[: expected.index(eos) + 1] if eos in expected else expected
            assert s.token_ids == expected, (
                f"prompt {s.prompt_index}: engine {s.token_ids} vs transformers {expected}"
            )
            full = torch.tensor([s.prompt_token_ids + s.token_ids])
            logp = torch.log_softmax(model(input_ids=full).logits[0], dim=-1)
            start = len(s.prompt_token_ids) - 1
            chosen = logp[torch.arange(start, start + len(s.token_ids)), torch.tensor(s.token_ids)]
            torch.testing.assert_close(
                torch.tensor(s.logprobs, dtype=chosen.dtype), chosen, atol=atol, rtol=0
            )


def vllm_socket_dir(ro) -> str:
    """The engine's own directory of vLLM's IPC socket files (rollout/vllm_sockets.py), checked to hold
    them: close() must remove it (`assert not os.path.exists(...)`)."""
    assert os.listdir(ro.sockets.path), f"vLLM bound no socket file in {ro.sockets.path}"
    return ro.sockets.path


def child_pids() -> set[int]:
    """This process's children, minus Python's multiprocessing resource tracker (one per parent, lives until
    exit)."""
    pids = set()
    for p in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if not any("resource_tracker" in part for part in p.cmdline()):
                pids.add(p.pid)
        except psutil.NoSuchProcess:
            pass
    return pids


def wait_gone(pids: set[int], timeout_s: float = 30.0) -> set[int]:
    """The pids still alive (zombies count as gone) after waiting up to `timeout_s`."""
    deadline = time.monotonic() + timeout_s

    def alive() -> set[int]:
        return {
            p
            for p in pids
            if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
        }

    left = alive()
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = alive()
    return left


def skip_module_unless_vllm_cuda() -> None:
    """Called at a test module's top: skips the whole module unless vLLM's CUDA build and a CUDA
    device are here (a lent H100/H200 with the vLLM GPU kit)."""
    import pytest
    import torch

    try:
        from vllm.platforms import current_platform
    except Exception:  # noqa: BLE001 - no vLLM, or a broken one: nothing to run here
        cuda = False
    else:
        cuda = torch.cuda.is_available() and current_platform.is_cuda()
    if not cuda:
        pytest.skip("needs vLLM's CUDA build and a CUDA device", allow_module_level=True)
