"""The transfer benchmark (benchmarks/transfer.py): its config composes, its shapes add up, and a tiny run
measures both sides."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from benchmarks import transfer as bench
from rollout.transfer import TransferConfig

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CONF_DIR = os.path.join(ROOT, "benchmarks", "conf")
# benchmarks/ is not installed: a subprocess outside the repo root finds it through PYTHONPATH
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
}


def test_bench_config_composes_into_typed_dataclasses():
    bench._register()
    with initialize_config_dir(config_dir=os.path.abspath(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "transfer",
            overrides=["rollout.transfer.sync=double_buffer", "rollout.transfer.bucket_mb=16"],
        )
        root = OmegaConf.to_object(cfg)
        assert (
            isinstance(root.rollout.transfer, TransferConfig)
            and root.rollout.transfer.bucket_bytes == 16 << 20
        )
        assert root.rollout.transfer.sync.value == "double_buffer" and root.bench.total_gb == 2.0
        with pytest.raises(Exception, match="bucket_mbb"):
            compose("transfer", overrides=["rollout.transfer.bucket_mbb=16"])


def test_qwen2_like_shapes_fill_the_budget():
    shapes = bench.qwen2_like_shapes(int(2e9), 1536, 2)
    total = sum(torch.Size(s).numel() for _, s in shapes) * 2
    assert 1.8e9 < total <= 2e9
    assert shapes[0] == ("model.embed_tokens.weight", (151936, 1536))
    assert ("model.layers.0.mlp.gate_proj.weight", (8960, 1536)) in shapes
    assert len({n for n, _ in shapes}) == len(shapes)


def test_nccl_on_cuda_spans_two_gpus_and_nothing_else_does():
    nccl, shm = TransferConfig(transport="nccl"), TransferConfig(transport="shm")
    assert bench._devices(nccl, bench.BenchConfig(device="cuda")) == ("cuda:0", "cuda:1")
    assert bench._devices(nccl, bench.BenchConfig(device="cpu")) == ("cpu", "cpu")
    assert bench._devices(shm, bench.BenchConfig(device="cuda")) == ("cuda", "cuda")


def test_tiny_run_measures_floor_and_refit():
    cfg = TransferConfig(transport="shm", bucket_mb=1, sync="double_buffer", timeout_s=30.0)
    result = bench.run(cfg, bench.BenchConfig(total_gb=0.01, hidden_size=256, num_repeats=2))
    assert result["num_buckets"] >= 5 and len(result["refit_all_s"]) == 2
    assert (
        result["floor_s"] > 0
        and result["refit_s"] > 0
        and result["ratio"] == result["refit_s"] / result["floor_s"]
    )


def test_tiny_direct_run_measures_against_the_one_copy_floor_and_the_memory():
    cfg = TransferConfig(transport="shm", mode="direct", timeout_s=30.0)
    result = bench.run(cfg, bench.BenchConfig(total_gb=0.01, hidden_size=256, num_repeats=2))
    assert (
        result["mode"] == "direct" and result["floor"] == "one-copy" and result["num_buckets"] == 0
    )
    assert (
        result["overhead_per_bucket_ms"] is None
        and result["ratio"] == result["refit_s"] / result["floor_s"]
    )
    for key in ("transfer_memory_mb", "sender_memory_mb", "sender_peak_over_start_mb"):
        assert isinstance(result[key], float), key
    bench.print_table([result], "direct")  # a row without buckets prints


@pytest.mark.slow
def test_multirun_sweep_and_summary(tmp_path):
    sweep = tmp_path / "sweep"
    small = [
        "bench.total_gb=0.01",
        "bench.hidden_size=256",
        "bench.num_repeats=1",
        "rollout.transfer.bucket_mb=1",
    ]
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.transfer",
        "-m",
        "rollout.transfer.sync=fenced,double_buffer",
        *small,
        f"hydra.sweep.dir={sweep}",
    ]
    subprocess.run(cmd, check=True, cwd=tmp_path, timeout=300, env=ENV)
    subprocess.run(
        [sys.executable, "-m", "benchmarks.transfer", "--summary", str(sweep)],
        check=True,
        timeout=120,
        env=ENV,
    )
    rows = json.loads((sweep / "summary.json").read_text())
    assert sorted(r["sync"] for r in rows) == ["double_buffer", "fenced"]
    assert (sweep / "summary.png").stat().st_size > 0


def test_trace_breaks_one_bucket_into_steps_that_add_up():
    cfg = TransferConfig(transport="shm", bucket_mb=1, sync="fenced", timeout_s=30.0)
    result = bench.run(
        cfg, bench.BenchConfig(total_gb=0.01, hidden_size=256, num_repeats=1, trace=True)
    )
    steps = dict(result["trace_ms"])
    assert len(result["refit_all_s"]) == 1  # the traced refit is not one of the timed repeats
    cycle = steps.pop("= one bucket, Ack to Ack")
    parts = [ms for label, ms in result["trace_ms"][:8]]
    assert all(ms >= 0 for ms in parts) and cycle > 0
    # the eight steps are consecutive, so their medians add up to about one cycle
    assert sum(parts) == pytest.approx(cycle, rel=0.5)
