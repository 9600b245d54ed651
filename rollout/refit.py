"""The refit component every engine is composed from: one refit of one or several engines' workers.

A `Refitter` holds what a refit needs on the trainer's side of an engine: the endpoint, this process's
sender (kept across refits), the engines' guard against half-updated weights (`EngineState`) and the
stats. An engine gives it `RefitTarget`s (itself, or a group's engines) and forwards `refit` to it.

Fan-out: every worker of every target is one receiver of the same sender, so each bucket is packed once.
Worker w of target k is receiver `k * tensor_parallel_size + w`. Every worker's reply is checked: a
refit succeeds only if each receiver loaded the whole version; then every target moves to it together.

A refit is begin (each target readies its workers, then their receive starts beside the send in a
thread per target) + the sending half + finish (join, check every reply, each target's caches).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol, Sequence

import torch

from rollout.api import RefitEndpoint, RefitError, RefitStats, Send, send_tensors
from rollout.transfer import TransferConfig, TransferStats
from rollout.worker.rpc import AdapterSpec, ReceiveReply, ReceiveRequest

logger = logging.getLogger(__name__)


@dataclass
class EngineState:
    """What an engine may do now: the refusals of generate(), and the version it holds."""

    dummy_weights: bool  # load_format=dummy: random weights until the first refit
    version: int = 0  # the weights loaded from the model path
    failed_version: int | None = None  # a refit to this version failed midway: half-updated weights
    asleep: bool = False
    weights_discarded: bool = False  # a level-2 sleep dropped them: a refit must come first
    closed: bool = False
    receivers_open: bool = False  # a refit reached the workers: close() must close their receivers
    adapter_id: int | None = None  # LoRA refits: the LoRA id of the newest adapter (None: the base)

    def check_can_generate(self) -> None:
        if self.closed:
            raise RuntimeError("generate() on a closed rollout")
        if self.failed_version is not None:
            raise RefitError(
                f"refit to version {self.failed_version} failed midway: the engine holds half-updated "
                "weights and refuses to generate until a complete refit (update_weights) succeeds"
            )
        if self.dummy_weights:
            raise RuntimeError(
                "the engine started with load_format='dummy' (random weights): call "
                "update_weights() (or refit()) before generate()"
            )
        if self.weights_discarded:
            raise RuntimeError(
                "the engine slept at level 2, which discarded its weights: call "
                "update_weights() (or refit()) before generate()"
            )
        if self.asleep:
            raise RuntimeError(
                "the engine is asleep: call wake_up() or update_weights() before generate()"
            )

    def check_can_refit(self) -> None:
        if self.closed:
            raise RuntimeError("refit of a closed rollout")


class RefitTarget(Protocol):
    """One engine's part in a refit; the Refitter drives it."""

    state: EngineState

    def refit_prepare(self) -> bool:
        """Before the transfer (weights awake, generation paused); returns whether the engine slept."""

    def refit_rpc(self, request: ReceiveRequest) -> list[dict[str, Any]]:
        """Every worker's receive of one refit (a blocking RPC of `request.to_dict()`); returns
        their replies (ReceiveReply dicts)."""

    def refit_finish(self, version: int, was_asleep: bool) -> tuple[Any, ...]:
        """After every worker loaded `version`: KV cache back, caches reset, generation resumed; returns the
        caches reset (rollout.cache_reset.Cache)."""


@dataclass(frozen=True)
class WorkerReply:
    """What one worker reported for a refit (its receiver rank names it)."""

    engine: int
    receiver: int
    load_s: float
    detached_bytes: int
    load_path: str  # how it loaded: "direct" (weight loaders) or "layerwise" (rollout/load_path.py)
    load_plan: str = ""  # direct path: "recorded", "replayed" or "off: <why>"


@dataclass
class _Pending:
    version: int
    start: float
    slept: list[bool]
    endpoint: RefitEndpoint | None = None  # set once the workers' receive started
    results: list[dict[str, Any]] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)


