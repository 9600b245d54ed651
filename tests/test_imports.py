"""The import graph, computed from the AST of every module (lazy imports inside functions included): no
circle anywhere, no import running back up a layer, and configs that load no transport implementation."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("rollout", "trainers", "benchmarks")

# Lowest first; a module belongs to the longest prefix that names it, and imports only from its own layer
# or lower ones.
LAYERS = [
    ["rollout.transfer"],
    [
        "rollout.config",
        "rollout.api",
        "rollout.load_path",
        "rollout.tied_heads",
        "rollout.bucket_stream",
        "rollout.vllm_compat",
        "rollout.platform",
        "rollout.vllm_segments",
        "rollout.vllm_sockets",
        "rollout.cache_reset",
        "rollout.graph_audit",
        "rollout.bounded",
        "rollout.vllm_logs",
    ],
    ["rollout.worker"],
    ["rollout.vllm_backend"],
    [
        "rollout.refit",
        "rollout.engine",
        "rollout.async_engine",
        "rollout.engine_group",
        "rollout.tiny_model",
    ],
    ["rollout"],
    ["trainers"],
    ["benchmarks"],
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    """The project modules `name` imports, anywhere in its body."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                for alias in node.names
            ]
        else:
            continue
        found.update(t for t in targets if t in MODULES and t != name)
    return found


GRAPH = {name: imports_of(name) for name in MODULES}


def layer(name: str) -> int:
    best = max((p for ps in LAYERS for p in ps if name == p or name.startswith(p + ".")), key=len)
    return next(i for i, ps in enumerate(LAYERS) if best in ps)


def test_the_graph_sees_the_imports():
    """A guard for the two tests below: the parser finds real edges, lazy ones included."""
    assert (
        "rollout.transfer.sender" in GRAPH["rollout.refit"]
        or "rollout.transfer" in GRAPH["rollout.refit"]
    )
    assert "rollout.engine" in GRAPH["rollout"]  # imported inside build_rollout
    assert all(
        name in MODULES for name in ("trainers.ppo", "rollout.transfer.wire", "benchmarks.refit")
    )


def test_no_import_circle():
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(GRAPH[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not circles, circles


def test_no_import_runs_back_up_a_layer():
    upward = [
        f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
        for a, targets in GRAPH.items()
        for b in sorted(targets)
        if layer(b) > layer(a) and not b.startswith(a + ".")
    ]  # a package may import its own parts
    assert not upward, upward


def test_configs_import_no_transport_implementation():
    code = (
        "import json, sys; import rollout.config, trainers.config; "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('rollout', 'trainers')))))"
    )
    loaded = json.loads(
        subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        ).stdout
    )
    implementation = [
        m
        for m in loaded
        if m.startswith("rollout.transfer.")
        and m.rsplit(".", 1)[1] not in ("config", "errors", "stats")
    ]
    assert not implementation, implementation
    assert "rollout.engine" not in loaded and "vllm" not in loaded
