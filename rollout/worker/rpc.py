"""The typed, versioned worker RPC of a refit: one frozen dataclass each way, driver <-> worker.

`collective_rpc` carries plain data only (tensors arrive as lists; we never pickle), so each
message crosses it as a dict of plain values (`to_dict`) and is parsed back on the other side
(`from_dict`), which names any protocol mismatch, unknown or missing field. Bump PROTOCOL on any
change of the fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeVar

from rollout.load_path import LoadPath
from rollout.transfer.config import TransferConfig

PROTOCOL = 2  # 2: ReceiveRequest.adapter
M = TypeVar("M", bound="Message")


def _plain(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return value


@dataclass(frozen=True)
class Message:
    """A message of the worker RPC: subclasses list their fields; `protocol` leads every dict."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "protocol": PROTOCOL,
            **{f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)},
        }

    @classmethod
    def from_dict(cls: type[M], data: dict[str, Any]) -> M:
        if not isinstance(data, dict):
            raise TypeError(
                f"refit worker RPC: a {cls.__name__} must be a dict, got {type(data).__name__}"
            )
        protocol = data.get("protocol")
        if protocol != PROTOCOL:
            raise ValueError(
                f"refit worker RPC: a {cls.__name__} of protocol {protocol!r}, this side speaks "
                f"{PROTOCOL}: the driver and the vLLM worker run different versions of refit "
                "(reinstall it where vLLM runs)"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        required = {
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        }
        unknown, missing = sorted(set(data) - names - {"protocol"}), sorted(required - set(data))
        if unknown or missing:
            raise ValueError(
                f"refit worker RPC: a {cls.__name__} (protocol {PROTOCOL}) with unknown fields "
                f"{unknown} and missing fields {missing}"
            )
        return cls(**{k: v for k, v in data.items() if k != "protocol"})


@dataclass(frozen=True)
class AdapterSpec:
    """A LoRA refit: the tensors are one adapter version (PEFT names), installed in vLLM's LoRA manager
    as LoRA id `lora_id`; the worker keeps the newest `max_versions` it installed and removes older ones."""

    lora_id: int
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    max_versions: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", tuple(self.target_modules))

    def peft_config(self) -> dict[str, Any]:
        """The adapter_config.json fields vLLM's PEFTHelper reads."""
        return {
            "r": self.rank,
            "lora_alpha": self.alpha,
            "target_modules": list(self.target_modules),
            "bias": "none",
        }


def coerce_fields(message: Message) -> None:
    """A message's `transfer` (a TransferConfig from its fields) and `load_path` (a LoadPath)."""
    if isinstance(message.transfer, dict):
        try:
            object.__setattr__(message, "transfer", TransferConfig(**message.transfer))
        except TypeError as exc:
            name = type(message).__name__
            raise ValueError(f"refit worker RPC: a {name}'s transfer fields: {exc}") from None
    object.__setattr__(message, "load_path", LoadPath(message.load_path))


@dataclass(frozen=True)
class ReceiveRequest(Message):
    """Driver -> every worker of an engine: receive one refit from `endpoint` and load it.

    Worker `rank` of the engine is receiver `rank_offset + rank` of the sender. `next_bucket_s` and
    `receiver_exit_s` are the worker's waits of rollout.timeouts (RefitTimeouts)."""

    endpoint: str
    transfer: TransferConfig
    version: int
    next_bucket_s: float
    receiver_exit_s: float
    load_path: LoadPath = LoadPath.auto
    rank_offset: int = 0
    adapter: AdapterSpec | None = None  # a LoRA refit: only the adapter's tensors come

    def __post_init__(self) -> None:
        coerce_fields(self)
        if isinstance(self.adapter, dict):
            try:
                object.__setattr__(self, "adapter", AdapterSpec(**self.adapter))
            except TypeError as exc:
                raise ValueError(
                    f"refit worker RPC: a ReceiveRequest's adapter fields: {exc}"
                ) from None


@dataclass(frozen=True)
class ReceiveReply(Message):
    """Worker -> driver: how its part of the refit went (`receiver` names it). Never raised through
    vLLM's RPC: a failure comes back as ok=False with the error and the worker's traceback."""

    receiver: int
    ok: bool
    load_s: float = 0.0
    # bytes copied out of a bucket because a layer straddled it (rollout/bucket_stream.py)
    detached_bytes: int = 0
    load_path: str = ""  # "direct" (weight loaders) or "layerwise" (rollout/load_path.py)
    # the direct path: "recorded", "replayed" or "off: <why>" (rollout/load_path.py LoadPlan)
    load_plan: str = ""
    error: str = ""
    traceback: str = ""