class Refitter:
    """The refits of `targets` (engines of `tensor_parallel_size` workers each) through `transfer`.

    Example:
        refitter = Refitter([engine], "cpu", cfg.endpoint_dir, cfg.timeouts, transfer, cfg.load_path)
        stats = refitter.refit(1, send_tensors(model.named_parameters()))   # this process sends
        endpoint = refitter.begin(2)       # or: a sender elsewhere binds at `endpoint` and sends ...
        stats = refitter.finish(send_stats)   # ... and its stats (or its error) come back here
        refitter.close()                    # after the workers closed their receivers
    """

    def __init__(
        self,
        targets: Sequence[RefitTarget],
        device_type: str,
        endpoint_dir: str | None,
        timeouts: Any,
        transfer: TransferConfig,
        load_path: Any,
        tensor_parallel_size: int = 1,
        node_id: str | None = None,
        adapter: Any = None,
    ) -> None:
        """`adapter`: a rollout.config.AdapterConfig: every refit is one version of that LoRA adapter."""
        self.targets = list(targets)
        self.adapter = adapter
        self.device_type, self.endpoint_dir, self.timeouts = device_type, endpoint_dir, timeouts
        self.transfer = (
            transfer  # may change between refits: a new endpoint then, the workers follow
        )
        self.load_path = load_path
        self.tensor_parallel_size, self.node_id = tensor_parallel_size, node_id
        self._local: RefitEndpoint | None = None  # this process's sender's endpoint
        self._sender: Any = None
        self._remote: RefitEndpoint | None = None  # for a sender in another process
        self._pending: _Pending | None = None

    @property
    def num_receivers(self) -> int:
        return len(self.targets) * self.tensor_parallel_size

    @property
    def endpoint(self) -> str | None:
        """This process's sender's address, once a refit made it."""
        return None if self._local is None else self._local.address

    # -- the verb -------------------------------------------------------------------------------
    def refit(self, version: int, send: Send) -> RefitStats:
        """One refit: `send` moves the weights through a port (asking it for an endpoint or for this
        process's sender starts the workers' receive). Raises RefitError on any failure, and every target
        then refuses to generate until a refit succeeds."""
        self._prepare(version)
        port = _Port(self)
        try:
            send_stats = send(port, version)
            if self._pending.endpoint is None:
                raise RefitError(
                    f"refit to version {version}: the sending half sent nothing (it asked its "
                    "port for neither an endpoint nor a sender)"
                )
        except BaseException as exc:  # noqa: BLE001 - a worker's error, if any, is the root cause
            return self.finish(error=exc)
        return self.finish(send_stats)

    def update_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int
    ) -> RefitStats:
        return self.refit(version, send_tensors(named_tensors))

    def begin(self, version: int) -> RefitEndpoint:
        """A refit whose sender lives in another process on this node (a sharded trainer's rank, the driver
        of an engine actor): readies the workers and returns where that sender binds; then `finish`."""
        self._prepare(version)
        return _Port(self).endpoint()

    def finish(
        self, send_stats: TransferStats | None = None, error: BaseException | None = None
    ) -> RefitStats:
        """The end of the refit under way, given the sender's stats or the error that stopped it."""
        pending, self._pending = self._pending, None
        if pending is None:
            raise RuntimeError("finish() without a refit under way")
        try:
            replies = self._join(pending, error)
        except BaseException:
            for target in self.targets:
                target.state.failed_version = pending.version
            raise
        for target in self.targets:
            state = target.state
            state.failed_version, state.weights_discarded, state.dummy_weights = None, False, False
            state.version = pending.version
            state.adapter_id = None if self.adapter is None else adapter_id(pending.version)
        caches = [
            t.refit_finish(pending.version, slept) for t, slept in zip(self.targets, pending.slept)
        ]
        return refit_stats(
            pending.version, time.perf_counter() - pending.start, send_stats, replies, caches[0]
        )

    # -- the steps --------------------------------------------------------------------------------
    def _prepare(self, version: int) -> None:
        if self._pending is not None:
            raise RuntimeError(
                f"a refit to version {version} while the one to {self._pending.version} is "
                "unfinished"
            )
        for target in self.targets:
            target.state.check_can_refit()
        start = time.perf_counter()
        slept = []
        try:
            for target in self.targets:
                slept.append(target.refit_prepare())
                target.state.receivers_open = True
        except BaseException:
            for target in self.targets:
                target.state.failed_version = version
            raise
        self._pending = _Pending(version, start, slept)

    def _start(self, endpoint: RefitEndpoint) -> None:
        """Every target's workers start receiving from `endpoint`, one thread per target."""
        pending = self._pending
        if pending is None or pending.endpoint is not None:
            raise RuntimeError("the port of a refit starts its workers once, during the refit")
        waits, tp, a = self.timeouts, self.tensor_parallel_size, self.adapter
        adapter = None
        if a is not None:
            lora_id = adapter_id(pending.version)
            modules = tuple(a.target_modules)
            adapter = AdapterSpec(lora_id, a.rank, a.alpha, modules, a.max_versions)
        requests = [
            ReceiveRequest(
                endpoint.address,
                endpoint.transfer,
                pending.version,
                waits.next_bucket_s,
                waits.receiver_exit_s,
                self.load_path,
                rank_offset=k * tp,
                adapter=adapter,
            )
            for k in range(len(self.targets))
        ]
        pending.endpoint, pending.results = endpoint, [{} for _ in self.targets]

        def run_receive(k: int) -> None:
            try:
                pending.results[k]["replies"] = self.targets[k].refit_rpc(requests[k])
            except BaseException as exc:  # noqa: BLE001 - re-raised by finish, in the caller's thread
                pending.results[k]["rpc_error"] = exc

        pending.threads = [
            threading.Thread(target=run_receive, args=(k,), name=f"refit-rpc-{k}", daemon=True)
            for k in range(len(self.targets))
        ]
        for t in pending.threads:
            t.start()

    def _local_sender(self) -> Any:
        if self._sender is not None and self._local.transfer != self.transfer:
            self._sender.close()  # the transfer settings changed: a new connection (the workers follow)
            self._sender = None
        if self._sender is None:
            self._local = self._endpoint_like(self._local)
            self._sender = self._local.sender()
        return self._sender

    def _remote_endpoint(self) -> RefitEndpoint:
        # A sender elsewhere gets an endpoint of its own: this process's sender stays bound to its one.
        self._remote = self._endpoint_like(self._remote)
        return self._remote

    def _endpoint_like(self, endpoint: RefitEndpoint | None) -> RefitEndpoint:
        if endpoint is not None and endpoint.transfer == self.transfer:
            return endpoint
        return RefitEndpoint(
            new_endpoint_in(self.endpoint_dir),
            self.transfer,
            self.device_type,
            self.num_receivers,
            self.node_id,
        )

    def _join(self, pending: _Pending, send_error: BaseException | None) -> list[WorkerReply]:
        version = pending.version
        reply_s = self.timeouts.worker_reply_s
        deadline = time.monotonic() + reply_s
        for k, t in enumerate(pending.threads):
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                raise RefitError(
                    f"refit to version {version}: engine {k}'s vLLM workers did not answer within "
                    f"rollout.timeouts.worker_reply_s={reply_s}"
                ) from send_error
        if send_error is not None and not isinstance(send_error, Exception):
            raise send_error  # KeyboardInterrupt/SystemExit stay what they are (the workers were told to abort)
        replies = [
            r
            for k, result in enumerate(pending.results)
            for r in self._check_engine(k, result, version, send_error)
        ]
        if send_error is not None:
            if isinstance(send_error, RefitError):
                raise send_error
            raise RefitError(
                f"refit to version {version} failed while sending: {send_error}"
            ) from send_error
        return replies

    def _check_engine(
        self, k: int, result: dict[str, Any], version: int, send_error: BaseException | None
    ) -> list[WorkerReply]:
        if (
            "rpc_error" in result
        ):  # the engine died (a worker was killed?); the sender's error names the receiver
            exc = result["rpc_error"]
            sender_saw = f"; the sender: {send_error}" if send_error is not None else ""
            raise RefitError(
                f"refit to version {version}: engine {k}'s collective_rpc failed: {exc}{sender_saw}"
            ) from exc
        try:
            replies = [ReceiveReply.from_dict(r) for r in result["replies"]]
        except (TypeError, ValueError) as exc:
            raise RefitError(f"refit to version {version}: engine {k}'s reply: {exc}") from exc
        tp = self.tensor_parallel_size
        if len(replies) != tp:
            raise RefitError(
                f"refit to version {version}: engine {k} answered for {len(replies)} workers, "
                f"expected {tp}"
            )
        for reply in replies:
            if not reply.ok:
                where = f"engine {k}, receiver {reply.receiver}"
                logger.warning(
                    "refit to version %d failed in the vLLM worker (%s):\n%s",
                    version,
                    where,
                    reply.traceback,
                )
                raise RefitError(
                    f"refit to version {version} failed in the vLLM worker ({where}): {reply.error}"
                ) from send_error
        ranks, expected = sorted(r.receiver for r in replies), list(range(k * tp, (k + 1) * tp))
        if ranks != expected:
            raise RefitError(
                f"refit to version {version}: engine {k}'s workers answered as receivers {ranks}, "
                f"expected {expected}"
            )
        return [
            WorkerReply(k, r.receiver, r.load_s, r.detached_bytes, r.load_path, r.load_plan)
            for r in sorted(replies, key=lambda r: r.receiver)
        ]

    def close(self) -> None:
        """Frees this process's sender (buffers, sockets); call after the workers closed their receivers."""
        if self._sender is not None:
            self._sender.close()
            self._sender = None
        self._remote = None


