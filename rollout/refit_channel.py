"""The trainer's end of a refit, shared by the sync and async engines and by an EngineGroup: one
WeightSender, and each engine's `refit_receive` (a blocking RPC reaching all of its workers, however the
engine issues it) run beside send() in a thread per engine.

Fan-out: every worker of every engine is one receiver of the same sender, so each bucket is packed once.
Worker w of engine k is receiver `k * tensor_parallel_size + w`. Every worker's reply is checked: a refit
succeeds only if each receiver loaded the whole version.

A refit is `begin` (start every engine's receive) + a send + `finish` (join, check every reply). `refit` runs
all three with the channel's own sender; a sender in another process (a sharded trainer's rank) takes the
RefitEndpoint that `begin` hands out and reports back through `finish`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch

from rollout.transfer import TransferConfig, TransferStats
from rollout.worker.rpc import ReceiveReply, ReceiveRequest

logger = logging.getLogger(__name__)

# receive(args) -> every worker's answer (collective_rpc's list of ReceiveReply dicts): args are
# RefitWorkerExtension.refit_receive's, (ReceiveRequest.to_dict(),), plain data for collective_rpc
Receive = Callable[[tuple], list[dict[str, Any]]]


@dataclass(frozen=True)
class RefitEndpoint:
    """Where a sender in another process binds and how it sends: what `begin` hands out.

    Example:
        endpoint = ro.begin_refit(version=3)                 # the engine's process
        sender = endpoint.sender()                           # any process on the engine's node, kept across refits
        stats = sender.send(model.named_parameters(), version=3)
        ro.finish_refit(stats)                               # back in the engine's process
    """

    address: str
    transfer: TransferConfig
    device: str  # where the sender's buffers live (the engine's device type)
    num_receivers: int = 1  # every worker of every engine

    def sender(self, device: str | None = None) -> Any:
        from rollout.transfer import WeightSender
        from rollout.transfer.channel import ipc_path

        # A previous sender on this endpoint removed its private directory on close: make it again (0700).
        os.makedirs(os.path.dirname(ipc_path(self.address)), mode=0o700, exist_ok=True)
        return WeightSender(self.transfer, self.address, device=device or self.device, num_receivers=self.num_receivers)


@dataclass
class _PendingRefit:
    version: int
    results: list[dict[str, Any]]
    threads: list[threading.Thread] = field(default_factory=list)


class RefitError(RuntimeError):
    """A refit failed; the engine refuses to generate until a complete refit succeeds."""


@dataclass(frozen=True)
class WorkerReply:
    """What one worker reported for a refit (its receiver rank names it)."""

    engine: int
    receiver: int
    load_s: float
    detached_bytes: int
    load_path: str  # how it loaded: "direct" (weight loaders) or "layerwise" (rollout/load_path.py)
    load_plan: str = ""  # direct path: "recorded", "replayed" or "off: <why>" (rollout/load_path.py LoadPlan)


class RefitChannel:
    """The sending half of every refit of `num_engines` engines of `tensor_parallel_size` workers each; the
    workers' receivers follow its endpoint.

    Example:
        channel = RefitChannel("cpu", cfg.endpoint_dir, cfg.timeouts, tensor_parallel_size=2)
        rpc = lambda args: llm.collective_rpc("refit_receive", args=args)     # both workers answer
        send_stats, replies = channel.refit(transfer_cfg, model.named_parameters(), version=1, receives=[rpc])
        channel.close()   # after the workers' refit_close
    """

    def __init__(self, device_type: str, endpoint_dir: str | None, timeouts: Any, tensor_parallel_size: int = 1,
                 num_engines: int = 1) -> None:
        self.device_type = device_type
        self.endpoint_dir = endpoint_dir
        self.timeouts = timeouts  # rollout.config.RefitTimeouts
        self.tensor_parallel_size = tensor_parallel_size
        self.num_engines = num_engines
        self.endpoint: str | None = None  # created with the sender, on the first refit
        self._sender = None
        self.remote: RefitEndpoint | None = None  # begin()'s endpoint, for a sender in another process
        self._pending: _PendingRefit | None = None

    @property
    def num_receivers(self) -> int:
        return self.num_engines * self.tensor_parallel_size

    @property
    def connected(self) -> bool:
        """A sender exists (here or in another process), so the workers may hold receivers that refit_close
        must release."""
        return self._sender is not None or self.remote is not None

    def refit(self, cfg: TransferConfig, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int,
              receives: Sequence[Receive], load_path: Any = "auto") -> tuple[TransferStats, list[WorkerReply]]:
        """Send `named_tensors` once as `version` through `cfg` while `receives[k]` runs engine k's workers'
        end in a thread, loading through `load_path` (rollout.load_path.LoadPath); raises RefitError naming the
        engine and receiver that failed (a worker's error first: it is the root cause), or the engine that did
        not answer within timeouts.worker_reply_s."""
        sender = self._open(cfg)
        self._start(cfg, self.endpoint, version, receives, load_path)
        try:
            send_stats = sender.send(named_tensors, version)
        except BaseException as exc:  # noqa: BLE001 - a worker's error, if any, is the root cause
            return self.finish(error=exc)
        return self.finish(send_stats)

    def begin(self, cfg: TransferConfig, version: int, receives: Sequence[Receive], load_path: Any = "auto") -> RefitEndpoint:
        """The receiving half alone, for a sender in another process: starts every engine's receive and
        returns where that sender binds; then `finish` with its stats or its error. A remote sender gets an
        endpoint of its own (refit()'s sender stays bound to its one)."""
        if self.remote is None or self.remote.transfer != cfg:
            self.remote = RefitEndpoint(new_endpoint_in(self.endpoint_dir), cfg, self.device_type, self.num_receivers)
        self._start(cfg, self.remote.address, version, receives, load_path)
        return self.remote

    def _start(self, cfg: TransferConfig, endpoint: str, version: int, receives: Sequence[Receive], load_path: Any) -> None:
        if len(receives) != self.num_engines:
            raise ValueError(f"{len(receives)} receive functions for {self.num_engines} engines")
        if self._pending is not None:
            raise RuntimeError(f"a refit to version {version} while the one to {self._pending.version} is unfinished")
        timeouts = self.timeouts
        pending = _PendingRefit(version, [{} for _ in receives])

        def run_receive(k: int) -> None:
            try:
                request = ReceiveRequest(endpoint, cfg, version, timeouts.next_bucket_s, timeouts.receiver_exit_s, load_path,
                                         rank_offset=k * self.tensor_parallel_size)
                pending.results[k]["replies"] = receives[k]((request.to_dict(),))
            except BaseException as exc:  # noqa: BLE001 - re-raised by finish, in the caller's thread
                pending.results[k]["rpc_error"] = exc

        pending.threads = [threading.Thread(target=run_receive, args=(k,), name=f"refit-rpc-{k}", daemon=True)
                           for k in range(len(receives))]
        for t in pending.threads:
            t.start()
        self._pending = pending

    def finish(self, send_stats: TransferStats | None = None,
               error: BaseException | None = None) -> tuple[TransferStats, list[WorkerReply]]:
        """Wait for every worker's answer to the refit under way, given the sender's stats or the error that
        stopped it; raises RefitError (a worker's error first: it is the root cause)."""
        pending, self._pending = self._pending, None
        if pending is None:
            raise RuntimeError("finish() without a refit under way")
        version, send_error = pending.version, error
        self._join(pending.threads, version, send_error)
        if send_error is not None and not isinstance(send_error, Exception):
            raise send_error  # KeyboardInterrupt/SystemExit stay what they are (the workers were told to abort)
        replies = [r for k, result in enumerate(pending.results) for r in self._check_engine(k, result, version, send_error)]
        if send_error is not None:
            raise RefitError(f"refit to version {version} failed while sending: {send_error}") from send_error
        return send_stats, replies

    def _open(self, cfg: TransferConfig):
        from rollout.transfer import WeightSender

        if self._sender is not None and self._sender.cfg != cfg:
            self._close_sender()  # the transfer settings changed: a new connection (the workers follow)
        if self._sender is None:
            self.endpoint = new_endpoint_in(self.endpoint_dir)
            self._sender = WeightSender(cfg, self.endpoint, device=self.device_type, num_receivers=self.num_receivers)
        return self._sender

    def _join(self, threads: list[threading.Thread], version: int, send_error: BaseException | None) -> None:
        reply_s = self.timeouts.worker_reply_s
        deadline = time.monotonic() + reply_s
        for k, t in enumerate(threads):
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                raise RefitError(f"refit to version {version}: engine {k}'s vLLM workers did not answer within "
                                 f"rollout.timeouts.worker_reply_s={reply_s}") from send_error

    def _check_engine(self, k: int, result: dict[str, Any], version: int, send_error: BaseException | None) -> list[WorkerReply]:
        if "rpc_error" in result:  # the engine died (a worker was killed?); the sender's error names the receiver
            exc = result["rpc_error"]
            sender_saw = f"; the sender: {send_error}" if send_error is not None else ""
            raise RefitError(f"refit to version {version}: engine {k}'s collective_rpc failed: {exc}{sender_saw}") from exc
        replies, tp = [ReceiveReply.from_dict(r) for r in result["replies"]], self.tensor_parallel_size
        if len(replies) != tp:
            raise RefitError(f"refit to version {version}: engine {k} answered for {len(replies)} workers, expected {tp}")
        for reply in replies:
            if not reply.ok:
                where = f"engine {k}, receiver {reply.receiver}"
                logger.warning("refit to version %d failed in the vLLM worker (%s):\n%s", version, where, reply.traceback)
                raise RefitError(f"refit to version {version} failed in the vLLM worker ({where}): {reply.error}") from send_error
        ranks, expected = sorted(r.receiver for r in replies), list(range(k * tp, (k + 1) * tp))
        if ranks != expected:
            raise RefitError(f"refit to version {version}: engine {k}'s workers answered as receivers {ranks}, expected {expected}")
        return [WorkerReply(k, r.receiver, r.load_s, r.detached_bytes, r.load_path, r.load_plan)
                for r in sorted(replies, key=lambda r: r.receiver)]

    def _close_sender(self) -> None:
        if self._sender is not None:
            self._sender.close()
            self._sender = None

    def close(self) -> None:
        """Frees the sender's buffers and sockets; call after the workers' refit_close."""
        self._close_sender()
        self.remote = None


def new_endpoint_in(directory: str | None) -> str:
    """The transfer's endpoint in a private subdirectory of `directory` (a run directory), or of the system's
    temp dir when there is none or when its path is too long for a unix socket (~107 bytes)."""
    from rollout.transfer import new_endpoint

    if directory is not None:
        os.makedirs(directory, exist_ok=True)
        try:
            return new_endpoint(directory)
        except ValueError as exc:  # the socket path would be too long
            logger.warning("rollout.endpoint_dir=%r: %s; the endpoint goes to a private temp dir instead", directory, exc)
    return new_endpoint()

