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

import contextlib
import itertools
import os
from typing import Any, Iterable, Optional

from rollout.api import (
    RefitEndpoint,
    RefitError,
    RefitStats,
    Sample,
    Send,
    no_core_split,
    send_tensors,
)
from trainers.distributed.cluster import RayCluster


class EngineHost:
    """Runs inside the actor: builds the engine and serves the driver's calls on it."""

    def __init__(self, cfg: Any, model_path: str) -> None:
        import ray

        from rollout import build_rollout

        self.ro = build_rollout(cfg, model_path)
        self.ro.refitter.node_id = ray.get_runtime_context().get_node_id()  # named in its endpoints
        self._handles: dict[int, Any] = {}
        self._ids = itertools.count()

    def info(self) -> dict[str, Any]:
        from rollout.vllm_segments import EngineSegments

        # vLLM's shared memory of the engine, and the processes holding it: this actor's and the engine's
        segments = EngineSegments.merge(
            "the rollout engine actor", [self.ro.vllm_segments], tracked=False
        )
        segments.pids.add(os.getpid())
        return {
            "node_id": self.ro.refitter.node_id,
            "dtype": self.ro.dtype,
            "version": self.ro.version,
            "vllm_segments": segments,
        }

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.ro, method)(*args, **kwargs)

    def begin(self, version: int) -> RefitEndpoint:
        return self.ro.refitter.begin(version)

    def finish(self, send_stats: Any = None, error: Optional[BaseException] = None) -> RefitStats:
        return self.ro.refitter.finish(send_stats, error)

    def submit(self, *args: Any, **kwargs: Any) -> int:
        key = next(self._ids)
        self._handles[key] = self.ro.submit(*args, **kwargs)
        return key

    def result(self, key: int, timeout_s: Optional[float]) -> tuple[list[Sample], Optional[float]]:
        handle = self._handles.pop(key)
        return handle.result(timeout_s), handle.finished_at

    def done(self, key: int) -> bool:
        return self._handles[key].done()

    def close(self) -> None:
        self.ro.close()


