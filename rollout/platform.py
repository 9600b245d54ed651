"""Device questions the engine asks per backend: device type, synchronize, IPC, the transport `auto` picks, sleep levels."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from rollout.config import Backend
from rollout.transfer.config import Transport, _coerce

DEVICE_TYPES = {Backend.vllm_cpu: "cpu", Backend.vllm_gpu: "cuda", Backend.vllm_ascend: "npu"}

# NPU IPC (shareable device memory between processes) needs Ascend driver >= 25.3.RC1 and CANN >= 8.3.RC1.
NPU_IPC_MIN_DRIVER = "25.3.rc1"
NPU_IPC_MIN_CANN = "8.3.rc1"


@dataclass(frozen=True)
class Platform:
    """What one backend's device can do.

    Example:
        platform = get_platform(Backend.vllm_cpu)
        transport = platform.resolve_transport(cfg.transfer.transport)   # auto -> shm on the CPU
        platform.check_sleep_level(2)                                    # ValueError on NPU and CPU
    """

    device_type: str
    ipc_supported: bool  # the device can share its memory between processes (auto does not use it on NPUs yet)
    sleep_levels: tuple[int, ...]
    _synchronize: Callable[[], None] | None = None

    @property
    def supports_sleep(self) -> bool:
        return bool(self.sleep_levels)

    def synchronize(self) -> None:
        """Wait for all queued device work (a no-op on the CPU)."""
        if self._synchronize is not None:
            self._synchronize()

    def resolve_transport(self, transport: Transport | str) -> Transport:
        return resolve_transport(transport, self.device_type)

    def check_sleep_level(self, level: int) -> None:
        if level not in self.sleep_levels:
            allowed = ", ".join(map(str, self.sleep_levels)) or "none (no sleep mode)"
            raise ValueError(f"sleep level {level!r} is not supported on {self.device_type}; allowed: {allowed}")


def resolve_transport(transport: Transport | str, device_type: str) -> Transport:
    """The one place `auto` is decided: cuda -> cuda_ipc (the bucket stays on the GPU), anything else -> shm.
    An NPU gets shm even where its driver could share device memory (ipc_supported): rollout.transfer has
    no NPU IPC transport, and cuda_ipc serves CUDA devices only. An explicit choice is returned as is."""
    transport = _coerce(Transport, transport, "rollout.transfer.transport")
    if transport is not Transport.auto:
        return transport
    return Transport.cuda_ipc if device_type == "cuda" else Transport.shm


def parse_ascend_version(text: str) -> tuple[int, ...]:
    """'25.3.RC1' -> (25, 3, -1, 1); '8.3.0' -> (8, 3, 0). A release candidate sorts before its release."""
    parts: list[int] = []
    for token in re.findall(r"rc\d+|alpha\d*|beta\d*|\d+", text.lower()):
        if token.startswith("rc"):
            parts += [-1, int(token[2:])]
        elif token.startswith(("alpha", "beta")):
            parts += [-2, int(token.lstrip("alphbet") or 0)]
        else:
            parts.append(int(token))
    if not parts:
        raise ValueError(f"cannot parse Ascend version {text!r}")
    return tuple(parts)


def npu_ipc_supported(driver_version: str, cann_version: str) -> bool:
    return parse_ascend_version(driver_version) >= parse_ascend_version(NPU_IPC_MIN_DRIVER) and parse_ascend_version(
        cann_version
    ) >= parse_ascend_version(NPU_IPC_MIN_CANN)


ASCEND_ROOT = Path("/usr/local/Ascend")  # where a standard Ascend install puts its driver and toolkit


def probe_ascend_versions(root: Path = ASCEND_ROOT) -> tuple[str, str] | None:
    """(driver, CANN) versions from a standard Ascend install, or None where they are not found."""
    driver = _read_version(root / "driver" / "version.info", "Version")
    cann_files = sorted((root / "ascend-toolkit" / "latest").glob("*-linux/ascend_toolkit_install.info"))
    cann = _read_version(cann_files[0], "version") if cann_files else None
    return (driver, cann) if driver and cann else None


def _read_version(path: Path, key: str) -> str | None:
    try:
        text = path.read_text()
    except OSError:
        return None
    match = re.search(rf"^{key}\s*=\s*(\S+)", text, re.MULTILINE)
    return match.group(1) if match else None


def get_platform(backend: Backend | str, device_api: Any = None, ascend_root: Path = ASCEND_ROOT) -> Platform:
    """The platform of `backend`. `device_api` is `torch.cuda` / `torch.npu` (looked up when None);
    an NPU's IPC support is read from the Ascend install under `ascend_root`."""
    backend = Backend(backend)
    device_type = DEVICE_TYPES[backend]
    if device_type == "cpu":
        return Platform("cpu", ipc_supported=False, sleep_levels=())
    if device_api is None:
        import torch

        device_api = getattr(torch, device_type, None)
        if device_api is None:
            raise RuntimeError(f"backend {backend.value} needs torch.{device_type}; is its torch plugin installed?")
    if device_type == "cuda":
        return Platform("cuda", ipc_supported=True, sleep_levels=(1, 2), _synchronize=device_api.synchronize)
    versions = probe_ascend_versions(ascend_root)
    ipc = versions is not None and npu_ipc_supported(*versions)
    # Level 1 only on NPUs (project decision, issue 4): level 2 is not offered for vllm-ascend.
    return Platform("npu", ipc_supported=ipc, sleep_levels=(1,), _synchronize=device_api.synchronize)
