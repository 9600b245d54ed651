"""Helpers for the transfer tests: deterministic tensors, and code that runs in spawned processes.

Everything a child process runs lives here at module level, so the spawn start method can import it.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import socket
import time
import traceback

import torch

from rollout.transfer import (
    TransferConfig,
    TransferTimeout,
    WeightReceiver,
    WeightSender,
    new_endpoint,
)
from rollout.transfer.sync import Fenced

SHM_DIR = "/dev/shm"
CTX = mp.get_context("spawn")
FP8 = [getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)]
DTYPES = [
    torch.float32,
    torch.bfloat16,
    torch.float16,
    torch.float64,
    torch.int64,
    torch.int8,
    torch.bool,
    *FP8,
]


def _random(shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if not dtype.is_floating_point:
        return torch.randint(-100, 100, shape, generator=g).to(dtype)
    return torch.randn(shape, generator=g).to(dtype)


def mixed_tensors(bucket_bytes: int, seed: int) -> list[tuple[str, torch.Tensor]]:
    """Every awkward input at once: all dtypes at odd sizes (alignment), 0-dim, empty, strided,
    a tensor 3.5x the bucket, a strided tensor larger than the bucket, exact-boundary sizes."""
    g = torch.Generator().manual_seed(seed)
    out = [
        ("scalar", torch.randn((), generator=g)),
        ("empty", torch.empty(0)),
        ("empty2d.bf16", torch.empty(3, 0, dtype=torch.bfloat16)),
    ]
    out += [(f"w.{str(dt)[6:]}", _random((37, 19), dt, g)) for dt in DTYPES]
    out.append(("strided.t", torch.randn(48, 40, generator=g).t()))
    out.append(("strided.step", torch.randn(64, 30, generator=g)[::3, 1::2]))
    out.append(("big.3_5x", torch.randn(int(3.5 * bucket_bytes) // 4, generator=g)))
    out.append(
        ("big.strided", torch.randn(bucket_bytes // 512 + 3, 128, generator=g).t())
    )  # > 1 bucket
    out.append(("exact.bucket", _random((bucket_bytes,), torch.uint8, g)))
    out.append(("bucket.plus1", _random((bucket_bytes + 1,), torch.uint8, g)))
    out.append(("scalar.i64", torch.tensor(7 + seed)))
    out.append(
        ("fills.rest", _random((bucket_bytes - 4096,), torch.uint8, g))
    )  # nearly a whole bucket, behind small tensors
    out.append(("tail.bf16", _random((5, 3), torch.bfloat16, g)))
    return out


def race_value(version: int, name: str) -> float:
    """What every element of race tensor `name` holds in refit `version`."""
    return float(version * 1000 + int(name.split(".")[1]))


def race_tensors(
    version: int, num_tensors: int = 20, numel: int = 50_000
) -> list[tuple[str, torch.Tensor]]:
    """Constant-filled tensors whose value names the refit and the tensor, so any overwrite shows."""
    return [
        (f"layer.{i}", torch.full((numel,), race_value(version, f"layer.{i}")))
        for i in range(num_tensors)
    ]


class AckWithoutFence(Fenced):
    """The GPU flavour of the bug: ack as soon as consume returned, with its reads still queued."""

    def deliver(self, weights, is_last, consume, fence, ack):
        consume(weights, is_last)
        ack()


def late_gpu_reads(
    sender_server, cfg: dict, sender: str, receiver: str, num_refits: int, policy=None
) -> list[str]:
    """consume only queues its reads behind a long kernel and returns; returns the tensors whose copy,
    checked after receive() returned, holds other bytes than its refit's."""
    endpoint = new_endpoint()
    versions = list(range(1, num_refits + 1))
    corrupt = []
    sender_server.run(
        cfg, endpoint, [{"kind": "race", "version": v} for v in versions], device=sender
    )
    with WeightReceiver(TransferConfig(**cfg), endpoint, device=receiver) as rx:
        if policy is not None:
            rx._policy = policy
        for v in versions:
            dest: dict[str, torch.Tensor] = {}

            def consume(weights, is_last):
                with torch.cuda.device(receiver):
                    torch.cuda._sleep(50_000_000)  # tens of ms of GPU time before the copies start
                    for name, view in weights:
                        dest[name] = torch.empty_like(view).copy_(view)

            rx.receive(consume)
            torch.cuda.synchronize(receiver)
            corrupt += [
                f"refit {v}: {n}"
                for n, t in dest.items()
                if not bool((t == race_value(v, n)).all())
            ]
    assert all(r[0] == "ok" for r in sender_server.result())
    return corrupt


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def tensors_for(spec: dict) -> list[tuple[str, torch.Tensor]]:
    kind = spec["kind"]
    if kind == "mixed":
        return mixed_tensors(spec["bucket_bytes"], spec["seed"])
    if kind == "race":
        return race_tensors(spec["version"])
    if kind == "zero":
        return []
    if kind == "duplicate":  # found mid-refit, after buckets were sent: the refit must be aborted
        return [*race_tensors(spec["version"], num_tensors=8), ("layer.3", torch.zeros(3))]
    raise ValueError(kind)


