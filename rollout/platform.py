"""Device questions the engine asks per backend: device type, synchronize, IPC, default transport, sleep levels,
and which cores or devices each engine's vLLM workers get."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from rollout.config import Backend
from rollout.transfer.config import Transport, resolve_transport

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
    ipc_supported: (
        bool  # the device can share its memory between processes (auto does not use it on NPUs yet)
    )
    sleep_levels: tuple[int, ...]
    _synchronize: Callable[[], None] | None = None
    visible_devices_var: str | None = (
        None  # the variable vLLM's workers read their devices from (None on the CPU)
    )

    @property
    def supports_sleep(self) -> bool:
        return bool(self.sleep_levels)

    def synchronize(self) -> None:
        """Wait for all queued device work (a no-op on the CPU)."""
        if self._synchronize is not None:
            self._synchronize()

    def resolve_transport(self, transport: Transport | str) -> Transport:
        return resolve_transport(transport, self.device_type)

    def worker_env(
        self,
        engine_index: int,
        num_engines: int,
        tensor_parallel_size: int,
        units: Sequence[int | str] | None = None,
        bind_alone: bool = False,
    ) -> dict[str, str]:
        """vLLM's own environment variables for the processes of engine `engine_index` of `num_engines`, each
        with `tensor_parallel_size` workers: vLLM offers no argument for either setting. `units` are the
        cores (CPU) or device indices to share out, one slice per worker; by default the cores this process
        may run on, or the devices it sees. One worker alone keeps vLLM's own choice (empty dict).

        On the CPU, vLLM binds each worker's OpenMP threads to a NUMA node by default and refuses two
        workers on a one-node host: each worker gets its own cores instead (VLLM_CPU_OMP_THREADS_BIND,
        workers separated by '|'). On GPUs and NPUs, engine k sees only its own devices.

        `bind_alone` (CPU): one worker alone is bound to `units` too (the async engine keeps its cores apart from
        the trainer's, rollout.engine_cores)."""
        num_workers = num_engines * tensor_parallel_size
        if not 0 <= engine_index < num_engines or tensor_parallel_size < 1:
            raise ValueError(
                f"engine {engine_index} of {num_engines} with tensor_parallel_size {tensor_parallel_size}"
            )
        if num_workers == 1 and not (bind_alone and self.device_type == "cpu"):
            return {}
        if units is None:
            units = (
                sorted(os.sched_getaffinity(0))
                if self.device_type == "cpu"
                else self._visible_devices()
            )
        shares = share_out(list(units), num_workers)
        mine = shares[
            engine_index * tensor_parallel_size : (engine_index + 1) * tensor_parallel_size
        ]
        if self.device_type == "cpu":
            return {"VLLM_CPU_OMP_THREADS_BIND": "|".join(",".join(map(str, s)) for s in mine)}
        if num_engines == 1:
            return {}  # one engine uses the devices it sees, as vLLM does by itself
        # each worker needs a device of its own here: a shared one would hold two engines' weights and caches
        if len(units) < num_workers:
            raise ValueError(
                f"{num_engines} engines x tensor_parallel_size {tensor_parallel_size} need "
                f"{num_workers} {self.device_type} devices, {len(units)} are visible"
            )
        return {self.visible_devices_var: ",".join(str(s[0]) for s in mine)}

    def _visible_devices(self) -> list[int | str]:
        """The devices this process sees, as the child's variable must name them (physical ids or UUIDs)."""
        inherited = os.environ.get(self.visible_devices_var, "").strip()
        if inherited:
            return [d.strip() for d in inherited.split(",") if d.strip()]
        import torch

        return list(range(getattr(torch, self.device_type).device_count()))

    def check_sleep_level(self, level: int) -> None:
        if level not in self.sleep_levels:
            allowed = ", ".join(map(str, self.sleep_levels)) or "none (no sleep mode)"
            raise ValueError(
                f"sleep level {level!r} is not supported on {self.device_type}; allowed: {allowed}"
            )


def share_out(units: list, num_workers: int) -> list[list]:
    """`units` split into `num_workers` contiguous, near-equal slices; with fewer units than workers,
    workers share them in turn (two vLLM workers on one core still run, just slower)."""
    if not units:
        raise ValueError("no cores or devices to share out")
    if len(units) < num_workers:
        return [[units[w % len(units)]] for w in range(num_workers)]
    return [
        units[w * len(units) // num_workers : (w + 1) * len(units) // num_workers]
        for w in range(num_workers)
    ]


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
    return parse_ascend_version(driver_version) >= parse_ascend_version(
        NPU_IPC_MIN_DRIVER
    ) and parse_ascend_version(cann_version) >= parse_ascend_version(NPU_IPC_MIN_CANN)


ASCEND_ROOT = Path(
    "/usr/local/Ascend"
)  # where a standard Ascend install puts its driver and toolkit


def probe_ascend_versions(root: Path = ASCEND_ROOT) -> tuple[str, str] | None:
    """(driver, CANN) versions from a standard Ascend install, or None where they are not found."""
    driver = _read_version(root / "driver" / "version.info", "Version")
    cann_files = sorted(
        (root / "ascend-toolkit" / "latest").glob("*-linux/ascend_toolkit_install.info")
    )
    cann = _read_version(cann_files[0], "version") if cann_files else None
    return (driver, cann) if driver and cann else None


def _read_version(path: Path, key: str) -> str | None:
    try:
        text = path.read_text()
    except OSError:
        return None
    match = re.search(rf"^{key}\s*=\s*(\S+)", text, re.MULTILINE)
    return match.group(1) if match else None


def get_platform(
    backend: Backend | str, device_api: Any = None, ascend_root: Path = ASCEND_ROOT
) -> Platform:
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
            raise RuntimeError(
                f"backend {backend.value} needs torch.{device_type}; is its torch plugin installed?"
            )
    if device_type == "cuda":
        return Platform(
            "cuda",
            ipc_supported=True,
            sleep_levels=(1, 2),
            _synchronize=device_api.synchronize,
            visible_devices_var="CUDA_VISIBLE_DEVICES",
        )
    versions = probe_ascend_versions(ascend_root)
    ipc = versions is not None and npu_ipc_supported(*versions)
    # Level 1 only on NPUs (project decision, issue 4): level 2 is not offered for vllm-ascend.
    return Platform(
        "npu",
        ipc_supported=ipc,
        sleep_levels=(1,),
        _synchronize=device_api.synchronize,
        visible_devices_var="ASCEND_RT_VISIBLE_DEVICES",
    )
