"""The shape the issue asks of the code: short functions, no benchmark or debug hook in the installed packages."""

from __future__ import annotations

import ast
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = [p for pkg in ("rollout", "trainers") for p in sorted((ROOT / pkg).rglob("*.py"))]


def test_no_function_in_the_library_is_over_80_lines():
    long = [
        f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path in LIBRARY
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > 80
    ]
    assert not long, long


def test_benchmarks_and_their_rpcs_stay_out_of_the_installed_packages():
    hooks = ("refit_bench_", "refit_debug_", "refit_worker_info", "benchmarks.")
    found = [f"{p.relative_to(ROOT)}: {h}" for p in LIBRARY for h in hooks if h in p.read_text()]
    assert not found, found
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"
    ]["find"]
    assert not any(
        pattern.startswith("benchmarks") or pattern == "*" for pattern in packages["include"]
    )