class CorruptingSender(WeightSender):
    """Flips one byte of each bucket after its checksum was taken and before it is published, as a bad link
    or a stray writer would: the transport's publish is wrapped, so production code carries no test hook."""

    def _begin(self, refit_id: int, version: int) -> None:
        super()._begin(refit_id, version)
        transport = self._transport
        if getattr(transport, "corrupting", False):
            return
        publish = transport.publish

        def corrupt_then_publish(index, nbytes, announce, what):
            transport.buffer(index)[nbytes // 2] ^= 0xFF
            publish(index, nbytes, announce, what)

        transport.publish, transport.corrupting = corrupt_then_publish, True


def _send_plan(
    cfg_kwargs: dict,
    endpoint: str,
    plan: list[dict],
    corrupt: bool,
    device: str,
    num_receivers: int = 1,
) -> list[tuple]:
    cls = CorruptingSender if corrupt else WeightSender
    results = []
    with cls(
        TransferConfig(**cfg_kwargs), endpoint, device=device, num_receivers=num_receivers
    ) as sender:
        for spec in plan:
            try:
                tensors = [(n, t.to(device)) for n, t in tensors_for(spec)]
                if spec.get("gpu_sleep_cycles"):  # queue the packing copies behind a long kernel
                    torch.cuda._sleep(spec["gpu_sleep_cycles"])
                stats = sender.send(tensors, version=spec["version"])
                results.append(
                    ("ok", stats.version, stats.num_tensors, stats.num_buckets, stats.num_bytes)
                )
            except Exception as exc:  # reported to the parent, which asserts on it
                results.append(("error", type(exc).__name__, str(exc)))
    return results


def sender_server(conn) -> None:
    """A long-lived sender process: runs one plan per command, replies with per-refit results."""
    torch.set_num_threads(1)
    while True:
        cmd = conn.recv()
        if cmd is None:
            return
        try:
            conn.send(_send_plan(**cmd))
        except Exception:
            conn.send([("crash", traceback.format_exc())])


class SenderServer:
    """Parent-side handle: `run(...)` starts a plan in the child; `result()` collects its outcome."""

    def __init__(self) -> None:
        self._conn, child = CTX.Pipe()
        self.process = CTX.Process(target=sender_server, args=(child,), daemon=True)
        self.process.start()

    def run(
        self,
        cfg_kwargs: dict,
        endpoint: str,
        plan: list[dict],
        corrupt: bool = False,
        device: str = "cpu",
        num_receivers: int = 1,
    ) -> None:
        self._conn.send(
            {
                "cfg_kwargs": cfg_kwargs,
                "endpoint": endpoint,
                "plan": plan,
                "corrupt": corrupt,
                "device": device,
                "num_receivers": num_receivers,
            }
        )

    def result(self, timeout_s: float = 60.0) -> list[tuple]:
        if not self._conn.poll(timeout_s):
            raise TimeoutError("sender process gave no result")
        return self._conn.recv()

    def stop(self) -> None:
        self._conn.send(None)
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()


def sender_then_hang(
    cfg_kwargs: dict, endpoint: str, num_tensors: int, device: str = "cpu"
) -> None:
    """Send one refit and never return: the parent SIGKILLs this process mid-refit."""
    torch.set_num_threads(1)
    sender = WeightSender(TransferConfig(**cfg_kwargs), endpoint, device=device)
    sender.send([(n, t.to(device)) for n, t in race_tensors(1, num_tensors=num_tensors)], version=1)
    time.sleep(3600)


@contextlib.contextmanager
def receiving_from_a_killed_sender(cfg_kwargs: dict, endpoint: str):
    """Receive one refit from a sender_then_hang process that is SIGKILLed inside our first consume, while
    we hold views of its buffer. Yields (receiver, what receive() raised, tensors per consume call) with
    the receiver still open. The first wait may take 20 s (the child starts up); the later ones get
    cfg_kwargs["timeout_s"]."""
    sender = CTX.Process(target=sender_then_hang, args=(cfg_kwargs, endpoint, 12))
    sender.start()
    seen: list[int] = []

    def consume(weights, is_last):
        if not seen:
            os.kill(sender.pid, signal.SIGKILL)
            sender.join()
            receiver._channel.timeout_s = cfg_kwargs["timeout_s"]
        seen.append(len(weights))

    with WeightReceiver(TransferConfig(**{**cfg_kwargs, "timeout_s": 20.0}), endpoint) as receiver:
        try:
            receiver.receive(consume)
        except Exception as exc:  # noqa: BLE001 - the callers assert its type and message
            error = exc
        else:
            raise AssertionError("receive() returned although its sender was killed mid-refit")
        yield receiver, error, seen


def receiver_that_dies(cfg_kwargs: dict, endpoint: str, device: str = "cpu", rank: int = 0) -> None:
    """Receive one refit and SIGKILL itself inside consume, i.e. mid-refit, holding the buffers."""
    torch.set_num_threads(1)
    torch.zeros(1, device=device)  # a GPU's start-up now, not inside the sender's wait for Ready
    receiver = WeightReceiver(TransferConfig(**cfg_kwargs), endpoint, device=device, rank=rank)
    receiver.receive(lambda weights, is_last: os.kill(os.getpid(), signal.SIGKILL))


def receiver_process(
    cfg_kwargs: dict, endpoint: str, num_refits: int, queue, device: str = "cpu"
) -> None:
    """Receive `num_refits` refits, report each outcome (and the tensor names seen) on `queue`."""
    torch.set_num_threads(1)
    with WeightReceiver(TransferConfig(**cfg_kwargs), endpoint, device=device) as receiver:
        for _ in range(num_refits):
            names: list[str] = []
            try:
                stats = receiver.receive(
                    lambda weights, is_last: names.extend(n for n, _ in weights)
                )
                queue.put(("ok", stats.version, names))
            except Exception as exc:
                queue.put(("error", type(exc).__name__, str(exc)))


def recording_allocate(monkeypatch, factory: str = "allocate") -> list[dict]:
    """Spy on the transport factory (the sender's `allocate` or the receiver's `attach`): returns the
    handshake fields (describe()) of every transport it makes, taken then, since a failed refit closes
    its transport."""
    from rollout.transfer import transports

    made, make = [], getattr(transports, factory)

    def recording(*args, **kwargs):
        transport = make(*args, **kwargs)
        made.append(transport.describe())
        return transport

    monkeypatch.setattr(transports, factory, recording)
    return made


def send_in_thread(sender: WeightSender, version: int, num_tensors: int = 4) -> tuple:
    """Start sender.send(race_tensors(version)) in a thread; returns it and the list its outcome lands in."""
    import threading

    outcome: list = []

    def run():
        try:
            outcome.append(
                sender.send(race_tensors(version, num_tensors=num_tensors), version=version)
            )
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def refit_to_a_receiver_that_dies(sender: WeightSender, cfg_kwargs: dict, endpoint: str) -> None:
    """Refit 1 from `sender` (made with a timeout_s long enough for a child's start-up) to a receiver_that_dies
    process: the sender's wait for its Ack must end at cfg_kwargs["timeout_s"] with an error naming the endpoint."""
    dying = CTX.Process(target=receiver_that_dies, args=(cfg_kwargs, endpoint))
    dying.start()
    sender._channel.timeout_s = cfg_kwargs[
        "timeout_s"
    ]  # only after connecting: the child's start-up takes seconds
    try:
        sender.send(race_tensors(1), version=1)
    except TransferTimeout as exc:
        error = str(exc)
    else:
        raise AssertionError("send() returned although its receiver was killed mid-refit")
    dying.join()
    assert dying.exitcode == -signal.SIGKILL and "Ack" in error and endpoint in error, (
        dying.exitcode,
        error,
    )


def refit_to_a_restarted_receiver(sender: WeightSender, cfg_kwargs: dict, endpoint: str) -> None:
    """Refit 2 from `sender` to a fresh receiver_process on the same endpoint (after a failed refit 1): it
    must get it whole."""
    queue = CTX.Queue()
    sender._channel.timeout_s = 20.0
    restarted = CTX.Process(target=receiver_process, args=(cfg_kwargs, endpoint, 1, queue))
    restarted.start()
    stats = sender.send(race_tensors(2), version=2)
    assert stats.version == 2 and queue.get(timeout=20)[:2] == ("ok", 2)
    restarted.join(20)


def receivers_in_turn(sender: WeightSender, cfg: TransferConfig, endpoint: str, versions=(1, 2)):
    """For each version, a new receiver in this process gets the refit (4 tensors) that `sender` sends from
    a thread, and is yielded still open; it closes before the next one starts."""
    for version in versions:
        with WeightReceiver(cfg, endpoint) as receiver:
            thread, sent = send_in_thread(sender, version)
            assert receiver.receive(lambda w, last: None).num_tensors == 4
            thread.join(20)
            assert sent[0].version == version
            yield receiver


def our_segments(names: list[str]) -> list[str]:
    return [n for n in names if os.path.exists(os.path.join(SHM_DIR, n))]


def store_ports(hello) -> list[int]:
    """The rendezvous-store ports an nccl handshake named (none for the other transports)."""
    return sorted({b.store_port for b in hello.nccl_buffers}) if hello is not None else []


def listening(port: int) -> bool:
    """Whether something still accepts connections on 127.0.0.1:port (an nccl sender's store)."""
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def sender_silent_after_first_bucket(cfg_kwargs: dict, endpoint: str, device: str, ready) -> None:
    """An nccl sender that broadcasts bucket 0 (so both ends' communicator is up) and then never
    another: its receiver waits on a broadcast that never comes. Lingers until the parent kills it."""
    from rollout.transfer.nccl import NcclTransport

    real_publish, calls = NcclTransport.publish, []

    def publish(self, index, nbytes, announce, what):
        calls.append(index)
        if len(calls) == 1:
            real_publish(self, index, nbytes, announce, what)
        else:
            announce()  # Packed goes out, the broadcast never starts

    NcclTransport.publish = publish
    sender = WeightSender(TransferConfig(**cfg_kwargs), endpoint, device=device)
    tensors = [(n, t.to(device)) for n, t in race_tensors(1)]
    ready.put("ready")
    try:
        sender.send(tensors, version=1)
    except Exception as exc:  # expected: the receiver gives up on bucket 1
        ready.put(type(exc).__name__)
    time.sleep(3600)
