"""The Ray side of a run: start a local Ray (or join a cluster), reserve one placement-group bundle per
trainer rank, and take everything down again on exit, error or Ctrl-C.

`ray.address` unset starts a private local instance sized to this machine and stops it at the end;
`ray.address=auto` (or `host:port`) joins a running cluster and, on exit, removes only what this run
created (its actors and its placement group). Every wait is bounded by `ray.timeout_s`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import Enum
from typing import Any, Optional

from rollout.transfer.config import coerce_enum


class PlacementStrategy(str, Enum):
    PACK = "PACK"  # fill one node before the next (a run that fits one node stays on it)
    SPREAD = "SPREAD"  # one bundle per node where it can
    STRICT_PACK = "STRICT_PACK"  # all on one node or fail
    STRICT_SPREAD = "STRICT_SPREAD"  # each bundle on its own node or fail


@dataclass
class RayConfig:
    """The `ray` node: where the trainer ranks run when `trainer.num_workers > 1`.

    Example:
        with RayCluster(RayConfig(), num_bundles=2, gpus_per_bundle=0) as cluster:
            actor = cluster.remote(TrainerRank, bundle=0).remote(...)
    """

    address: Optional[str] = (
        None  # null: a local Ray for this run; "auto" or "host:port": join a cluster
    )
    num_cpus: Optional[float] = (
        None  # local Ray only: CPUs it may use (null = all of this machine's)
    )
    cpus_per_worker: Optional[float] = (
        None  # each bundle's CPUs (null: local = num_cpus / bundles, cluster = 1)
    )
    placement_strategy: PlacementStrategy = PlacementStrategy.PACK
    object_store_mb: int = 512  # local Ray only: its shared-memory object store
    timeout_s: float = 300.0  # placement, actor calls and torch.distributed collectives

    def __post_init__(self) -> None:
        self.placement_strategy = coerce_enum(
            PlacementStrategy, self.placement_strategy, "ray.placement_strategy"
        )
        if self.address is not None and self.num_cpus is not None:
            raise ValueError(
                f"ray.num_cpus={self.num_cpus!r} sizes a local Ray; ray.address={self.address!r} joins one"
            )
        for key in ("num_cpus", "cpus_per_worker"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise ValueError(f"ray.{key} must be > 0 (or null), got {value!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"ray.timeout_s must be > 0 seconds, got {self.timeout_s!r}")
        if self.object_store_mb < 80:
            raise ValueError(
                f"ray.object_store_mb must be >= 80 (Ray's minimum), got {self.object_store_mb!r}"
            )


class RayCluster:
    """A context manager owning this run's Ray resources: the local instance it started (if any), one
    placement group of `num_bundles` bundles, and the actors created through `remote()`."""

    def __init__(
        self,
        cfg: RayConfig,
        num_bundles: int,
        gpus_per_bundle: float = 0,
        extra_bundles: Optional[list[dict[str, float]]] = None,
    ) -> None:
        """`num_bundles` alike (one per trainer rank), then `extra_bundles` as given (a standalone engine's)."""
        self.cfg = cfg
        self.num_bundles = num_bundles
        self.gpus_per_bundle = gpus_per_bundle
        self.extra_bundles = list(extra_bundles or [])
        self.started_ray = False  # a local instance for this run: stopped on close
        self.connected = False  # joined a cluster: disconnected on close
        self.group = None
        self.actors: list[Any] = []

    def __enter__(self) -> "RayCluster":
        import ray
        from ray.util.placement_group import placement_group

        try:
            if self.cfg.address is None:
                num_cpus = self.cfg.num_cpus or float(os.cpu_count() or 1)
                # "local": a new instance even where another Ray runs on this host (ray.init alone would join it).
                # Ray takes whole CPUs here; the bundles below take fractions of them.
                ray.init(
                    address="local",
                    num_cpus=max(1, round(num_cpus)),
                    include_dashboard=False,
                    object_store_memory=self.cfg.object_store_mb << 20,
                    configure_logging=False,
                )
                self.started_ray = True
                cpus = self.cfg.cpus_per_worker or num_cpus / (
                    self.num_bundles + len(self.extra_bundles)
                )
            else:
                if (
                    not ray.is_initialized()
                ):  # a driver already connected (a notebook, a test session) stays so
                    ray.init(address=self.cfg.address, configure_logging=False)
                    self.connected = True
                cpus = self.cfg.cpus_per_worker or 1.0
            bundle = {
                "CPU": cpus,
                **({"GPU": self.gpus_per_bundle} if self.gpus_per_bundle else {}),
            }
            bundles = [dict(bundle) for _ in range(self.num_bundles)] + [
                {
                    "CPU": extra.get("CPU", cpus),
                    **({"GPU": extra["GPU"]} if extra.get("GPU") else {}),
                }
                for extra in self.extra_bundles
            ]
            self.group = placement_group(bundles, strategy=self.cfg.placement_strategy.value)
            if not self.group.wait(timeout_seconds=self.cfg.timeout_s):
                raise TimeoutError(
                    f"Ray could not place the bundles {bundles} ({self.cfg.placement_strategy.value}) "
                    f"within ray.timeout_s={self.cfg.timeout_s} s; free: {ray.available_resources()}"
                )
        except BaseException:
            self.close()
            raise
        return self

    def remote(self, cls: type, bundle: int, **options: Any) -> Any:
        """`cls` as a Ray actor class pinned to `bundle` of this run's placement group."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        spec = self.group.bundle_specs[bundle]
        strategy = PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=bundle)
        resources = {
            "num_cpus": spec["CPU"],
            "num_gpus": spec.get("GPU", 0),
            **options,
        }  # options may share a bundle
        return _TrackedActorClass(
            self, ray.remote(cls).options(scheduling_strategy=strategy, max_restarts=0, **resources)
        )

    def kill(self, actor: Any) -> None:
        """Kill one of this run's actors now (close() kills the rest)."""
        import ray

        if actor in self.actors:
            self.actors.remove(actor)
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already dead is fine
            pass

    def get(
        self,
        refs: list[Any],
        what: str,
        timeout_s: Optional[float] = None,
        role: str = "a trainer rank",
    ) -> list[Any]:
        """`ray.get(refs)` bounded by `ray.timeout_s`, failing at the FIRST rank that fails (the others may be
        blocked in a collective with it): a dead actor or a timeout raises RuntimeError naming `what`."""
        import time

        import ray

        timeout_s = timeout_s or self.cfg.timeout_s
        deadline = time.monotonic() + timeout_s
        pending = list(refs)
        try:
            while pending:
                ready, pending = ray.wait(
                    pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic())
                )
                if not ready:
                    raise RuntimeError(f"{what}: no answer within {timeout_s} s (ray.timeout_s)")
                ray.get(ready[0])  # raises that rank's error now
            return ray.get(list(refs))
        except ray.exceptions.RayActorError as exc:
            raise RuntimeError(
                f"{what}: {role} died ({exc.__class__.__name__}: {_first_line(exc)})"
            ) from exc
        except ray.exceptions.RayTaskError as exc:
            raise RuntimeError(f"{what} failed on {role}: {_first_line(exc)}") from exc

    def close(self) -> None:
        """Idempotent: kills this run's actors, removes its placement group, stops the Ray it started."""
        import ray

        if not ray.is_initialized():
            return
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already dead is fine
                pass
        self.actors.clear()
        if self.group is not None:
            from ray.util.placement_group import remove_placement_group

            try:
                remove_placement_group(self.group)
            except Exception:  # noqa: BLE001 - the cluster may be gone already
                pass
            self.group = None
        if self.started_ray or self.connected:
            ray.shutdown()  # a local instance's processes stop here; a joined cluster is only disconnected
        self.started_ray = self.connected = False

    def __exit__(self, *exc: object) -> None:
        self.close()


class _TrackedActorClass:
    """`ray.remote(cls).options(...)` whose actors the cluster kills on close."""

    def __init__(self, cluster: RayCluster, actor_class: Any) -> None:
        self._cluster = cluster
        self._actor_class = actor_class

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        actor = self._actor_class.remote(*args, **kwargs)
        self._cluster.actors.append(actor)
        return actor


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__
