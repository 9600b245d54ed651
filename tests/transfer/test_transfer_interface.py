"""The transport interface is one Protocol whose every member each transport really implements, with the
Protocol's signature, and that sender or receiver really calls: no member kept for the protocol's sake."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from rollout.transfer import transports
from rollout.transfer.cuda_ipc import CudaIpcTransport
from rollout.transfer.nccl import NcclTransport
from rollout.transfer.shm import ShmTransport

TRANSFER = Path(transports.__file__).parent
MEMBERS = [
    name
    for name, member in vars(transports.BucketTransport).items()
    if inspect.isfunction(member) and not name.startswith("_")
]


def _methods(cls: type) -> dict[str, ast.FunctionDef]:
    tree = ast.parse(inspect.getsource(cls))
    return {node.name: node for node in tree.body[0].body if isinstance(node, ast.FunctionDef)}


def test_the_protocol_has_the_verbs_the_docstring_names():
    assert MEMBERS == ["describe", "reclaim", "publish", "buffer", "acquire", "close"]
    assert all(
        f"{name}(" in transports.BucketTransport.__doc__
        or f"`{name}`" in transports.BucketTransport.__doc__
        for name in MEMBERS
    )


@pytest.mark.parametrize(
    "cls", [ShmTransport, CudaIpcTransport, NcclTransport], ids=lambda c: c.__name__
)
def test_every_transport_implements_every_member_for_real(cls):
    methods = _methods(cls)
    for name in MEMBERS:
        assert inspect.signature(getattr(cls, name)) == inspect.signature(
            getattr(transports.BucketTransport, name)
        ), name
        body = [
            node
            for node in methods[name].body
            if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))
        ]
        assert body, f"{cls.__name__}.{name} is a docstring-only no-op"
    assigned = {
        t.attr
        for node in ast.walk(methods["__init__"])
        if isinstance(node, ast.Assign)
        for t in node.targets
        if isinstance(t, ast.Attribute)
    }
    assert set(transports.BucketTransport.__annotations__) <= assigned  # device


def test_sender_and_receiver_call_every_member():
    calls = {
        node.func.attr
        for path in ("sender.py", "receiver.py")
        for node in ast.walk(ast.parse((TRANSFER / path).read_text()))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
    }
    assert set(MEMBERS) <= calls, set(MEMBERS) - calls
