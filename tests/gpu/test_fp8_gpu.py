"""An FP8 engine fed by a BF16 trainer (`rollout.backend.quantization=fp8`: vLLM quantizes the BF16
weights online, at start and at every refit). After refits, every tensor of the engine's model (the
FP8 weights, their scales, the unquantized rest) is bit-equal to a fresh FP8 engine started from the
same BF16 weights, and greedy tokens and log-probs are identical. The log-prob gap to the BF16
weights themselves (what `logprob_gap` shows in training) is the quantization's, printed for the
record; refit time FP8 vs BF16 too.

Runs only where CUDA and vLLM's CUDA build exist (a lent H100/H200 with the vLLM GPU kit).
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import helpers
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.vllm_gpu]


helpers.skip_module_unless_vllm_cuda()

from test_vllm_gpu import SPEC, gpu_cfg, greedy, perturbed, save_model  # noqa: E402

from benchmarks.worker_ext import BENCH_WORKER_EXTENSION  # noqa: E402
from rollout import build_rollout  # noqa: E402
from rollout.tiny_model import TinyModelSpec, ensure_tiny_model  # noqa: E402


def fp8_cfg(quantization: str | None = "fp8"):
    cfg = gpu_cfg(utilization=0.2)
    cfg.backend = dataclasses.replace(cfg.backend, quantization=quantization)
    return cfg


def trainer_logprobs(model_dir, samples) -> list[list[float]]:
    """Each sampled token's log-prob under the BF16 weights in transformers (the trainer's view)."""
    from transformers import AutoModelForCausalLM

    model = (
        AutoModelForCausalLM.from_pretrained(model_dir)
        .to(device="cuda", dtype=torch.bfloat16)
        .eval()
    )
    out = []
    with torch.no_grad():
        for s in samples:
            ids = torch.tensor([s.prompt_token_ids + s.token_ids], device="cuda")
            logits = model(ids).logits[0, len(s.prompt_token_ids) - 1 : -1].float()
            lp = logits.log_softmax(-1).gather(-1, ids[0, len(s.prompt_token_ids) :, None])[:, 0]
            out.append(lp.tolist())
    del model
    torch.cuda.empty_cache()
    return out


def timed_refits(ro, weights: list[dict]) -> tuple[list[float], str]:
    """Seconds of each refit, and the load path the last one took."""
    times = []
    for version, w in enumerate(weights, start=1):
        start = time.perf_counter()
        stats = ro.update_weights(w.items(), version=version)
        times.append(time.perf_counter() - start)
        assert stats.version == version
    return times, stats.load_path


@pytest.mark.parametrize("spec", [SPEC, TinyModelSpec.qwen2_0_5b()], ids=["tiny", "0.5b"])
def test_fp8_refit_is_bit_equal_to_a_fresh_fp8_engine(spec, tmp_path):
    from safetensors.torch import load_file

    path = ensure_tiny_model(spec, tmp_path / "models")
    state = load_file(path / "model.safetensors")
    new, other = perturbed(state, seed=1), perturbed(state, seed=2)
    fresh_dir = save_model(path, new, tmp_path / "fresh")
    with build_rollout(fp8_cfg(), fresh_dir, worker_extension=BENCH_WORKER_EXTENSION) as fresh:
        expected = greedy(fresh)
        want = fresh.llm.collective_rpc("refit_audit_digests")[0]
    refits = [other, new, other, new]
    with build_rollout(fp8_cfg(), path, worker_extension=BENCH_WORKER_EXTENSION) as ro:
        fp8_s, load_path = timed_refits(ro, refits)
        got_samples = greedy(ro)
        got = ro.llm.collective_rpc("refit_audit_digests")[0]
    with build_rollout(fp8_cfg(None), path) as bf16:
        bf16_s, _ = timed_refits(bf16, refits)
    kinds = {name: kind for name, (kind, _) in want.items()}
    quantized = sorted(n for n in want if n.endswith("weight_scale"))
    fp8_med, bf16_med = statistics.median(fp8_s[1:]), statistics.median(bf16_s[1:])
    print(
        f"fp8 {spec.key()}: load path {load_path}; {len(want)} tensors, {len(quantized)} weight "
        f"scales; refit s fp8 {fp8_med:.4f} vs bf16 {bf16_med:.4f} (median of 3)"
    )
    differ = sorted(
        n for n in set(want) | set(got) if tuple(want.get(n, ())) != tuple(got.get(n, ()))
    )
    named = [(n, kinds.get(n, "only in refit")) for n in differ]
    print(f"fp8 {spec.key()}: differ from the fresh FP8 engine: {named}")
    assert quantized, "no FP8 weight scales: the engine did not quantize"
    assert not [n for n, kind in named if kind not in ("buffer", "attribute")], named
    assert [s.token_ids for s in got_samples] == [s.token_ids for s in expected]
    assert [s.logprobs for s in got_samples] == [s.logprobs for s in expected]
    ref = trainer_logprobs(fresh_dir, got_samples)
    gaps = [abs(a - b) for s, r in zip(got_samples, ref) for a, b in zip(s.logprobs, r)]
    print(
        f"fp8 {spec.key()}: logprob_gap vs the BF16 weights (transformers): mean "
        f"{statistics.mean(gaps):.4f}, max {max(gaps):.4f} over {len(gaps)} tokens"
    )
