"""Models and their optimizers to and from a torch.distributed.checkpoint directory, sharded or not.

DCP stores each tensor once with its global shape, whatever the ranks held, and reloads it resharded onto
any number of ranks, one process without a process group included (a sharded run resumed on one worker).
"""

from __future__ import annotations

from typing import Optional

from torch import nn
from torch.optim import Optimizer

Parts = dict[
    str, tuple[Optional[nn.Module], Optional[Optimizer]]
]  # key -> (model, its optimizer or None)


def _states(parts: Parts) -> dict:
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    state = {}
    for key, (model, optimizer) in parts.items():
        if model is None:
            continue
        state[key] = get_model_state_dict(model)
        if optimizer is not None:
            state[f"{key}_optimizer"] = get_optimizer_state_dict(model, optimizer)
    return state


def save_states(parts: Parts, path: str) -> None:
    """Collective on a sharded run: every rank writes its shards into the directory `path`."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_states(parts), checkpoint_id=path)


def load_states(parts: Parts, path: str) -> None:
    """Load `parts` (already built, on this rank's mesh or unsharded) from the directory `path`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state = _states(parts)
    dcp.load(state, checkpoint_id=path)
    for key, (model, optimizer) in parts.items():
        if model is None:
            continue
        set_model_state_dict(model, state[key])
        if optimizer is not None:
            set_optimizer_state_dict(model, optimizer, state[f"{key}_optimizer"])
