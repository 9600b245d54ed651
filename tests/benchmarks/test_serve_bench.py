"""The serve benchmark (benchmarks/serve.py): its config composes into typed dataclasses and refuses what
cannot run (the measurement itself starts a server and an engine: run by hand, docs/benchmarks.md)."""

from __future__ import annotations

import os

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from benchmarks import serve

CONF_DIR = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks", "conf"
)


def compose_root(*overrides: str) -> serve.ServeBenchRoot:
    serve._register()
    with initialize_config_dir(config_dir=os.path.abspath(CONF_DIR), version_base="1.3"):
        return OmegaConf.to_object(compose("serve", overrides=list(overrides)))


def test_serve_bench_config_composes_into_typed_dataclasses():
    root = compose_root("bench.model=qwen2_0_5b", "rollout.transfer.bucket_mb=256")
    assert root.bench.model == "qwen2_0_5b" and root.bench.num_repeats == 3
    assert root.rollout.transfer.bucket_bytes == 256 << 20


def test_serve_bench_config_rejects_what_cannot_run():
    with pytest.raises(Exception, match="bench.model='qwen2_7b'"):
        compose_root("bench.model=qwen2_7b")
    with pytest.raises(Exception, match="bench.num_repeats"):
        compose_root("bench.num_repeats=0")
