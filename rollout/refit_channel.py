"""The trainer's end of a refit, shared by the sync and async engines: one WeightSender, and the
vLLM worker's `refit_receive` (a blocking RPC, however the engine issues it) run beside send()."""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from typing import Any, Callable, Iterable

import torch

from rollout.transfer import TransferConfig, TransferStats

logger = logging.getLogger(__name__)

# receive(args) -> the worker's answer: args are RefitWorkerExtension.refit_receive's (endpoint, transfer
# fields, version, timeouts, load path), plain data for collective_rpc
Receive = Callable[[tuple], dict[str, Any]]


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

    @property
    def connected(self) -> bool:
        """A sender exists, so the worker may hold a receiver that refit_close must release."""
        return self._sender is not None

    def refit(self, cfg: TransferConfig, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int,
              receive: Receive, load_path: Any = "auto") -> tuple[TransferStats, dict[str, Any]]:
        """Send `named_tensors` as `version` through `cfg` while `receive` runs the worker's end in a
        thread, which loads them through `load_path` (rollout.load_path.LoadPath); raises RefitError naming
        what failed (the worker's error first: it is the root cause)."""
        from rollout.transfer import WeightSender

        if self._sender is not None and self._sender.cfg != cfg:
            self.close()  # the transfer settings changed: a new connection (the worker follows)
        if self._sender is None:
            self.endpoint = new_endpoint_in(self.endpoint_dir)
            self._sender = WeightSender(cfg, self.endpoint, device=self.device_type)
        fields = {f.name: _plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
        args = (self.endpoint, fields, version, dataclasses.asdict(self.timeouts), _plain(load_path))
        result: dict[str, Any] = {}

        def run_receive() -> None:
            try:
                result["worker"] = receive(args)
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                result["rpc_error"] = exc

        thread = threading.Thread(target=run_receive, name="refit-rpc", daemon=True)
        thread.start()
        send_error: BaseException | None = None
        try:
            send_stats = self._sender.send(named_tensors, version)
        except BaseException as exc:  # noqa: BLE001 - the worker's error, if any, is the root cause
            send_error = exc
        reply_s = self.timeouts.worker_reply_s
        thread.join(reply_s)
        if thread.is_alive():
            raise RefitError(f"refit to version {version}: the vLLM worker did not answer within "
                             f"rollout.timeouts.worker_reply_s={reply_s}") from send_error
        if send_error is not None and not isinstance(send_error, Exception):
            raise send_error  # KeyboardInterrupt/SystemExit stay what they are (the worker was told to abort)
        worker = result.get("worker")
        if "rpc_error" in result:
            raise RefitError(f"refit to version {version}: collective_rpc failed: {result['rpc_error']}") from result["rpc_error"]
        if not worker.get("ok"):
            logger.warning("refit to version %d failed in the vLLM worker:\n%s", version, worker["traceback"])
            raise RefitError(f"refit to version {version} failed in the vLLM worker: {worker['error']}") from send_error
        if send_error is not None:
            raise RefitError(f"refit to version {version} failed while sending: {send_error}") from send_error
        return send_stats, worker

    def close(self) -> None:
        """Frees the sender's buffers and socket; call after the worker's refit_close."""
        if self._sender is not None:
            self._sender.close()
            self._sender = None


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
