"""A trainer process for the backend tests: sends one version to a `vllm serve` through vLLM's
HTTPVLLMWeightSyncClient, and (hang) stops for good halfway through the tensors, to be killed.

    python tests/vllm_backend/trainer_proc.py <base_url> <model_path> <seed> <version> [hang]
"""

from __future__ import annotations

import sys
import time

import torch


def main(url: str, model_path: str, seed: int, version: int, hang: bool) -> None:
    from transformers import AutoModelForCausalLM
    from vllm.distributed.weight_transfer.base import ModuleSource
    from vllm.distributed.weight_transfer.clients import HTTPVLLMWeightSyncClient
    from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

    from rollout import RefitTrainerInitInfo
    from rollout.config import RefitTimeouts
    from rollout.transfer import TransferConfig

    model = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))

    class HalfThenHang(ModuleSource):
        def __iter__(self):
            params = list(super().__iter__())
            yield from params[:-2]  # more than one bucket sent
            print("HALF", flush=True)
            time.sleep(3600)

    source = HalfThenHang(model) if hang else ModuleSource(model)
    info = RefitTrainerInitInfo(
        transfer=TransferConfig(bucket_mb=1, timeout_s=5.0),
        timeouts=RefitTimeouts(next_bucket_s=10.0, receiver_exit_s=10.0, worker_reply_s=30.0),
        rank=0,
    )
    client = HTTPVLLMWeightSyncClient(url, timeout=60)
    engine = WeightTransferTrainerFactory.trainer_init(info, client=client, source=source)
    print(f"CONNECTED {engine.endpoint}", flush=True)
    engine.send_weights(version)
    print("SENT", flush=True)
    engine.shutdown()


if __name__ == "__main__":
    url, path, seed, version = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    main(url, path, seed, version, hang=sys.argv[5:] == ["hang"])