class _Port:
    """The port a Refitter hands the sending half of the refit under way."""

    def __init__(self, refitter: Refitter) -> None:
        self._refitter = refitter

    def endpoint(self) -> RefitEndpoint:
        endpoint = self._refitter._remote_endpoint()
        self._refitter._start(endpoint)
        return endpoint

    def sender(self) -> Any:
        sender = self._refitter._local_sender()
        self._refitter._start(self._refitter._local)
        return sender


def refit_stats(
    version: int,
    seconds: float,
    send_stats: Any,
    replies: Sequence[WorkerReply],
    caches: tuple[Any, ...],
) -> RefitStats:
    loads = tuple(r.load_s for r in replies)
    return RefitStats(
        version,
        seconds,
        send_stats.num_bytes,
        send_stats.num_tensors,
        send_stats.num_buckets,
        send_stats.seconds,
        max(loads),
        sum(r.detached_bytes for r in replies),
        tuple(c.value for c in caches),
        replies[0].load_path,
        loads,
        replies[0].load_plan,
    )


def adapter_id(version: int) -> int:
    """The LoRA id of adapter version `version` (vLLM's ids start at 1)."""
    return version + 1


def new_endpoint_in(directory: str | None) -> str:
    """The transfer's endpoint in a private subdirectory of `directory` (a run directory), or of the system's
    temp dir when there is none or when its path is too long for a unix socket (~107 bytes)."""
    from rollout.transfer import new_endpoint

    if directory is not None:
        os.makedirs(directory, exist_ok=True)
        try:
            return new_endpoint(directory)
        except ValueError as exc:  # the socket path would be too long
            logger.warning(
                "rollout.endpoint_dir=%r: %s; the endpoint goes to a private temp dir instead",
                directory,
                exc,
            )
    return new_endpoint()
