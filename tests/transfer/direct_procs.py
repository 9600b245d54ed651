"""What the mode=direct tests run in spawned trainer processes: a model whose tensors persist across refits and
change in place between them (an AdamW step), as a trainer's do. Module level, so spawn can import it."""

from __future__ import annotations

import os
import signal
import time
import traceback

import torch
from cuda_gate import hold_stream
from transfer_procs import CTX, as_bytes, race_value

from rollout.transfer import PeerError, TransferConfig, WeightReceiver, WeightSender
from rollout.transfer.direct import DirectSender


def tiny_trainer(
    seed: int = 0, device: str = "cpu"
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """Parameters of several shapes, a bf16 and an int64 buffer, a 0-dim and an empty one, and one 6 MB
    weight (larger than any bucket the bucketed tests use)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Embedding(1536, 1024), torch.nn.LayerNorm(1024), torch.nn.Linear(1024, 37)
    )
    model.register_buffer("scale_bf16", torch.randn(5, 3).to(torch.bfloat16))
    model.register_buffer("steps_i64", torch.tensor(0))
    model.register_buffer("empty", torch.empty(0, 4))
    model.to(device)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    """One in-place update of every tensor (parameters by AdamW, buffers by hand)."""
    g = torch.Generator().manual_seed(step)
    x = torch.randint(0, 1536, (8,), generator=g).to(model[2].weight.device)
    model(x).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()
    model.scale_bf16.mul_(1.5)
    model.steps_i64.add_(1)


def tensors(model: torch.nn.Module, use_state_dict: bool = False) -> list[tuple[str, torch.Tensor]]:
    if use_state_dict:  # detached views of the same storages: nothing new to export
        return list(model.state_dict().items())
    return [*model.named_parameters(), *model.named_buffers()]


def snapshot(named: list[tuple[str, torch.Tensor]]) -> dict[str, tuple[str, list[int], bytes]]:
    return {n: (str(t.dtype), list(t.shape), as_bytes(t).cpu().numpy().tobytes()) for n, t in named}


class ReturnsBeforeDone(DirectSender):
    """The bug this mode must not have: send() returns as soon as the layout is out, so the trainer's next
    in-place update races the receiver's reads."""

    def _wait_done(self, wait, refit_id: int, layout_wanted: bool = False):
        return None


class NoTrainerFence(DirectSender):
    """The GPU bug on the sender's side: the layout goes out while the trainer's writes are still queued."""

    def _fence_trainer_writes(self) -> None:
        pass


_BROKEN = {"": None, "returns_before_done": ReturnsBeforeDone, "no_trainer_fence": NoTrainerFence}


def _sender(cfg: dict, endpoint: str, device: str, broken: str) -> WeightSender:
    sender = WeightSender(TransferConfig(**cfg), endpoint, device=device)
    if broken:
        sender._direct = _BROKEN[broken](sender.cfg, sender.transport_kind, sender.device)
    return sender


def _refits(
    cfg: dict, endpoint: str, num_refits: int, queue, broken: str, device: str, gate_s: float
) -> None:
    """Round trips: refit, report what was sent, step; re-allocates a parameter before refit 3, replaces a
    Parameter object before refit 4, sends state_dict() views at refit 5."""
    model, opt = tiny_trainer(device=device)
    with _sender(cfg, endpoint, device, broken) as sender:
        for v in range(1, num_refits + 1):
            if v == 3:
                model[2].weight.data = model[
                    2
                ].weight.data.clone()  # a fresh storage; AdamW still updates it
            if v == 4:
                model[1].bias = torch.nn.Parameter(
                    model[1].bias.detach() + 1
                )  # a new Parameter object
            named = tensors(model, use_state_dict=v == 5)
            try:
                stats = sender.send(named, version=v)
            except (
                PeerError
            ) as exc:  # the receiver's consume failed: report it and go on, as a trainer would
                queue.put(("peer_error", v, str(exc)))
                continue
            queue.put(
                (
                    "sent",
                    v,
                    stats.num_tensors,
                    stats.num_buckets,
                    snapshot(named),
                    sorted(
                        n for n, t in named if t.numel() and not t.untyped_storage().is_shared()
                    ),
                )
            )
            train_step(model, opt, v)


def _race(
    cfg: dict, endpoint: str, num_refits: int, queue, broken: str, device: str, gate_s: float
) -> None:
    """Persistent constant-filled tensors, overwritten in place with the next refit's values right after send()
    (on a GPU, with `gate_s`, queued behind a host function that holds the stream that long: cuda_gate.py)."""
    named = [(f"layer.{i}", torch.empty(50_000, device=device)) for i in range(20)]
    with _sender(cfg, endpoint, device, broken) as sender:
        for v in range(1, num_refits + 1):
            if gate_s:
                hold_stream(gate_s)
            for name, t in named:
                t.fill_(race_value(v, name))
            sender.send(named, version=v)
        for name, t in named:
            t.fill_(-1.0)  # the last refit's readers must have finished too
        queue.put(("sent", num_refits))
        time.sleep(1.0)  # keep the storages alive while a late reader still looks


def direct_sender(
    scenario: str,
    cfg: dict,
    endpoint: str,
    num_refits: int,
    queue,
    broken: str,
    device: str,
    gate_s: float,
) -> None:
    torch.set_num_threads(1)
    try:
        {"refits": _refits, "race": _race}[scenario](
            cfg, endpoint, num_refits, queue, broken, device, gate_s
        )
    except Exception as exc:  # reported to the test, which asserts on it
        queue.put(("error", type(exc).__name__, str(exc), traceback.format_exc()))


def start_sender(
    scenario: str,
    cfg: dict,
    endpoint: str,
    num_refits: int,
    broken: str = "",
    device: str = "cpu",
    gate_s: float = 0.0,
):
    """`broken`: "" (the real sender), "returns_before_done" or "no_trainer_fence" (test-only subclasses)."""
    queue = CTX.Queue()
    args = (scenario, cfg, endpoint, num_refits, queue, broken, device, gate_s)
    proc = CTX.Process(target=direct_sender, args=args, daemon=True)
    proc.start()
    return proc, queue


def sender_then_hang(cfg: dict, endpoint: str) -> None:
    """One direct refit of a persistent model, then wait forever: the parent SIGKILLs us mid-refit."""
    torch.set_num_threads(1)
    model, _ = tiny_trainer()
    sender = WeightSender(TransferConfig(**cfg), endpoint, device="cpu")
    sender.send(tensors(model), version=1)
    time.sleep(3600)


def receiver_that_dies(cfg: dict, endpoint: str, ready) -> None:
    """Receive one direct refit and SIGKILL itself inside consume, holding the trainer's memory mapped."""
    torch.set_num_threads(1)
    receiver = WeightReceiver(TransferConfig(**cfg), endpoint)
    time.sleep(0.2)  # zmq connects in the background
    ready.put("connected")
    receiver.receive(lambda weights, is_last: os.kill(os.getpid(), signal.SIGKILL))


def receiver_once(cfg: dict, endpoint: str, queue) -> None:
    torch.set_num_threads(1)
    with WeightReceiver(TransferConfig(**cfg), endpoint) as receiver:
        got = {}
        stats = receiver.receive(lambda weights, is_last: got.update(snapshot(weights)))
        queue.put((stats.version, got))


def shm_entries_of(pid: int) -> list[str]:
    """/dev/shm names torch's shared storages of process `pid` would have (torch_<pid>_...)."""
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"torch_{pid}_")]


def mapped_storages_of(pid: int) -> list[str]:
    """Lines of our /proc/self/maps that map a shared storage of process `pid`."""
    with open("/proc/self/maps") as f:
        return [line for line in f if f"/torch_{pid}_" in line]
