"""The rollout engine as a Ray actor of the run's placement group, behind the rollout API the loop uses.

With `trainer.num_workers > 1` the engine (`build_rollout`: one engine, or an EngineGroup) runs in an actor
on the feeding rank's bundle (bundle 0), so the node-local transfer (socket, shared memory / CUDA IPC) always
connects two processes on one node, wherever the driver runs (a laptop joined to a cluster with
`ray.address=host:port`). colocate: the actor shares rank 0's bundle and device and sleeps while the ranks
train, as the one-process engine does; standalone: it gets a bundle of its own, placed by the group's
strategy (a refit still checks that it shares rank 0's node).

Every call waits at most `ray.timeout_s`; an engine actor that dies fails the call with an error naming it.
A killed actor cannot remove vLLM's shared memory (Ray kills its processes, Python's resource tracker
included): where the driver shares the actor's node, `close()` removes what the engine's processes left
(rollout/vllm_segments.py), and only that.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from trainers.distributed.cluster import RayCluster


class EngineHost:
    """Runs inside the actor: builds the engine and serves the driver's calls on it."""

    def __init__(self, cfg: Any, model_path: str) -> None:
        from rollout import build_rollout

        self.ro = build_rollout(cfg, model_path)

    def info(self) -> dict[str, Any]:
        import ray

        from rollout.vllm_segments import EngineSegments

        # vLLM's shared memory of the engine, and the processes holding it: this actor's and the engine's
        segments = getattr(self.ro, "vllm_segments", None) or EngineSegments("engine actor")
        segments = EngineSegments.merge("the rollout engine actor", [segments], tracked=False)
        segments.pids.add(os.getpid())
        return {"node_id": ray.get_runtime_context().get_node_id(), "dtype": getattr(self.ro, "dtype", None),
                "version": self.ro.version, "vllm_segments": segments}

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.ro, method)(*args, **kwargs)

    def close(self) -> None:
        self.ro.close()


class RayEngine:
    """The driver's handle on the engine actor: generate, sleep, wake_up, begin_refit/finish_refit, close.

    Example:
        ro = RayEngine(learner.cluster, bundle=0, cfg=rollout_cfg, model_path=path)
        stats = learner.refit(ro, version=1)     # rank 0 streams into the actor's workers
        samples = ro.generate(prompts, n=4, max_tokens=16, seed=0)
        ro.close()
    """

    def __init__(self, cluster: RayCluster, bundle: int, cfg: Any, model_path: str, share_bundle: bool) -> None:
        self._cluster = cluster
        # Beside rank 0 on its bundle (colocate) it takes none of the bundle's CPUs: the rank holds them.
        options = {"num_cpus": 0, "num_gpus": 0} if share_bundle else {}
        self._actor = cluster.remote(EngineHost, bundle, **options).remote(cfg, model_path)
        info = self._get("start", timeout_s=max(cluster.cfg.timeout_s, 600.0), method="info")
        self.node_id: str = info["node_id"]
        self.dtype = info["dtype"]
        self.version: int = info["version"]
        self._segments = info["vllm_segments"] if self.node_id == _driver_node_id() else None  # /dev/shm is per node
        self._closed = False

    def _get(self, what: str, *args: Any, timeout_s: Optional[float] = None, method: str = "call", **kwargs: Any) -> Any:
        ref = getattr(self._actor, method).remote(*args, **kwargs)
        (out,) = self._cluster.get([ref], f"the rollout engine actor: {what}", timeout_s, role="the rollout engine actor")
        return out

    def generate(self, *args: Any, **kwargs: Any) -> list[Any]:
        return self._get("generate", "generate", *args, **kwargs)

    def sleep(self, level: Optional[int] = None) -> None:
        self._get("sleep", "sleep", level)

    def wake_up(self, tags: Optional[list[str]] = None) -> None:
        self._get("wake_up", "wake_up", tags)

    def begin_refit(self, version: int) -> Any:
        return self._get("begin_refit", "begin_refit", version)

    def finish_refit(self, send_stats: Any = None, error: Optional[BaseException] = None) -> Any:
        stats = self._get("finish_refit", "finish_refit", send_stats, error)
        self.version = stats.version
        return stats

    def close(self) -> None:
        """Idempotent: the engine shuts its vLLM processes down in the actor, then the actor goes."""
        if self._closed:
            return
        self._closed = True
        try:
            self._get("close", method="close", timeout_s=min(120.0, self._cluster.cfg.timeout_s))
        finally:
            self._cluster.kill(self._actor)
            if self._segments is not None:  # after a clean close in the actor there is nothing left
                self._segments.release()

    def __enter__(self) -> "RayEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _driver_node_id() -> Optional[str]:
    import ray

    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - not connected: no node to share
        return None
