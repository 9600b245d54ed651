"""Benchmarks of the refit, kept out of the installed packages: `python -m benchmarks.<name>` from the repo root.

- `benchmarks.transfer`: one transfer between two processes against the two-copy floor (conf/transfer.yaml).
- `benchmarks.refit`: an end-to-end refit into a live vLLM engine against the floor, a save-and-reload
  through disk and vLLM's reload alone (conf/refit.yaml).
- `benchmarks.fanout`: the refit of a TP=2 engine and of 2 engines against a single-worker engine, same run
  (conf/fanout.yaml).
- `benchmarks.serve`: a refit into `vllm serve` through the `refit` backend against our own engine's refit
  (conf/serve.yaml); its `VllmServer` is what tests/vllm_backend starts.
- `benchmarks.worker_ext`: the worker extension with the benchmarks' and tests' RPCs.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

CONF_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf")


def register_schema(name: str, root_cls: type) -> None:
    """Stores `root_cls` as `<name>_bench_schema`, the first default of conf/<name>.yaml."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=f"{name}_bench_schema", node=root_cls)


def print_and_write_json(result: Any, path: str) -> None:
    """The result as indented JSON on stdout and in `path`."""
    text = json.dumps(result, indent=2)
    print(text)
    with open(path, "w") as f:
        f.write(text + "\n")


def hydra_app(
    name: str,
    root_cls: type,
    run: Callable[[Any], Any],
    report: Callable[[Any, str], None] = print_and_write_json,
) -> Callable[[], None]:
    """The main of `python -m benchmarks.<name>`: Hydra composes conf/<name>.yaml over `root_cls` (overrides,
    `-m` multiruns, `--cfg job`, `--help`), then `report(run(root), <Hydra's output dir>/<root.bench.out>)`."""

    def main() -> None:
        import hydra
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import OmegaConf

        register_schema(name, root_cls)

        def task(dcfg) -> None:
            root = OmegaConf.to_object(dcfg)  # DictConfig stops here; __post_init__ validates
            report(run(root), os.path.join(HydraConfig.get().runtime.output_dir, root.bench.out))

        task.__module__ = (
            f"benchmarks.{name}"  # Hydra names the job (its log, --help) after the module
        )
        hydra.main(version_base="1.3", config_path=CONF_DIR, config_name=name)(task)()

    return main
