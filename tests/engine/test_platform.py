"""Platform decisions per backend; the NPU's hardware is the only thing faked (no NPU exists here)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rollout.config import Backend
from rollout.platform import (
    get_platform,
    npu_ipc_supported,
    parse_ascend_version,
    probe_ascend_versions,
    share_out,
)
from rollout.transfer import TransferConfig, resolve_transport
from rollout.transfer.config import Transport


class FakeDeviceApi:
    """Stands in for torch.npu / torch.cuda: counts synchronize() calls."""

    def __init__(self) -> None:
        self.syncs = 0

    def synchronize(self) -> None:
        self.syncs += 1


def test_cpu_platform():
    p = get_platform(Backend.vllm_cpu)
    assert p.device_type == "cpu" and not p.ipc_supported and not p.supports_sleep
    assert p.resolve_transport("auto") is Transport.shm
    assert p.resolve_transport("shm") is Transport.shm
    p.synchronize()  # no-op, must not need a device
    with pytest.raises(ValueError, match="sleep level 1 is not supported on cpu"):
        p.check_sleep_level(1)


def test_cuda_platform_with_fake_device():
    api = FakeDeviceApi()
    p = get_platform("vllm_gpu", device_api=api)
    assert p.device_type == "cuda" and p.ipc_supported and p.sleep_levels == (1, 2)
    assert p.resolve_transport(Transport.auto) is Transport.cuda_ipc
    assert p.resolve_transport("shm") is Transport.shm  # an explicit choice wins
    p.check_sleep_level(2)
    p.synchronize()
    assert api.syncs == 1


@pytest.mark.parametrize(
    ("versions", "ipc"),
    [
        (("25.3.RC1", "8.3.RC1"), True),
        (("25.5.0", "8.5.0"), True),
        (("25.2.0", "8.3.RC1"), False),  # driver too old
        (("25.3.RC1", "8.2.RC1"), False),  # CANN too old
        (None, False),  # no install found: assume no IPC
    ],
)
def test_npu_platform_decisions(tmp_path, versions, ipc):
    if versions is not None:  # a standard install's version files, read by the real probe
        _write_ascend_install(tmp_path, *versions)
    api = FakeDeviceApi()
    p = get_platform(Backend.vllm_ascend, device_api=api, ascend_root=tmp_path)
    assert p.device_type == "npu" and p.ipc_supported is ipc
    # No NPU IPC transport exists (cuda_ipc serves CUDA devices only): auto is shm, with IPC or without.
    assert p.resolve_transport("auto") is Transport.shm
    assert p.resolve_transport("nccl") is Transport.nccl  # an explicit choice wins
    assert p.sleep_levels == (1,)
    p.check_sleep_level(1)
    with pytest.raises(ValueError, match="sleep level 2 is not supported on npu; allowed: 1"):
        p.check_sleep_level(2)
    p.synchronize()
    assert api.syncs == 1


def test_one_resolver_of_auto():
    """The sender (which knows only its device) and the engine (which knows its platform) ask the same function."""
    cfg = TransferConfig()
    for backend, device in [
        (Backend.vllm_cpu, "cpu"),
        (Backend.vllm_gpu, "cuda:0"),
    ]:  # no torch "npu" device here
        platform = get_platform(backend, device_api=FakeDeviceApi())
        assert resolve_transport(cfg, device) is platform.resolve_transport(cfg.transport)
    assert (
        resolve_transport(cfg, "cuda:0") is Transport.cuda_ipc
        and resolve_transport(cfg, "cpu") is Transport.shm
    )
    assert resolve_transport(TransferConfig(transport="nccl"), "cpu") is Transport.nccl
    with pytest.raises(ValueError, match="rollout.transfer.transport='ipc' is not one of"):
        get_platform(Backend.vllm_cpu).resolve_transport("ipc")


def test_ascend_version_order():
    assert parse_ascend_version("25.3.RC1") < parse_ascend_version(
        "25.3.0"
    )  # a release candidate comes first
    assert parse_ascend_version("8.3.RC2") > parse_ascend_version("8.3.rc1")
    assert npu_ipc_supported("25.3.rc1", "8.3.RC1") and not npu_ipc_supported("24.1.0", "9.0.0")
    with pytest.raises(ValueError):
        parse_ascend_version("unknown")


def _write_ascend_install(root: Path, driver: str, cann: str) -> None:
    """The two version files of a standard Ascend install (driver, CANN toolkit) under `root`."""
    (root / "driver").mkdir()
    (root / "driver" / "version.info").write_text(f"Version={driver}\nascendhal_version=7.35.23\n")
    toolkit = root / "ascend-toolkit" / "latest" / "aarch64-linux"
    toolkit.mkdir(parents=True)
    (toolkit / "ascend_toolkit_install.info").write_text(
        f"package_name=Ascend-cann-toolkit\nversion={cann}\n"
    )


def test_probe_reads_standard_install_files(tmp_path):
    _write_ascend_install(tmp_path, "25.3.rc1", "8.3.RC1")
    assert probe_ascend_versions(tmp_path) == ("25.3.rc1", "8.3.RC1")
    assert probe_ascend_versions(tmp_path / "nonexistent") is None


def test_auto_dtype_on_cpu_is_the_checkpoints(tmp_path):
    import json

    from rollout.engine import resolve_dtype

    (tmp_path / "config.json").write_text(json.dumps({"dtype": "float32"}))
    assert resolve_dtype("auto", "cpu", str(tmp_path)) == "float32"
    assert resolve_dtype("bfloat16", "cpu", str(tmp_path)) == "bfloat16"  # an explicit choice wins
    assert resolve_dtype("auto", "cuda", str(tmp_path)) == "auto"  # vLLM decides on GPUs
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    assert resolve_dtype("auto", "cpu", str(tmp_path)) == "bfloat16"
    assert resolve_dtype("auto", "cpu", str(tmp_path / "missing")) == "auto"


def test_cpu_worker_env_gives_each_worker_its_own_cores():
    """vLLM's default binding refuses 2 workers on a 1-NUMA-node host; the platform hands out cores instead."""
    p = get_platform(Backend.vllm_cpu)
    assert p.worker_env(0, 1, 1, units=[0, 1]) == {}  # one worker: vLLM's own choice
    assert p.worker_env(0, 1, 2, units=[0, 1]) == {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    assert p.worker_env(1, 2, 1, units=[0, 1]) == {"VLLM_CPU_OMP_THREADS_BIND": "1"}
    assert p.worker_env(1, 2, 2, units=list(range(8))) == {"VLLM_CPU_OMP_THREADS_BIND": "4,5|6,7"}
    assert p.worker_env(1, 2, 2, units=[0, 1]) == {
        "VLLM_CPU_OMP_THREADS_BIND": "0|1"
    }  # fewer cores: shared in turn
    assert set(p.worker_env(0, 1, 2)["VLLM_CPU_OMP_THREADS_BIND"].split("|")) <= {
        ",".join(map(str, s)) for s in share_out(sorted(os.sched_getaffinity(0)), 2)
    }
    with pytest.raises(ValueError, match="engine 2 of 2"):
        p.worker_env(2, 2, 1, units=[0, 1])
    # the async engine binds even one worker to the cores it keeps apart from the trainer's
    assert p.worker_env(0, 1, 1, units=[1], bind_alone=True) == {"VLLM_CPU_OMP_THREADS_BIND": "1"}
    assert p.worker_env(0, 1, 2, units=[2, 3], bind_alone=True) == {
        "VLLM_CPU_OMP_THREADS_BIND": "2|3"
    }


def test_gpu_worker_env_gives_each_engine_its_own_devices():
    p = get_platform("vllm_gpu", device_api=FakeDeviceApi())
    assert p.worker_env(0, 1, 2, units=[0, 1]) == {}  # one engine sees what this process sees
    assert p.worker_env(1, 2, 2, units=[4, 5, 6, 7]) == {"CUDA_VISIBLE_DEVICES": "6,7"}
    with pytest.raises(ValueError, match="need 4 cuda devices, 2 are visible"):
        p.worker_env(0, 2, 2, units=[0, 1])


def test_share_out():
    assert share_out([0, 1, 2], 2) == [[0], [1, 2]]
    assert share_out([0], 3) == [[0], [0], [0]]
    with pytest.raises(ValueError, match="no cores or devices"):
        share_out([], 1)
