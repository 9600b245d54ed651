"""`RolloutConfig()` alone serves a standard Hugging Face model, whatever its context length (issue 11, defect 1:
a fixed default max_model_len of 512 made vLLM refuse a model with max_position_embeddings=256)."""

from __future__ import annotations

from rollout import RolloutConfig, build_rollout
from rollout.tiny_model import TinyModelSpec, ensure_tiny_model


def test_default_config_serves_a_model_with_a_short_context(tmp_path):
    path = ensure_tiny_model(TinyModelSpec(max_position_embeddings=256), tmp_path)
    with build_rollout(RolloutConfig(), path) as ro:
        assert ro.llm.llm_engine.model_config.max_model_len == 256  # the model's own
        samples = ro.generate(["1+2="], n=2, max_tokens=4, temperature=1.0, seed=0)
    assert len(samples) == 2 and all(len(s.token_ids) >= 1 for s in samples)