class RayEngine:
    """The driver's handle on the engine actor: the rollout engine API (rollout.api.RolloutEngine).

    Example:
        ro = RayEngine(learner.cluster, bundle=0, cfg=rollout_cfg, model_path=path, share_bundle=True)
        stats = ro.refit(1, learner.send)       # rank 0 streams into the actor's workers
        samples = ro.generate(prompts, n=4, max_tokens=16, seed=0)
        ro.close()
    """

    def __init__(
        self, cluster: RayCluster, bundle: int, cfg: Any, model_path: str, share_bundle: bool
    ) -> None:
        self._cluster = cluster
        # Beside rank 0 on its bundle (colocate) it takes none of the bundle's CPUs: the rank holds them.
        options = {"num_cpus": 0, "num_gpus": 0} if share_bundle else {}
        self._actor = cluster.remote(EngineHost, bundle, **options).remote(cfg, model_path)
        info = self._get("start", timeout_s=max(cluster.cfg.timeout_s, 600.0), method="info")
        self.node_id: str = info["node_id"]
        self.dtype = info["dtype"]
        self.version: int = info["version"]
        self._segments = (
            info["vllm_segments"] if self.node_id == _driver_node_id() else None
        )  # /dev/shm is per node
        self._sender: Any = None  # update_weights' sender in the driver (on the actor's node)
        self._model_path, self._tokenizer = model_path, None
        self.generate_timeout_s: float = (
            cfg.generate_timeout_s
        )  # a submit's samples wait at most this
        self._closed = False

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer, loaded here (vLLM's own stays in the actor)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self._model_path)
        return self._tokenizer

    def _get(
        self,
        what: str,
        *args: Any,
        timeout_s: Optional[float] = None,
        method: str = "call",
        **kwargs: Any,
    ) -> Any:
        ref = getattr(self._actor, method).remote(*args, **kwargs)
        (out,) = self._cluster.get(
            [ref], f"the rollout engine actor: {what}", timeout_s, role="the rollout engine actor"
        )
        return out

    def generate(self, *args: Any, **kwargs: Any) -> list[Sample]:
        return self._get("generate", "generate", *args, **kwargs)

    def submit(self, *args: Any, **kwargs: Any) -> "RemoteHandle":
        return RemoteHandle(self, self._get("submit", *args, method="submit", **kwargs))

    def off_engine_cores(self) -> contextlib.AbstractContextManager[None]:
        return no_core_split()  # the engine's processes are the actor's, placed by Ray

    def sleep(self, level: Optional[int] = None) -> None:
        self._get("sleep", "sleep", level)

    def wake_up(self, tags: Optional[list[str]] = None) -> None:
        self._get("wake_up", "wake_up", tags)

    def refit(self, version: int, send: Send) -> RefitStats:
        """The actor readies its workers when `send` asks the port for an endpoint; `send` runs here."""
        port = _ActorPort(self, version)
        try:
            send_stats = send(port, version)
            if port.endpoint_ is None:
                raise RefitError(f"refit to version {version}: the sending half sent nothing")
        except BaseException as exc:  # noqa: BLE001 - the actor's finish raises the root cause
            if port.endpoint_ is None:
                raise
            return self._finish(error=exc)
        return self._finish(send_stats)

    def update_weights(self, named_tensors: Iterable[tuple[str, Any]], version: int) -> RefitStats:
        return self.refit(version, send_tensors(named_tensors))

    def _finish(self, send_stats: Any = None, error: Optional[BaseException] = None) -> RefitStats:
        stats = self._get("finish_refit", send_stats, error, method="finish")
        self.version = stats.version
        return stats

    def _driver_sender(self, endpoint: RefitEndpoint) -> Any:
        if self.node_id != _driver_node_id():
            raise RuntimeError(
                f"the engine actor runs on Ray node {self.node_id}, this process elsewhere: send "
                "from a process on its node (a trainer rank), the transfer is node-local"
            )
        if self._sender is not None and self._sender.endpoint != endpoint.address:
            self._sender.close()
            self._sender = None
        if self._sender is None:
            self._sender = endpoint.sender()
        return self._sender

    def close(self) -> None:
        """Idempotent: the engine shuts its vLLM processes down in the actor, then the actor goes."""
        if self._closed:
            return
        self._closed = True
        try:
            self._get("close", method="close", timeout_s=min(120.0, self._cluster.cfg.timeout_s))
        finally:
            if self._sender is not None:
                self._sender.close()
            self._cluster.kill(self._actor)
            if self._segments is not None:  # after a clean close in the actor there is nothing left
                self._segments.release()

    def __enter__(self) -> "RayEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _ActorPort:
    """A refit's port on the driver's side of the engine actor."""

    def __init__(self, engine: RayEngine, version: int) -> None:
        self._engine, self._version = engine, version
        self.endpoint_: Optional[RefitEndpoint] = None

    def endpoint(self) -> RefitEndpoint:
        if self.endpoint_ is not None:
            raise RuntimeError("the port of a refit starts its workers once, during the refit")
        self.endpoint_ = self._engine._get("begin_refit", self._version, method="begin")
        return self.endpoint_

    def sender(self) -> Any:
        return self._engine._driver_sender(self.endpoint())


class RemoteHandle:
    """A submit() of the engine actor: its samples come over when asked for."""

    def __init__(self, engine: RayEngine, key: int) -> None:
        self._engine, self._key = engine, key
        self.finished_at: Optional[float] = (
            None  # known once the result came (the actor's clock differs)
        )
        self._samples: Optional[list[Sample]] = None

    def done(self) -> bool:
        return self._samples is not None or self._engine._get("done", self._key, method="done")

    def result(self, timeout_s: Optional[float] = None) -> list[Sample]:
        import time

        if self._samples is None:
            wait = self._engine.generate_timeout_s if timeout_s is None else timeout_s
            self._samples, _ = self._fetch(wait)
            self.finished_at = time.perf_counter()
        return self._samples

    def _fetch(self, wait: float) -> tuple[list[Sample], Optional[float]]:
        ref = self._engine._actor.result.remote(self._key, wait)
        (out,) = self._engine._cluster.get(
            [ref], "the rollout engine actor: result", wait + 30.0, role="the rollout engine actor"
        )
        return out


def _driver_node_id() -> Optional[str]:
    import ray

    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - not connected: no node to share
        return None
