"""The vllm_gpu backend end to end on a real GPU with real vLLM (CUDA build): refit through cuda_ipc
into a live engine equals a fresh engine on the same weights; colocate mode with the real memory
hand-off (sleep, wake weights, refit, wake KV cache) and the encoder-cache reset after sleep; refits of
tied-embedding models (issue 10).

Runs only where CUDA and vLLM's CUDA build exist (the lent H100: see docs/benchmarks.md, "GPU").
FlashAttention 3 on Hopper has no fp32 path, so the model here is the tiny Qwen2 in bf16.
"""

from __future__ import annotations

import dataclasses
import functools

import helpers
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.vllm_gpu]


helpers.skip_module_unless_vllm_cuda()

from benchmarks.worker_ext import BENCH_WORKER_EXTENSION  # noqa: E402
from rollout import BackendConfig, CacheReset, Mode, RolloutConfig, build_rollout  # noqa: E402
from rollout.load_path import LoadPath  # noqa: E402
from rollout.tiny_model import TinyModelSpec, build_tokenizer, ensure_tiny_model  # noqa: E402
from rollout.transfer import Sync, TransferConfig, Transport  # noqa: E402

PROMPTS = helpers.PROMPTS
# bf16 with 4 layers: 1.8 MB, so a refit with 1 MB buckets spans two buckets and a layer straddles them
# (the default 2-layer tiny model is 0.9 MB in bf16: one bucket, no race to exercise).
SPEC = TinyModelSpec(num_hidden_layers=4, dtype="bfloat16")


def gpu_cfg(
    mode: Mode = Mode.standalone,
    sync: Sync = Sync.fenced,
    utilization: float = 0.2,
    load_format: str = "auto",
    load_path: LoadPath = LoadPath.auto,
) -> RolloutConfig:
    return RolloutConfig(
        backend=BackendConfig(
            name="vllm_gpu",
            dtype="bfloat16",
            gpu_memory_utilization=utilization,
            max_model_len=512,
            max_num_seqs=32,
            load_format=load_format,
        ),
        mode=mode,
        transfer=TransferConfig(transport="auto", bucket_mb=1, sync=sync, timeout_s=60.0),
        cache_reset=CacheReset.auto,
        load_path=load_path,
    )


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from safetensors.torch import load_file

    path = ensure_tiny_model(SPEC, tmp_path_factory.mktemp("models"))
    return path, load_file(path / "model.safetensors")


def perturbed(state, seed, scale=0.05, device="cuda"):
    gen = torch.Generator().manual_seed(seed)
    return {
        k: (v.float() + scale * torch.randn(v.shape, generator=gen)).to(v.dtype).to(device)
        for k, v in state.items()
    }


def save_model(src_dir, state, out_dir):
    """The same config and tokenizer as src_dir, with `state` as its weights (what a fresh engine loads)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(src_dir)
    model = AutoModelForCausalLM.from_config(config).to(
        torch.bfloat16
    )  # (torch_)dtype= differs across versions
    missing, unexpected = model.load_state_dict(
        {k: v.cpu() for k, v in state.items()}, strict=False
    )
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    assert set(missing) <= tied and not unexpected, (
        missing,
        unexpected,
    )  # a tied head shares the embedding
    model.save_pretrained(out_dir, safe_serialization=True)
    build_tokenizer().save_pretrained(out_dir)
    return out_dir


greedy = functools.partial(helpers.greedy, max_tokens=24)


def assert_same(a, b, atol=0.0):
    assert [s.token_ids for s in a] == [s.token_ids for s in b]
    for x, y in zip(a, b):
        torch.testing.assert_close(
            torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=atol, rtol=0
        )


@pytest.fixture(scope="module")
def fresh_expected(base, tmp_path_factory):
    """Greedy output of a fresh engine started from disk on the perturbed weights (seed 1)."""
    path, state = base
    new = perturbed(state, seed=1)
    with build_rollout(gpu_cfg(), save_model(path, new, tmp_path_factory.mktemp("fresh"))) as fresh:
        return new, greedy(fresh)


@pytest.mark.parametrize(
    ("sync", "load_format", "load_path"),
    [
        (Sync.fenced, "auto", LoadPath.auto),
        (Sync.double_buffer, "auto", LoadPath.auto),
        (Sync.fenced, "dummy", LoadPath.auto),
        (Sync.fenced, "auto", LoadPath.layerwise),
    ],
)
def test_cuda_ipc_refit_equals_fresh_engine(base, fresh_expected, sync, load_format, load_path):
    """auto loads an unquantized bf16 model through its weight loaders directly (issue 16, item 3);
    layerwise forces vLLM's layerwise reload. Both equal a fresh engine."""
    path, _ = base
    new, expected = fresh_expected
    cfg = gpu_cfg(sync=sync, load_format=load_format, load_path=load_path)
    with build_rollout(cfg, path, worker_extension=BENCH_WORKER_EXTENSION) as ro:
        assert ro.refitter.transfer.transport is Transport.cuda_ipc  # auto on cuda
        assert ro.llm.collective_rpc("refit_worker_info")[0]["device"].startswith(
            "cuda"
        )  # receiver on the GPU
        if (
            load_format == "dummy"
        ):  # random weights until the first refit: generating first is refused
            with pytest.raises(RuntimeError, match="dummy"):
                greedy(ro)
            before = None
        else:
            before = greedy(ro)
        # Two refits: the direct path records its weight loaders' writes at the first, replays them at the second.
        plans = []
        for version, state in ((1, perturbed(base[1], seed=2)), (2, new)):
            stats = ro.update_weights(state.items(), version=version)
            assert stats.num_buckets > 1 and stats.version == version
            assert stats.load_path == ("layerwise" if load_path is LoadPath.layerwise else "direct")
            plans.append(stats.load_plan)
        refitted = greedy(ro)
    assert plans == (["", ""] if load_path is LoadPath.layerwise else ["recorded", "replayed"])
    if before is not None:
        assert [s.token_ids for s in before] != [s.token_ids for s in refitted], (
            "the perturbation changed nothing"
        )
    assert all(s.version == 2 for s in refitted)
    assert_same(refitted, expected, atol=1e-3)


