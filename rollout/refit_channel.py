"""The trainer's end of a refit, shared by the sync and async engines: one WeightSender, and the
vLLM worker's `refit_receive` (a blocking RPC, however the engine issues it) run beside send()."""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from rollout.transfer import TransferConfig, TransferStats

logger = logging.getLogger(__name__)

# receive(args) -> the worker's answer: args are RefitWorkerExtension.refit_receive's (endpoint, transfer
# fields, version, timeouts, load path), plain data for collective_rpc
Receive = Callable[[tuple], dict[str, Any]]


@dataclass(frozen=True)
class RefitEndpoint:
    """Where a sender in another process binds and how it sends: what `begin_refit` hands out.

    Example:
        endpoint = ro.begin_refit(version=3)                 # the engine's process
        sender = endpoint.sender()                           # any process on the engine's node, kept across refits
        stats = sender.send(model.named_parameters(), version=3)
        ro.finish_refit(stats)                               # back in the engine's process
    """

    address: str
    transfer: TransferConfig
    device: str  # where the sender's buffers live (the engine's device type)

    def sender(self, device: str | None = None) -> Any:
        from rollout.transfer import WeightSender
        from rollout.transfer.channel import ipc_path

        # A previous sender on this endpoint removed its private directory on close: make it again (0700).
        os.makedirs(os.path.dirname(ipc_path(self.address)), mode=0o700, exist_ok=True)
        return WeightSender(self.transfer, self.address, device=device or self.device)


@dataclass
class _PendingReceive:
    version: int
    result: dict[str, Any] = field(default_factory=dict)
    thread: threading.Thread | None = None


class RefitError(RuntimeError):
    """A refit failed; the engine refuses to generate until a complete refit succeeds."""


class RefitChannel:
    """The sending half of every refit of one engine; the worker's receiver follows its endpoint.

    Example:
        channel = RefitChannel("cpu", cfg.endpoint_dir, cfg.timeouts)
        rpc = lambda args: llm.collective_rpc("refit_receive", args=args)[0]
        send_stats, worker = channel.refit(transfer_cfg, model.named_parameters(), version=1, receive=rpc)
        channel.close()   # after the worker's refit_close
    """

    def __init__(self, device_type: str, endpoint_dir: str | None, timeouts: Any) -> None:
        self.device_type = device_type
        self.endpoint_dir = endpoint_dir
        self.timeouts = timeouts  # rollout.config.RefitTimeouts
        self.endpoint: str | None = None  # created with the sender, on the first refit
        self._sender = None
        self.remote: RefitEndpoint | None = None  # begin()'s endpoint, for a sender in another process
        self._pending: _PendingReceive | None = None

    @property
    def connected(self) -> bool:
        """A sender exists (here or in another process), so the worker may hold a receiver that refit_close
        must release."""
        return self._sender is not None or self.remote is not None

    def refit(self, cfg: TransferConfig, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int,
              receive: Receive, load_path: Any = "auto") -> tuple[TransferStats, dict[str, Any]]:
        """Send `named_tensors` as `version` through `cfg` while `receive` runs the worker's end in a
        thread, which loads them through `load_path` (rollout.load_path.LoadPath); raises RefitError naming
        what failed (the worker's error first: it is the root cause)."""
        from rollout.transfer import WeightSender

        if self._sender is not None and self._sender.cfg != cfg:
            self._close_sender()  # the transfer settings changed: a new connection (the worker follows)
        if self._sender is None:
            self.endpoint = new_endpoint_in(self.endpoint_dir)
            self._sender = WeightSender(cfg, self.endpoint, device=self.device_type)
        self._start_receive(cfg, self.endpoint, version, receive, load_path)
        try:
            send_stats = self._sender.send(named_tensors, version)
        except BaseException as exc:  # noqa: BLE001 - the worker's error, if any, is the root cause
            return self.finish(error=exc)
        return self.finish(send_stats)

    def begin(self, cfg: TransferConfig, version: int, receive: Receive, load_path: Any = "auto") -> RefitEndpoint:
        """The receiving half alone, for a sender in another process (a sharded trainer's rank): starts
        `receive` and returns where that sender binds; then `finish` with its stats or its error. Remote
        senders get an endpoint of their own (refit()'s sender stays bound to its one)."""
        if self.remote is None or self.remote.transfer != cfg:
            self.remote = RefitEndpoint(new_endpoint_in(self.endpoint_dir), cfg, self.device_type)
        self._start_receive(cfg, self.remote.address, version, receive, load_path)
        return self.remote

    def _start_receive(self, cfg: TransferConfig, endpoint: str, version: int, receive: Receive, load_path: Any) -> None:
        if self._pending is not None:
            raise RuntimeError(f"a refit to version {version} while the one to {self._pending.version} is unfinished")
        fields = {f.name: _plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
        args = (endpoint, fields, version, dataclasses.asdict(self.timeouts), _plain(load_path))
        pending = _PendingReceive(version)

        def run_receive() -> None:
            try:
                pending.result["worker"] = receive(args)
            except BaseException as exc:  # noqa: BLE001 - re-raised by finish
                pending.result["rpc_error"] = exc

        pending.thread = threading.Thread(target=run_receive, name="refit-rpc", daemon=True)
        pending.thread.start()
        self._pending = pending

    def finish(self, send_stats: TransferStats | None = None,
               error: BaseException | None = None) -> tuple[TransferStats, dict[str, Any]]:
        """Wait for the worker's answer to the refit under way, given the sender's stats or the error that
        stopped it; raises RefitError (the worker's error first: it is the root cause)."""
        pending, self._pending = self._pending, None
        if pending is None:
            raise RuntimeError("finish() without a refit under way")
        version, send_error = pending.version, error
        reply_s = self.timeouts.worker_reply_s
        pending.thread.join(reply_s)
        if pending.thread.is_alive():
            raise RefitError(f"refit to version {version}: the vLLM worker did not answer within "
                             f"rollout.timeouts.worker_reply_s={reply_s}") from send_error
        if send_error is not None and not isinstance(send_error, Exception):
            raise send_error  # KeyboardInterrupt/SystemExit stay what they are (the worker was told to abort)
        result = pending.result
        worker = result.get("worker")
        if "rpc_error" in result:
            raise RefitError(f"refit to version {version}: collective_rpc failed: {result['rpc_error']}") from result["rpc_error"]
        if not worker.get("ok"):
            logger.warning("refit to version %d failed in the vLLM worker:\n%s", version, worker["traceback"])
            raise RefitError(f"refit to version {version} failed in the vLLM worker: {worker['error']}") from send_error
        if send_error is not None:
            raise RefitError(f"refit to version {version} failed while sending: {send_error}") from send_error
        return send_stats, worker

    def _close_sender(self) -> None:
        if self._sender is not None:
            self._sender.close()
            self._sender = None

    def close(self) -> None:
        """Frees the sender's buffers and socket; call after the worker's refit_close."""
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


def _plain(value: Any) -> Any:
    return value.value if hasattr(value, "value") else value
