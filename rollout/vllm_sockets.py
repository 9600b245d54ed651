"""vLLM's ZMQ IPC socket files, in a directory of the engine's own that its close removes.

vLLM binds its inter-process sockets (engine core <-> client, the workers' message queues) at
`ipc://<VLLM_RPC_BASE_PATH>/<uuid4>` and never unlinks them: every engine left 7 socket files in /tmp on
vLLM 0.32 (the CPU build), thousands over a test suite. vLLM offers no argument for the path, so each
engine sets VLLM_RPC_BASE_PATH (through rollout.engine.vllm_worker_env, for the processes it spawns
while it is built) to a fresh directory under the user's own VLLM_RPC_BASE_PATH (default: the temp dir),
and removes the directory when it closes. A process killed with SIGKILL leaves its directory, named
`refit-vllm-ipc-*`, like vLLM's own files.

Example:
    sockets = VllmSocketDir()
    with vllm_worker_env({**other_env, **sockets.env}):
        llm = LLM(...)
    ...
    llm.llm_engine.engine_core.shutdown()
    sockets.remove()
"""

from __future__ import annotations

import os
import shutil
import tempfile

PREFIX = "refit-vllm-ipc-"


class VllmSocketDir:
    def __init__(self) -> None:
        base = os.environ.get("VLLM_RPC_BASE_PATH") or tempfile.gettempdir()
        self.path = tempfile.mkdtemp(prefix=PREFIX, dir=base)

    @property
    def env(self) -> dict[str, str]:
        """The environment for the engine's processes."""
        return {"VLLM_RPC_BASE_PATH": self.path}

    def remove(self) -> None:
        """Idempotent; call once the engine's processes are down."""
        shutil.rmtree(self.path, ignore_errors=True)
