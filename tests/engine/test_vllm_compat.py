"""Each version gate, on both sides of its boundary."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rollout.vllm_compat import (
    has_encoder_cache_reset,
    has_layerwise_reload,
    installed_vllm_version,
    resolve_call,
    version_tuple,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0.32.0", (0, 32, 0)), ("0.32.0+cpu", (0, 32, 0)), ("0.17", (0, 17, 0)), ("0.11.0rc2", (0, 11, 0)), ("1", (1, 0, 0))],
)
def test_version_tuple(text, expected):
    assert version_tuple(text) == expected


def test_version_tuple_rejects_garbage():
    with pytest.raises(ValueError):
        version_tuple("dev")


@pytest.mark.parametrize(("version", "expected"), [("0.16.9", False), ("0.17.0", True), ("0.17.0rc1", True), ("0.32.0", True)])
def test_encoder_cache_gate(version, expected):
    assert has_encoder_cache_reset(version) is expected


@pytest.mark.parametrize(("version", "expected"), [("0.23.1", False), ("0.24.0", True), ("0.32.0+cpu", True)])
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
