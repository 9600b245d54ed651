"""Export a training checkpoint's policy as a Hugging Face model directory (transformers, vLLM and PEFT
load it like any other).

    python -m trainers.export <run dir | checkpoints dir | checkpoint> <out dir> [--dtype bfloat16]

A run or checkpoints directory exports its latest step. The directory gets the weights (safetensors),
the model's config and generation config, and the tokenizer of the model the run trained. A LoRA run
(`model.lora.rank`) exports the base with the adapter merged into it; `--adapter-only` writes the
adapter alone instead, as PEFT's `save_pretrained` does (load it on the base with PEFT or vLLM's LoRA).
Checkpoints of sharded ranks (`trainer.num_workers > 1`) are read in this one process.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from trainers.checkpoint import SHARDS, load_checkpoint, resolve_checkpoint


def load_trained_policy(checkpoint: str | Path) -> tuple[Any, str, dict[str, Any]]:
    """(policy, the model path it was trained from, the run's config) of a checkpoint; the policy is
    the PEFT model for a LoRA run."""
    from trainers.policy import load_policy, resolve_model_path

    state = load_checkpoint(checkpoint)
    config = state.get("config")
    if not isinstance(config, dict) or "model" not in config:
        raise ValueError(f"{checkpoint}: not a trainers.ppo checkpoint (it holds no run config)")
    model_path = resolve_model_path(config["model"]["path"], config["model"]["cache_dir"])
    policy = load_policy(model_path)
    lora = config["model"].get("lora") or {}
    if lora.get("rank"):
        from trainers.lora import wrap_policy

        policy = wrap_policy(
            policy,
            lora["rank"],
            lora["alpha"],
            lora.get("dropout", 0.0),
            list(lora["target_modules"]),
        )
    if SHARDS in state:
        from trainers.distributed.states import load_states

        load_states({"policy": (policy, None)}, state[SHARDS])
    else:
        policy.load_state_dict(state["policy"])
    return policy.eval(), model_path, config


def _point_adapter_at_its_base(policy: Any, model_path: str, out: Path) -> None:
    """The adapter's config names the base it trained on: `model_path`, or where the warm-start (or
    a resumed checkpoint) changed the base, that base, written beside the adapter in `out/base`."""
    from trainers.lora import base_state, export_base
    from trainers.policy import load_policy

    original = load_policy(model_path).state_dict()
    trained = base_state(policy)
    same = all(torch.equal(t, original[name]) for name, t in trained.items() if name in original)
    base = model_path if same else export_base(policy, model_path, out / "base")
    for adapter_config in policy.peft_config.values():
        adapter_config.base_model_name_or_path = str(base)


def export(
    checkpoint: str | Path,
    out_dir: str | Path,
    dtype: str | None = None,
    adapter_only: bool = False,
) -> Path:
    """Write the checkpoint's policy to `out_dir` as a Hugging Face directory; returns it."""
    from transformers import AutoTokenizer

    source = resolve_checkpoint(checkpoint, name="checkpoint")
    policy, model_path, config = load_trained_policy(source)
    out = Path(out_dir).expanduser()
    is_lora = bool((config["model"].get("lora") or {}).get("rank"))
    if adapter_only and not is_lora:
        raise ValueError(
            f"--adapter-only: {source} is a full fine-tuning run (model.lora.rank null)"
        )
    if is_lora and not adapter_only:
        policy = policy.merge_and_unload()
    elif adapter_only:
        _point_adapter_at_its_base(policy, model_path, out)
    if dtype is not None:
        policy = policy.to(getattr(torch, dtype))
    out.mkdir(parents=True, exist_ok=True)
    policy.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(model_path).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "checkpoint", help="a run dir, its checkpoints dir, or one step_* checkpoint"
    )
    parser.add_argument("out_dir")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    parser.add_argument("--adapter-only", action="store_true", help="a LoRA run: the adapter alone")
    args = parser.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out_dir, args.dtype, args.adapter_only)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None
    print(f"exported {resolve_checkpoint(args.checkpoint, 'checkpoint')} to {out}")


if __name__ == "__main__":
    main()