@pytest.mark.parametrize(
    ("arch", "load_path"),
    [("qwen2", LoadPath.auto), ("llama", LoadPath.auto), ("llama", LoadPath.layerwise)],
)
def test_tied_embeddings_refit_equals_fresh_engine(arch, load_path, tmp_path):
    """Issue 10 on vLLM's CUDA build: a tied model (no lm_head.weight in the trainer's weights nor in the
    checkpoint), the embedding perturbed too; the refit engine's output changes exactly as a fresh
    engine's on the same weights."""
    from safetensors.torch import load_file

    path = ensure_tiny_model(
        dataclasses.replace(
            SPEC, architecture=arch, tie_word_embeddings=True, num_key_value_heads=1
        ),
        tmp_path / "models",
    )
    state = load_file(path / "model.safetensors")
    assert "lm_head.weight" not in state and "model.embed_tokens.weight" in state
    new = perturbed(state, seed=3)
    with build_rollout(gpu_cfg(), save_model(path, new, tmp_path / "fresh")) as fresh:
        expected = greedy(fresh)
    with build_rollout(gpu_cfg(load_path=load_path), path) as ro:
        before = greedy(ro)
        stats = ro.update_weights(new.items(), version=1)
        assert stats.load_path == ("layerwise" if load_path is LoadPath.layerwise else "direct")
        refitted = greedy(ro)
        ro.update_weights(
            perturbed(state, seed=4).items(), version=2
        )  # and again: no state kept from the first
        ro.update_weights(new.items(), version=3)
        again = greedy(ro)
    assert [s.token_ids for s in before] != [s.token_ids for s in refitted], (
        "the perturbation changed nothing"
    )
    assert_same(refitted, expected, atol=1e-3)
    assert_same(again, expected, atol=1e-3)


def test_colocate_sleep_wake_refit_and_encoder_reset(base):
    path, state = base
    w1, w2 = perturbed(state, seed=1), perturbed(state, seed=2)
    with build_rollout(gpu_cfg(mode=Mode.colocate, utilization=0.3), path) as ro:
        ro.update_weights(w1.items(), version=1)
        out1 = greedy(ro)
        free_awake, _ = torch.cuda.mem_get_info()
        ro.sleep()
        free_asleep, total = torch.cuda.mem_get_info()
        # level 1 offloads the weights and drops the KV cache: most of the engine's 30% comes back
        assert free_asleep - free_awake > 0.15 * total, (free_awake, free_asleep, total)
        with pytest.raises(RuntimeError, match="asleep"):
            greedy(ro)
        stats = ro.update_weights(
            w2.items(), version=2
        )  # wakes weights, refits, wakes the KV cache
        assert "encoder" in stats.caches_reset and "prefix" in stats.caches_reset, (
            stats.caches_reset
        )
        out2 = greedy(ro)
        ro.sleep()
        ro.update_weights(w1.items(), version=3)
        again = greedy(ro)
    assert [s.token_ids for s in out1] != [s.token_ids for s in out2]
    assert_same(out1, again)  # same weights after two sleep/refit cycles: identical greedy output
    assert {s.version for s in again} == {3}
