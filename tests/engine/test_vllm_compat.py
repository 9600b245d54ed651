"""Each version gate, on both sides of its boundary."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rollout.vllm_compat import (
    check_layerwise_internals,
    finalize_failed_reload,
    fully_awake,
    has_encoder_cache_reset,
    has_flat_logprobs,
    has_layerwise_reload,
    installed_vllm_version,
    missing_layerwise_internals,
    resolve_call,
    sampled_logprobs,
    version_tuple,
    wake_up_reports_state,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.32.0", (0, 32, 0)),
        ("0.32.0+cpu", (0, 32, 0)),
        ("0.17", (0, 17, 0)),
        ("0.11.0rc2", (0, 11, 0)),
        ("1", (1, 0, 0)),
    ],
)
def test_version_tuple(text, expected):
    assert version_tuple(text) == expected


def test_version_tuple_rejects_garbage():
    with pytest.raises(ValueError):
        version_tuple("dev")


@pytest.mark.parametrize(
    ("version", "expected"),
    [("0.16.9", False), ("0.17.0", True), ("0.17.0rc1", True), ("0.32.0", True)],
)
def test_encoder_cache_gate(version, expected):
    assert has_encoder_cache_reset(version) is expected


@pytest.mark.parametrize(
    ("version", "expected"), [("0.23.1", False), ("0.24.0", True), ("0.32.0+cpu", True)]
)
def test_layerwise_reload_gate(version, expected):
    assert has_layerwise_reload(version) is expected


def test_installed_version_is_readable_without_importing_vllm():
    code = (
        "import sys; from rollout.vllm_compat import installed_vllm_version, version_tuple; "
        "assert version_tuple(installed_vllm_version()) >= (0, 24, 0); assert 'vllm' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_resolve_call_both_sides(caplog):
    class Obj:
        class inner:
            @staticmethod
            def there():
                return 7

    assert resolve_call(Obj, "inner.there", "x")() == 7
    assert resolve_call(Obj, "inner.missing_call_for_test", "the thing") is None
    assert "inner.missing_call_for_test" in caplog.text and "the thing skipped" in caplog.text


@pytest.mark.parametrize(
    ("version", "expected"),
    [("0.24.0", False), ("0.31.9", False), ("0.32.0", True), ("0.32.0+cpu", True)],
)
def test_wake_up_state_gate(version, expected):
    assert wake_up_reports_state(version) is expected


def test_fully_awake_both_sides():
    assert (
        fully_awake(None, "0.24.0") is None
    )  # 0.24's LLM.wake_up returns None: no claim either way
    assert fully_awake(True, "0.24.0") is None
    assert fully_awake(True, "0.32.0") is True
    assert fully_awake(False, "0.32.0") is False


def test_layerwise_internals_present_in_installed_vllm():
    assert missing_layerwise_internals() == []
    check_layerwise_internals(installed_vllm_version())


def test_layerwise_internals_missing_is_a_clear_error():
    from types import SimpleNamespace

    fake = SimpleNamespace(LAYERWISE_INFO={}, finalize_layerwise_reload=lambda *a: None)
    assert missing_layerwise_internals(fake) == ["_place_kernel_tensors"]
    with pytest.raises(RuntimeError, match="_place_kernel_tensors"):
        check_layerwise_internals("9.9.9", fake)


def _half_reloaded_model():
    """A two-layer model mid-way through vLLM's (real) layerwise reload: one weight of one layer loaded."""
    import torch
    from vllm.model_executor.model_loader.reload import layerwise

    class Layer(torch.nn.Module):  # two loadable tensors ("bias" would be skipped by 0.32's reload)
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(4, 4), requires_grad=False)
            self.scale = torch.nn.Parameter(torch.randn(4), requires_grad=False)

    torch.manual_seed(0)
    model = torch.nn.Sequential(Layer(), Layer())
    kernel = {name: p for name, p in model.named_parameters()}
    layerwise.record_metadata_for_reloading(model)
    layerwise.initialize_layerwise_reload(model)
    assert all(p.is_meta for p in model.parameters())
    first = model[0].weight
    first.weight_loader(first, torch.ones(4, 4))  # buffered: the layer still waits for its scale
    assert layerwise.LAYERWISE_INFO[model[0]].loaded_weights
    return model, kernel


@pytest.mark.parametrize(
    "finalize", ["installed", "0.24-like: drops kernel tensors without placing"]
)
def test_failed_reload_restores_every_layer(monkeypatch, finalize):
    """Both sides of the 0.24/0.32 difference in finalize: afterwards no layer holds a meta tensor, every
    parameter is the live kernel tensor again, and no layer keeps buffered reload state."""
    from vllm.model_executor.model_loader.reload import layerwise

    model, kernel = _half_reloaded_model()
    if finalize != "installed":

        def finalize_024_like(model, model_config):  # 0.24: reset, kernel tensors not put back
            for info in list(layerwise.LAYERWISE_INFO.values()):
                info.reset()

        monkeypatch.setattr(layerwise, "finalize_layerwise_reload", finalize_024_like)
    finalize_failed_reload(model, model_config=None)
    for name, param in model.named_parameters():
        assert not param.is_meta, name
        assert param is kernel[name], name
    for layer in model.modules():
        info = layerwise.LAYERWISE_INFO.get(layer)
        assert info is None or (not info.loaded_weights and info.kernel_tensors is None), layer


@pytest.mark.parametrize("num_logprobs", [0, 2])
def test_sampled_logprobs_reads_both_of_vllms_containers(num_logprobs):
    """FlatLogprobs (what sampling_params asks for where SamplingParams takes flat_logprobs) and the list of
    {token_id: Logprob} give the same sampled log-probs, filled the way vLLM's output processor fills them
    (the sampled token first, then the top-k, which may repeat it)."""
    from types import SimpleNamespace

    from vllm.logprobs import append_logprobs_for_next_position, create_sample_logprobs

    sampled, positions = [7, 3, 9], []
    for pos, token in enumerate(sampled):  # (token ids, log-probs, rank of the sampled token)
        table = {
            3: -0.05,
            9: -0.15,
            7: -0.35,
            token: -0.25 * (pos + 1),
        }  # one log-prob per token and position
        ids = [token, *[3, 9, 7][:num_logprobs]]
        positions.append((ids, [table[t] for t in ids], 2))
    got = []
    for flat in (True, False):
        container = create_sample_logprobs(flat)
        for ids, logprobs, rank in positions:
            append_logprobs_for_next_position(
                container, ids, logprobs, [None] * len(ids), rank, num_logprobs
            )
        got.append(sampled_logprobs(SimpleNamespace(token_ids=sampled, logprobs=container)))
    assert got[0] == got[1] == [-0.25, -0.5, -0.75]
    assert sampled_logprobs(SimpleNamespace(token_ids=[], logprobs=None)) == []


def test_sampling_params_ask_for_flat_logprobs_where_vllm_takes_them():
    from rollout.engine import sampling_params

    params = sampling_params(2, n=3, max_tokens=4, temperature=1.0, seed=0, top_p=1.0)
    assert has_flat_logprobs() is ("flat_logprobs" in type(params[0]).__struct_fields__)
    assert all(p.flat_logprobs is has_flat_logprobs() and p.logprobs == 0 for p in params)
