"""vLLM's weight-sync control plane as the `refit` trainer side drives it: every call timed.

The client is what the user hands to `WeightTransferTrainerFactory.trainer_init`: vLLM's
`HTTPVLLMWeightSyncClient` (a `vllm serve` with VLLM_SERVER_DEV_MODE=1), an offline `LLM` (its RL
methods take `{"init_info": ...}` / `{"update_info": ...}` requests, not the protocol's bare dicts),
or any object with the four methods of vLLM's `VLLMWeightSyncClient` protocol. Each call runs in a
thread the caller waits on for at most its timeout, so no wait of the trainer is unbounded even
where the client has no timeout of its own (an `LLM`'s collective_rpc).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

logger = logging.getLogger(__name__)


class Call:
    """One control-plane call running in its own thread; `wait` returns its result or raises."""

    def __init__(self, name: str, where: str, fn: Any, *args: Any) -> None:
        self.name, self.where = name, where
        self._outcome: dict[str, Any] = {}
        self._thread = threading.Thread(
            target=self._run, args=(fn, args), daemon=True, name=f"refit-{name}"
        )
        self._thread.start()

    def _run(self, fn: Any, args: tuple) -> None:
        try:
            self._outcome["result"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - raised by wait(), in the caller's thread
            self._outcome["error"] = exc

    def wait(self, timeout_s: float) -> Any:
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise TimeoutError(
                f"refit backend: {self.where}'s {self.name} did not answer within {timeout_s} s"
            )
        if "error" in self._outcome:
            exc = self._outcome["error"]
            raise RuntimeError(f"refit backend: {self.where}'s {self.name} failed: {exc}") from exc
        return self._outcome.get("result")


class ControlPlane:
    """The calls the trainer side makes, each bounded by `timeout_s` unless it says otherwise.

    Example:
        control = ControlPlane(HTTPVLLMWeightSyncClient("http://127.0.0.1:8000"), timeout_s=60.0)
        control.call("start_weight_update")
        update = control.start("update_weights", {"protocol": 1, "version": 3})
        ...send the weights...; update.wait(180.0); control.call("finish_weight_update", "3")
    """

    def __init__(self, client: Any, timeout_s: float) -> None:
        self.client = _adapt(client)
        self.timeout_s = timeout_s
        http = isinstance(self.client, _Http)
        self.where = f"the vLLM server at {client.base_url}" if http else type(client).__name__
        self._warned = False

    def start(self, name: str, *args: Any) -> Call:
        return Call(name, self.where, getattr(self.client, name), *args)

    def call(self, name: str, *args: Any) -> Any:
        return self.start(name, *args).wait(self.timeout_s)

    def reset_prefix_cache(self) -> None:
        """The engine's prefix cache, whose KV blocks the old weights computed (vLLM's weight
        update leaves it): through the client where it can, else one warning."""
        if isinstance(self.client, (_Offline, _Http)):
            self.call("reset_prefix_cache")
        elif not self._warned:
            self._warned = True
            logger.warning(
                "refit backend: %s has no prefix-cache reset; cached prompt blocks may "
                "keep the previous weights' KV",
                self.where,
            )

    def shutdown(self) -> None:
        """Tell the engine to drop its receiver (vLLM's shutdown_weight_transfer_engine)."""
        if isinstance(self.client, (_Offline, _Http)):
            self.call("shutdown_weight_transfer_engine")


class _Offline:
    """An offline `LLM` behind the protocol's four methods (plus a reset and a shutdown)."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self.llm.init_weight_transfer_engine({"init_info": init_info})

    def start_weight_update(self) -> None:
        self.llm.start_weight_update()

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self.llm.update_weights({"update_info": update_info})

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.llm.finish_weight_update(weight_version)

    def reset_prefix_cache(self) -> None:
        self.llm.reset_prefix_cache()

    def shutdown_weight_transfer_engine(self) -> None:
        self.llm.shutdown_weight_transfer_engine()


class _Http:
    """vLLM's HTTP client, plus the dev route that resets the prefix cache."""

    def __init__(self, client: Any) -> None:
        self.http = client

    def __getattr__(self, name: str) -> Any:
        return getattr(self.http, name)

    def reset_prefix_cache(self) -> None:
        import requests

        url = f"{self.http.base_url}/reset_prefix_cache"
        requests.post(url, timeout=self.http.timeout).raise_for_status()


def _adapt(client: Any) -> Any:
    from vllm.distributed.weight_transfer.clients import HTTPVLLMWeightSyncClient
    from vllm.entrypoints.rl.offline import RLOfflineMixin

    if isinstance(client, RLOfflineMixin):
        return _Offline(client)
    if isinstance(client, HTTPVLLMWeightSyncClient):
        return _Http(client)
    return client
