"""Child-process side of tests/engine/test_load_plan.py: a real vLLM model (its own weight loaders: fused
q/k/v and gate/up, vocab-parallel embedding, a tied head) built on the CPU without an engine, so its
parameters keep the checkpoint's format; vLLM's distributed state lives in this process only."""

from __future__ import annotations

import os

import torch


def _vllm_model(path: str):
    from vllm.config import DeviceConfig, ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.distributed.parallel_state import model_parallel_is_initialized
    from vllm.model_executor.model_loader.utils import initialize_model

    config = VllmConfig(
        model_config=ModelConfig(model=path, dtype="float32", seed=0),
        device_config=DeviceConfig("cpu"),
    )
    with set_current_vllm_config(config):
        if not model_parallel_is_initialized():
            port = 20000 + os.getpid() % 20000
            init_distributed_environment(
                world_size=1,
                rank=0,
                local_rank=0,
                backend="gloo",
                distributed_init_method=f"tcp://127.0.0.1:{port}",
            )
            initialize_model_parallel(1, 1)
        return initialize_model(vllm_config=config), config


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _as_one_bucket(state: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """The tensors as views of ONE flat buffer, as a bucket hands them out (shared storage, offsets)."""
    flat = torch.empty(sum(t.numel() for t in state.values()), dtype=torch.float32)
    out, at = [], 0
    for name, t in state.items():
        view = flat[at : at + t.numel()].view(t.shape)
        view.copy_(t)
        out.append((name, view))
        at += t.numel()
    return out


def record_then_replay(path: str, bucketed: bool) -> dict:
    """Record on weights A, replay B then C; after each, the parameters against a second model that
    `load_weights` them plainly. Returns what the test asserts on."""
    from safetensors.torch import load_file
    from vllm.config import set_current_vllm_config

    from rollout.load_path import LoadPlan

    torch.manual_seed(0)
    model, config = _vllm_model(path)
    reference, _ = _vllm_model(path)
    base = load_file(os.path.join(path, "model.safetensors"))
    versions = [{n: t + 0.01 * v * torch.randn_like(t) for n, t in base.items()} for v in (1, 2, 3)]
    feed = (lambda s: _as_one_bucket(s)) if bucketed else (lambda s: list(s.items()))
    out = {"mismatch": [], "fallbacks": []}
    with set_current_vllm_config(config):
        plan, out["why_not"] = LoadPlan.record(model, feed(versions[0]))
        out["num_writes"] = plan and plan.num_writes
        for i, state in enumerate(versions):
            if i:
                out["fallbacks"].append(
                    plan.replay(feed(state), lambda n, t: model.load_weights([(n, t)]))
                )
            reference.load_weights(list(state.items()))
            got, want = _params(model), _params(reference)
            out["mismatch"].append([n for n in want if not torch.equal(got[n], want[n])])
        out["stale_before"] = plan.stale()
        model.model.norm.weight.data = (
            model.model.norm.weight.data.clone()
        )  # a re-allocated parameter
        out["stale_after"] = plan.stale()
        out["num_params"] = len(_params(model))
    return out


def broken_loader(kind: str) -> str | None:
    """LoadPlan.record on a module whose loader does something a plan cannot replay; returns why_not."""
    from rollout.load_path import LoadPlan

    class Module(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(4, 6))

        def load_weights(self, weights):
            for _, t in weights:
                if kind == "transposed":
                    self.w.data.copy_(t.t().contiguous())
                elif kind == "scaled":
                    self.w.data.copy_(t.t())
                    self.w.data.mul_(2.0)
                elif kind == "replaced":
                    self.w.data = t.t().clone()
                elif kind == "unwritten":
                    pass
            return {"w"}

    return LoadPlan.record(Module(), [("w", torch.randn(6, 4))])[1]


def deferred_copy() -> list[bool]:
    """A loader that writes tensor `a` only once `b` arrived, both views of one bucket: the recorder must
    attribute that copy to `a` (by where it lies in the bucket), not to the latest tensor. Returns, per
    refit, whether the module equals what the loader itself writes."""
    from rollout.load_path import LoadPlan

    class Module(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(3, 4))
            self.v = torch.nn.Parameter(torch.zeros(5))

        def load_weights(self, weights):
            held = None
            for name, t in weights:
                if name == "a":
                    held = t
                else:
                    self.v.data.copy_(t)
                    self.w.data.copy_(held[1:])
            return {"w", "v"}

    model, results = Module(), []
    plan = None
    for refit in range(3):
        bucket = torch.randn(25)  # `a` lies elsewhere in each refit's bucket, `b` stays
        a = bucket[refit : refit + 16].view(4, 4)
        weights = [("a", a), ("b", bucket[20:])]
        if plan is None:
            plan, why = LoadPlan.record(model, weights)
            assert why is None, why
        else:
            plan.replay(weights, lambda n, t: None)
        results.append(torch.equal(model.w, a[1:]) and torch.equal(model.v, bucket[20:]))
    return results
