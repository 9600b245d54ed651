"""The vLLM worker extension's old qualified name, kept importable: the code is in rollout/worker/."""

from rollout.worker.extension import RefitWorkerExtension

__all__ = ["RefitWorkerExtension"]
