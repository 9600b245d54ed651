"""vLLM's worker process imports only the receiving half of rollout/ and vLLM: no driver module, no
trainer, no Hydra (the worker package's imports read from the AST, then a fresh sys.modules)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORKER = sorted((ROOT / "rollout" / "worker").glob("*.py"))
ALLOWED_ROLLOUT = (
    "rollout.worker",
    "rollout.transfer.receiver",
    "rollout.transfer.wire",
    "rollout.transfer.transports",
    "rollout.transfer.config",
    "rollout.load_path",
    "rollout.bucket_stream",
    "rollout.tied_heads",
    "rollout.vllm_compat",
    "rollout.graph_audit",
)
DRIVER = (
    "rollout.engine",
    "rollout.async_engine",
    "rollout.engine_group",
    "rollout.refit",
    "rollout.platform",
    "rollout.cache_reset",
    "rollout.vllm_segments",
    "trainers",
    "hydra",
    "omegaconf",
    "benchmarks",
)


def _imports(source: str) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.append(node.module)
    return names


def _outside_the_receiving_half(source: str) -> list[str]:
    return [
        n
        for n in _imports(source)
        if n.split(".")[0] == "rollout"
        and not any(n == a or n.startswith(a + ".") for a in ALLOWED_ROLLOUT)
    ]


def _driver_modules_loaded(*modules: str) -> list[str]:
    code = f"import json, sys\nimport {', '.join(modules)}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    return [m for m in loaded if any(m == d or m.startswith(d + ".") for d in DRIVER)]


def test_the_worker_package_imports_only_the_receiving_half():
    assert len(WORKER) >= 5
    found = {p.name: _outside_the_receiving_half(p.read_text()) for p in WORKER}
    assert not any(found.values()), found
    # negative control: the old extension's config import is caught
    assert _outside_the_receiving_half("from rollout.config import RefitTimeouts") == [
        "rollout.config"
    ]


def test_vllm_workers_load_no_driver_module():
    # the extension, and the weight-transfer backend's plugin and worker engine (vLLM loads the
    # plugin in every process of an engine, the API server's included)
    worker_modules = [
        "rollout.worker.extension",
        "rollout.vllm_backend",
        "rollout.vllm_backend.worker",
    ]
    assert _driver_modules_loaded(*worker_modules) == []
    # negative control: the driver's engine module does pull the driver in
    assert "rollout.refit" in _driver_modules_loaded("rollout.engine")
