"""The cache-reset decision (pure) and its version-gated application on an engine stand-in."""

from __future__ import annotations

import logging

import pytest

from rollout.cache_reset import Cache, caches_to_reset, reset_caches
from rollout.config import CacheReset, Mode

P, E, M = Cache.prefix, Cache.encoder, Cache.mm


@pytest.mark.parametrize(
    ("policy", "mode", "version", "multimodal", "after_sleep", "expected"),
    [
        ("auto", "colocate", "0.32.0", False, False, (P, E)),
        ("auto", "standalone", "0.32.0", True, False, (P, E, M)),
        ("auto", "standalone", "0.16.2", False, False, (P,)),  # no encoder reset before 0.17 ...
        (
            "auto",
            "colocate",
            "0.16.2",
            False,
            True,
            (P, E),
        ),  # ... except after a sleep in colocate mode
        ("auto", "standalone", "0.16.2", False, True, (P,)),  # standalone never sleeps
        ("auto", "colocate", "0.16.2", True, False, (P, M)),
        ("prefix", "colocate", "0.32.0", True, True, (P,)),
        ("all", "standalone", "0.10.0", False, False, (P, E, M)),
        ("none", "colocate", "0.32.0", True, True, ()),
    ],
)
def test_caches_to_reset(policy, mode, version, multimodal, after_sleep, expected):
    assert caches_to_reset(policy, mode, version, multimodal, after_sleep) == expected


def test_caches_to_reset_rejects_unknown_policy():
    with pytest.raises(ValueError):
        caches_to_reset("sometimes", Mode.colocate, "0.32.0", False, False)
    assert caches_to_reset(CacheReset.auto, Mode.colocate, "0.17.0", False, False) == (P, E)


class FakeEngine:
    def __init__(self):
        self.calls = []


class FakeLLM:
    """An LLM with (or without) each reset call; records what ran."""

    def __init__(self, prefix=True, encoder=True, mm=True, prefix_result=True):
        self.calls = []
        self.llm_engine = FakeEngine()
        if prefix:
            self.reset_prefix_cache = lambda: self.calls.append("prefix") or prefix_result
        if encoder:
            self.llm_engine.reset_encoder_cache = lambda: self.calls.append("encoder")
        if mm:
            self.reset_mm_cache = lambda: self.calls.append("mm")


def test_reset_caches_calls_each():
    llm = FakeLLM()
    assert reset_caches(llm, (P, E, M), "0.32.0") == (P, E, M)
    assert llm.calls == ["prefix", "encoder", "mm"]


def test_missing_method_logs_and_continues(caplog):
    llm = FakeLLM(encoder=False, mm=False)
    with caplog.at_level(logging.WARNING):
        assert reset_caches(llm, (P, E, M), "0.32.0") == (P,)
    assert "llm_engine.reset_encoder_cache" in caplog.text and "reset_mm_cache" in caplog.text


def test_encoder_gate_on_old_vllm(caplog):
    llm = FakeLLM()
    with caplog.at_level(logging.WARNING):
        assert reset_caches(llm, (P, E), "0.16.0") == (P,)
    assert llm.calls == ["prefix"] and ">= 0.17" in caplog.text


def test_refused_prefix_reset_raises():
    with pytest.raises(RuntimeError, match="refused to reset the prefix cache"):
        reset_caches(FakeLLM(prefix_result=False), (P,), "0.32.0")
